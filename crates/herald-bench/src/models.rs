//! `herald-bench models`: the cost of the cache models' write paths (issue
//! 16). A write-through `Write` (commit, tag drop, wait until every live
//! node applied the commit) against a direct Postgres write of the same
//! statement, both in the same run, over the same rows.
//!
//! Everything (capture, broadcast, two cache-api nodes, the load generator)
//! runs in this process on the sandbox's Postgres and Redis. Write-behind is
//! not built yet: its JSON keys are null.

use std::time::Duration;

use herald_core::config::{CommandConfig, WriteModel};
use herald_proto::v1::WriteRequest;
use herald_proto::v1::cache_client::CacheClient;
use herald_tests::assert_eventually;
use herald_tests::cache_api::{ACME_TOKEN, authed, sandbox_with};
use serde_json::Value;
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

fn id(n: u64, rows: usize) -> i64 {
    (n.wrapping_mul(2_654_435_761) % rows as u64) as i64 + 1
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let sb = sandbox_with(|c| {
        c.postgres.pool_size = args.concurrency + 4;
        c.cache.write_wait_ms = 5_000;
        c.cache.commands = vec![CommandConfig {
            name: "rename_user".into(),
            sql: COMMAND_SQL.into(),
            params: vec!["id".into(), "name".into()],
            tags: vec!["res_users.id=$1".into()],
            model: WriteModel::WriteThrough,
            overlay: None,
        }];
    })
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
    let through = load(args.concurrency, duration, move |worker, n| {
        let mut client = clients[worker % clients.len()].clone();
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
    table.row("write-behind", "not built");
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
        .set("write_behind_p99_ms", Value::Null)
        .set("write_behind_lost", Value::Null);
    println!("{}", json.render());
    for node in nodes {
        node.stop().await?;
    }
    sb.cleanup().await;
    Ok(())
}
