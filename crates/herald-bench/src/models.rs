//! `herald-bench models`: the cost of the cache models' write paths (issue
//! 16), all in the same run, over the same rows, against a direct Postgres
//! write of the same statement:
//!
//! - write-through `Write` (commit, tag drop, wait until every live node
//!   applied the commit);
//! - write-behind `Write` (durable in the tenant's Redis stream, visible as
//!   a pending overlay): the call's latency and throughput, then the lag
//!   from enqueue to the writer's commit (`herald.applied_commands`);
//! - a burst of write-behind commands during which the writer process is
//!   SIGKILLed and started again: `write_behind_lost` counts enqueued
//!   commands never applied, `write_behind_duplicated` those applied twice
//!   (both must be 0).
//!
//! Capture, broadcast, two cache-api nodes (which enqueue but do not apply)
//! and the load generator run in this process; the write-behind writer is a
//! `herald-cache-api` process, so it can be killed.

use std::time::Duration;

use fred::prelude::*;
use herald_core::config::{CommandConfig, OverlayConfig, WriteModel};
use herald_core::keys::TenantId;
use herald_proto::v1::WriteRequest;
use herald_proto::v1::cache_client::CacheClient;
use herald_tests::cache_api::{ACME_TOKEN, authed, sandbox_with};
use herald_tests::process::ChildService;
use herald_tests::{Sandbox, assert_eventually, free_port};
use tonic::transport::Channel;

use crate::cache::load;
use crate::report::{JsonLine, Table, cores};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Rows written at random.
    #[arg(long, default_value_t = 1000)]
    rows: usize,
}

const COMMAND_SQL: &str = "UPDATE res_users SET name = $2 WHERE tenant_id = $tenant AND id = $1";
const DIRECT_SQL: &str = "UPDATE res_users SET name = $2 WHERE tenant_id = $3 AND id = $1";

const BUMP_SQL: &str = "UPDATE res_users SET n = n + 1, last = $2 WHERE tenant_id = $tenant AND id = $1";

fn id(n: u64, rows: usize) -> i64 {
    (n.wrapping_mul(2_654_435_761) % rows as u64) as i64 + 1
}

/// The write-through command, and the write-behind ones (`rename_later`
/// runs the same statement; `bump` counts its applications per row).
fn commands() -> Vec<CommandConfig> {
    let command = |name: &str, sql: &str, params: [&str; 2], model| CommandConfig {
        name: name.into(),
        sql: sql.into(),
        params: params.iter().map(|p| p.to_string()).collect(),
        tags: vec!["res_users.id=$1".into()],
        model,
        overlay: (model == WriteModel::WriteBehind).then(|| OverlayConfig {
            resource: "user_by_id".into(),
            params: [("id".to_string(), "$1".to_string())].into(),
            set: [(if params[1] == "name" { "name" } else { "last" }.to_string(), "$2".to_string())].into(),
        }),
    };
    vec![
        command("rename_user", COMMAND_SQL, ["id", "name"], WriteModel::WriteThrough),
        command("rename_later", COMMAND_SQL, ["id", "name"], WriteModel::WriteBehind),
        command("bump", BUMP_SQL, ["id", "seq"], WriteModel::WriteBehind),
    ]
}

/// The write-behind writer: a cache-api process on free ports.
fn writer_process(sb: &Sandbox) -> ChildService {
    let mut config = sb.config.clone();
    config.cache.write_behind_writer = true;
    for addr in [&mut config.cache.grpc_addr, &mut config.cache.http_addr, &mut config.cache.ops_addr] {
        *addr = format!("127.0.0.1:{}", free_port());
    }
    ChildService::spawn("herald-cache-api", &config)
}

async fn stream_len(sb: &Sandbox) -> u64 {
    sb.redis.next().xlen(sb.keys.commands(&TenantId::new("acme").expect("tenant"))).await.unwrap_or(u64::MAX)
}

/// Waits (at most `secs`) until the writer drained the stream.
async fn drained(sb: &Sandbox, secs: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while stream_len(sb).await > 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the writer did not drain the stream in {secs}s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Write-behind `Write`s of `command` spread over `clients`.
async fn enqueue_load(
    clients: &[CacheClient<Channel>],
    command: &'static str,
    concurrency: usize,
    duration: Duration,
    rows: usize,
) -> anyhow::Result<crate::cache::Run> {
    let clients = clients.to_vec();
    load(concurrency, duration, move |worker, n| {
        let mut client = clients[worker % clients.len()].clone();
        async move {
            let value = if command == "bump" { (n + 1).to_string() } else { format!("behind {n}") };
            let request = WriteRequest {
                tenant: "acme".into(),
                command: command.into(),
                params: vec![id(n, rows).to_string(), value],
            };
            Ok(client.write(authed(request, ACME_TOKEN)).await?.into_inner().pending)
        }
    })
    .await
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let sb = sandbox_with(|c| {
        c.postgres.pool_size = args.concurrency + 4;
        c.cache.write_wait_ms = 5_000;
        c.cache.commands = commands();
        // The nodes enqueue; the writer is a process of its own.
        c.cache.write_behind_writer = false;
    })
    .await;
    sb.sql("ALTER TABLE res_users ADD COLUMN n int NOT NULL DEFAULT 0, ADD COLUMN last bigint NOT NULL DEFAULT 0")
        .await;
    sb.sql(&format!(
        "INSERT INTO res_users (id, tenant_id, website_slug, name) \
         SELECT i, 'acme', 'u' || i, 'User number ' || i FROM generate_series(1, {}) i",
        args.rows
    ))
    .await;
    let _broadcast = sb.spawn_broadcast().await;
    let _capture = sb.spawn_capture().await;
    let nodes = [sb.spawn_cache_api(Default::default()).await, sb.spawn_cache_api(Default::default()).await];
    let key = sb.keys.node_watermarks();
    assert_eventually!(
        30,
        async {
            let recorded = herald_cache_api::progress::read(&sb.redis, &key).await.unwrap_or_default();
            recorded.iter().filter(|n| n.lsn > 0).count() >= 2
        },
        "the cache-api nodes never recorded a watermark"
    );

    let pool = sb.pool.clone();
    let rows = args.rows;
    let direct = load(args.concurrency, duration, move |_, n| {
        let pool = pool.clone();
        async move {
            let client = pool.get().await?;
            let stmt = client.prepare_cached(DIRECT_SQL).await?;
            let name = format!("direct {n}");
            let changed = client.execute(&stmt, &[&id(n, rows), &name, &"acme"]).await?;
            Ok(changed == 1)
        }
    })
    .await?;

    let mut clients: Vec<CacheClient<Channel>> = Vec::new();
    for node in &nodes {
        clients.push(node.client().await);
    }
    let through_clients = clients.clone();
    let through = load(args.concurrency, duration, move |worker, n| {
        let mut client = through_clients[worker % through_clients.len()].clone();
        async move {
            let request = WriteRequest {
                tenant: "acme".into(),
                command: "rename_user".into(),
                params: vec![id(n, rows).to_string(), format!("through {n}")],
            };
            let written = client.write(authed(request, ACME_TOKEN)).await?.into_inner();
            // Unexpected: a row missing, or the nodes not caught up in time.
            Ok(written.rows_affected == 1 && written.wait_reached)
        }
    })
    .await?;

    // Write-behind: the calls, then the writer's lag under that load.
    let writer = writer_process(&sb);
    let behind = enqueue_load(&clients, "rename_later", args.concurrency, duration, rows).await?;
    drained(&sb, 300).await?;
    let lag = |q: f64| {
        format!(
            "SELECT COALESCE(percentile_cont({q}) WITHIN GROUP \
             (ORDER BY extract(epoch FROM applied_at - enqueued_at)) * 1000, 0)::float8 \
             FROM herald.applied_commands WHERE command = 'rename_later'"
        )
    };
    let db = sb.pool.get().await?;
    let lag_p50: f64 = db.query_one(&lag(0.5), &[]).await?.get(0);
    let lag_p99: f64 = db.query_one(&lag(0.99), &[]).await?.get(0);
    let applied_per_s: f64 = db
        .query_one(
            "SELECT (count(*) / GREATEST(extract(epoch FROM max(applied_at) - min(applied_at)), 0.001))::float8 \
             FROM herald.applied_commands WHERE command = 'rename_later'",
            &[],
        )
        .await?
        .get(0);

    // The SIGKILL round: a burst of counting commands; the writer is killed
    // once it applied some, and started again.
    let burst = {
        let clients = clients.clone();
        let (concurrency, rows) = (args.concurrency, rows);
        tokio::spawn(async move { enqueue_load(&clients, "bump", concurrency, duration, rows).await })
    };
    let bumps = "SELECT count(*) FROM herald.applied_commands WHERE command = 'bump'";
    assert_eventually!(60, async { sb.scalar_i64(bumps).await >= 50 }, "the writer applied no bump");
    writer.kill().await;
    let killed_at = sb.scalar_i64(bumps).await;
    let _writer = writer_process(&sb);
    let burst = burst.await??;
    drained(&sb, 300).await?;
    let applied_bumps = sb.scalar_i64(bumps).await as u64;
    let counted = sb.scalar_i64("SELECT COALESCE(sum(n), 0)::int8 FROM res_users").await as u64;
    let enqueued = burst.requests - burst.unexpected;
    let lost = enqueued.saturating_sub(applied_bumps);
    let duplicated = counted.saturating_sub(applied_bumps);

    let mut table = Table::new(format!(
        "models: {} writers for {}s over {} rows, 2 cache-api nodes, {} cores",
        args.concurrency,
        args.seconds,
        args.rows,
        cores()
    ));
    table.row("direct Postgres UPDATE", format!("{:.0}/s, {}", direct.rps, direct.latencies.summary()));
    table.row("write-through Write", format!("{:.0}/s, {}", through.rps, through.latencies.summary()));
    table.row("write-through, wait not reached", through.unexpected);
    table.row("write-behind Write (enqueue)", format!("{:.0}/s, {}", behind.rps, behind.latencies.summary()));
    table.row("write-behind, answers not pending", behind.unexpected);
    table.row("write-behind writer", format!("{applied_per_s:.0} applied/s (one tenant: one connection, in order)"));
    table.row("write-behind lag enqueue → applied", format!("p50 {lag_p50:.1} ms, p99 {lag_p99:.1} ms"));
    table.row(
        "SIGKILL round",
        format!(
            "{enqueued} enqueued, writer killed after {killed_at} applied; lost {lost}, applied twice {duplicated}"
        ),
    );
    print!("{}", table.render());
    let mut json = JsonLine::default();
    json.set("benchmark", "models")
        .set("concurrency", args.concurrency as u64)
        .set("cores", cores() as u64)
        .set_f64("direct_write_p50_ms", direct.latencies.quantile_ms(0.5), 3)
        .set_f64("direct_write_p99_ms", direct.latencies.quantile_ms(0.99), 3)
        .set_f64("direct_write_per_s", direct.rps, 1)
        .set_f64("write_through_p50_ms", through.latencies.quantile_ms(0.5), 3)
        .set_f64("write_through_p99_ms", through.latencies.quantile_ms(0.99), 3)
        .set_f64("write_through_per_s", through.rps, 1)
        .set("write_through_not_reached", through.unexpected)
        .set_f64("write_behind_p50_ms", behind.latencies.quantile_ms(0.5), 3)
        .set_f64("write_behind_p99_ms", behind.latencies.quantile_ms(0.99), 3)
        .set_f64("write_behind_per_s", behind.rps, 1)
        .set_f64("write_behind_applied_per_s", applied_per_s, 1)
        .set_f64("write_behind_lag_p50_ms", lag_p50, 1)
        .set_f64("write_behind_lag_p99_ms", lag_p99, 1)
        .set("write_behind_kill_enqueued", enqueued)
        .set("write_behind_lost", lost)
        .set("write_behind_duplicated", duplicated);
    println!("{}", json.render());
    for node in nodes {
        node.stop().await?;
    }
    sb.cleanup().await;
    Ok(())
}
