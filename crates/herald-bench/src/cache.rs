//! `herald-bench cache`: gRPC `Get` of the cache API for an L1 hit, an L2
//! hit and a miss, at each concurrency, against direct Redis `GET` and the
//! direct Postgres query of the same resource in the same run; then a
//! stampede of concurrent misses on one key over two nodes.
//!
//! The cache-api nodes run as separate processes (the release binary next
//! to this one), as they would in production; the load generator and the
//! baselines run in this process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use fred::prelude::*;
use herald_core::config::{Config, L1Config};
use herald_proto::v1::cache_client::CacheClient;
use herald_proto::v1::{GetRequest, Layer, ResourceRef, get_request};
use herald_tests::cache_api::{ACME_TOKEN, authed, sandbox_with};
use herald_tests::{Sandbox, assert_eventually, http_get};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::procstat::{cpu_seconds, redis_pid};
use crate::report::{JsonLine, Latencies, Table, cores};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent requests, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Rows (and cached keys) read at random.
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    /// Concurrent misses of one key in the stampede, split over two nodes.
    #[arg(long, default_value_t = 200)]
    stampede: usize,
}

/// gRPC connections the load generator spreads requests over.
const CHANNELS: usize = 4;
const RESOURCE: &str = "user_by_slug";
const DIRECT_SQL: &str = "SELECT id, website_slug, name FROM res_users WHERE tenant_id = $1 AND website_slug = $2";

pub(crate) struct Node {
    child: Child,
    pid: u32,
    pub(crate) grpc: SocketAddr,
    ops: SocketAddr,
    config_path: PathBuf,
}

impl Node {
    pub(crate) async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = std::fs::remove_file(&self.config_path);
    }
}

/// Runs `run` and returns it with the CPU microseconds per request that
/// process `pid` (the server) spent meanwhile.
async fn with_cpu<F: Future<Output = anyhow::Result<Run>>>(pid: u32, run: F) -> anyhow::Result<(Run, f64)> {
    let before = cpu_seconds(pid).unwrap_or(0.0);
    let run = run.await?;
    let used = cpu_seconds(pid).unwrap_or(0.0) - before;
    let per_request = if run.requests > 0 { used * 1e6 / run.requests as f64 } else { 0.0 };
    Ok((run, per_request))
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The release (or debug) `herald-cache-api` next to this executable,
/// built first when missing.
fn cache_api_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable directory")?;
    let path = dir.join("herald-cache-api");
    if !path.exists() {
        let mut build = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "-p", "herald-cache-api", "--bin", "herald-cache-api"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        if !build.status()?.success() {
            bail!("cargo build -p herald-cache-api failed");
        }
    }
    Ok(path)
}

pub(crate) async fn start_node(config: &Config, l1: L1Config) -> anyhow::Result<Node> {
    let mut config = config.clone();
    let (grpc, http, ops) = (free_addr()?, free_addr()?, free_addr()?);
    config.cache.grpc_addr = grpc.to_string();
    config.cache.http_addr = http.to_string();
    config.cache.ops_addr = ops.to_string();
    config.l1 = l1;
    let config_path = std::env::temp_dir().join(format!("{}-{}.toml", config.env, herald_tests::unique("bench")));
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    let child = Command::new(cache_api_binary()?)
        .arg("--config")
        .arg(&config_path)
        .arg("run")
        .env("HERALD_LOG", std::env::var("HERALD_LOG").unwrap_or_else(|_| "warn".into()))
        .kill_on_drop(true)
        .spawn()
        .context("spawn herald-cache-api")?;
    let pid = child.id().context("cache-api pid")?;
    let node = Node { child, pid, grpc, ops, config_path };
    assert_eventually!(30, async { http_get(node.ops, "/readyz").await.contains("l1: ok") }, "cache-api did not start");
    Ok(node)
}

async fn channels(addr: SocketAddr) -> anyhow::Result<Vec<CacheClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..CHANNELS {
        let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
        out.push(CacheClient::new(channel));
    }
    Ok(out)
}

fn get(slug: String) -> GetRequest {
    GetRequest {
        tenant: "acme".into(),
        target: Some(get_request::Target::Resource(ResourceRef { resource: RESOURCE.into(), params: vec![slug] })),
        min_commit_lsn: 0,
    }
}

/// One measurement: requests per second and latencies, plus how many
/// answers came from an unexpected layer.
pub(crate) struct Run {
    pub rps: f64,
    pub latencies: Latencies,
    pub requests: u64,
    pub unexpected: u64,
}

/// Runs `op` from `concurrency` tasks for `duration`.
pub(crate) async fn load<F, Fut>(concurrency: usize, duration: Duration, op: F) -> anyhow::Result<Run>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<bool>> + Send,
{
    let op = Arc::new(op);
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (op, counter) = (op.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::new();
            let mut unexpected = 0u64;
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let expected = op(worker, n).await?;
                latencies.record_us(t.elapsed().as_micros() as u64);
                unexpected += u64::from(!expected);
            }
            anyhow::Ok((latencies, unexpected))
        }));
    }
    let mut latencies = Latencies::new();
    let mut unexpected = 0;
    for task in tasks {
        let (l, u) = task.await??;
        latencies.add(&l);
        unexpected += u;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let requests = latencies.count();
    Ok(Run { rps: requests as f64 / elapsed, latencies, requests, unexpected })
}

/// gRPC Gets of random existing slugs that should come from `layer`.
pub(crate) async fn grpc_run(
    node: &Node,
    rows: usize,
    concurrency: usize,
    duration: Duration,
    layer: Layer,
) -> anyhow::Result<Run> {
    let clients = channels(node.grpc).await?;
    load(concurrency, duration, move |worker, n| {
        let mut client = clients[worker % clients.len()].clone();
        let slug = format!("u{}", (n.wrapping_mul(2_654_435_761) % rows as u64) + 1);
        async move {
            let answer = client.get(authed(get(slug), ACME_TOKEN)).await?.into_inner();
            Ok(answer.found && answer.layer() == layer)
        }
    })
    .await
}

/// gRPC Gets of slugs never asked before: every one reads Postgres.
async fn miss_run(node: &Node, concurrency: usize, duration: Duration, round: usize) -> anyhow::Result<Run> {
    let clients = channels(node.grpc).await?;
    load(concurrency, duration, move |worker, n| {
        let mut client = clients[worker % clients.len()].clone();
        let slug = format!("missing-{round}-{n}");
        async move {
            let answer = client.get(authed(get(slug), ACME_TOKEN)).await?.into_inner();
            Ok(!answer.found && answer.layer() == Layer::Database)
        }
    })
    .await
}

pub(crate) async fn redis_run(
    sb: &Sandbox,
    rows: usize,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Run> {
    let mut config = sb.config.redis.clone();
    config.pool_size = 8;
    let redis = herald_core::redis::connect_pool(&config).await?;
    let prefix = format!("{}:bench:direct:", sb.keys.prefix());
    let value = Bytes::from(r#"{"id":1,"website_slug":"u1","name":"User number 1"}"#.to_string());
    for i in 1..=rows {
        let _: () = redis.next().set(format!("{prefix}u{i}"), value.clone(), None, None, false).await?;
    }
    let pool = redis.clone();
    let run = load(concurrency, duration, move |_, n| {
        let client = pool.next().clone();
        let key = format!("{prefix}u{}", (n.wrapping_mul(2_654_435_761) % rows as u64) + 1);
        async move { Ok(client.get::<Option<Bytes>, _>(key).await?.is_some()) }
    })
    .await;
    let _ = redis.quit().await;
    run
}

async fn pg_run(sb: &Sandbox, rows: usize, concurrency: usize, duration: Duration) -> anyhow::Result<Run> {
    let mut config = sb.config.postgres.clone();
    config.pool_size = concurrency.min(16);
    let pool = herald_core::pg::pool(&config)?;
    load(concurrency, duration, move |_, n| {
        let pool = pool.clone();
        let slug = format!("u{}", (n.wrapping_mul(2_654_435_761) % rows as u64) + 1);
        async move {
            let client = pool.get().await?;
            let stmt = client.prepare_cached(DIRECT_SQL).await?;
            Ok(client.query_opt(&stmt, &[&"acme", &slug]).await?.is_some())
        }
    })
    .await
}

/// `stampede` concurrent Gets of one cold key, alternating over two nodes;
/// returns the database reads it cost (counted by Postgres itself).
async fn stampede(sb: &Sandbox, nodes: [&Node; 2], stampede: usize) -> anyhow::Result<i64> {
    let mut clients = Vec::new();
    for node in nodes {
        clients.extend(channels(node.grpc).await?);
    }
    let mut tasks = Vec::new();
    for i in 0..stampede {
        let mut client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let request = GetRequest {
                tenant: "acme".into(),
                target: Some(get_request::Target::Resource(ResourceRef {
                    resource: "user_probe".into(),
                    params: vec!["1".into()],
                })),
                min_commit_lsn: 0,
            };
            client.get(authed(request, ACME_TOKEN)).await.map(|_| ())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(sb.scalar_i64("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM herald_reads").await)
}

pub(crate) fn describe(run: &Run) -> String {
    format!(
        "{:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  (n={}{})",
        run.rps,
        run.latencies.quantile_ms(0.50),
        run.latencies.quantile_ms(0.99),
        run.requests,
        if run.unexpected > 0 { format!(", {} from another layer", run.unexpected) } else { String::new() }
    )
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.seconds == 0 || args.rows == 0 || args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--seconds, --rows and --concurrency must be greater than 0");
    }
    let sb = sandbox_with(|c| {
        c.postgres.pool_size = 8;
        c.broadcast.ops_addr = "127.0.0.1:0".into();
        c.broadcast.heartbeat_ms = 1_000;
        c.l1 = L1Config::default();
    })
    .await;
    let result = measure(&sb, &args).await;
    sb.cleanup().await;
    let (tables, json) = result?;
    for t in tables {
        println!("{}", t.render());
    }
    println!("{}", json.render());
    Ok(())
}

/// `rows` users of tenant acme, slugs `u1…`, and fresh planner statistics.
pub(crate) async fn seed_users(sb: &Sandbox, rows: usize) {
    sb.sql(&format!(
        "INSERT INTO res_users (tenant_id, website_slug, name) \
         SELECT 'acme', 'u' || i, 'User number ' || i FROM generate_series(1, {rows}) i"
    ))
    .await;
    sb.sql("ANALYZE res_users").await;
}

async fn measure(sb: &Sandbox, args: &Args) -> anyhow::Result<(Vec<Table>, JsonLine)> {
    seed_users(sb, args.rows).await;
    let _broadcast = sb.spawn_broadcast().await;
    // Node a keeps L1; node b's L1 holds nothing (1 byte), so its hits come
    // from L2.
    let a = start_node(&sb.config, L1Config::default()).await?;
    let b = start_node(&sb.config, L1Config { max_bytes: 1, ..L1Config::default() }).await?;
    let duration = Duration::from_secs(args.seconds);
    let redis_pid = redis_pid(&sb.redis).await?;

    // Warm: every row into L2 and a's L1.
    let warm = grpc_run(&a, args.rows, 16, Duration::from_secs(2), Layer::L1).await?;
    let mut json = JsonLine::default();
    let mut table =
        Table::new(format!("cache API gRPC Get vs direct Redis GET and direct Postgres ({}s each)", args.seconds));
    table.row("warm-up", describe(&warm));
    for (round, &c) in args.concurrency.iter().enumerate() {
        let (l1, l1_cpu) = with_cpu(a.pid, grpc_run(&a, args.rows, c, duration, Layer::L1)).await?;
        let l2 = grpc_run(&b, args.rows, c, duration, Layer::L2).await?;
        let miss = miss_run(&b, c, duration, round).await?;
        let (redis, redis_cpu) = with_cpu(redis_pid, redis_run(sb, args.rows, c, duration)).await?;
        let pg = pg_run(sb, args.rows, c, duration).await?;
        table.row(format!("c={c:<3} L1 hit (gRPC)"), describe(&l1));
        table.row(format!("c={c:<3} L2 hit (gRPC)"), describe(&l2));
        table.row(format!("c={c:<3} miss → Postgres (gRPC)"), describe(&miss));
        table.row(format!("c={c:<3} direct Redis GET"), describe(&redis));
        table.row(format!("c={c:<3} direct Postgres query"), describe(&pg));
        table.row(format!("c={c:<3} L1 hit / Redis GET"), format!("{:.2}×", l1.rps / redis.rps.max(1e-9)));
        table.row(
            format!("c={c:<3} server CPU per request"),
            format!("cache-api L1 hit {l1_cpu:.1} µs, redis-server GET {redis_cpu:.1} µs"),
        );
        json.set_f64(format!("l1_hit_server_cpu_us_{c}"), l1_cpu, 1);
        json.set_f64(format!("redis_get_server_cpu_us_{c}"), redis_cpu, 1);
        for (name, run) in [("l1_hit", &l1), ("l2_hit", &l2), ("miss", &miss), ("redis_get", &redis), ("pg", &pg)] {
            json.set_f64(format!("{name}_rps_{c}"), run.rps, 0);
            json.set_f64(format!("{name}_p50_ms_{c}"), run.latencies.quantile_ms(0.50), 3);
            json.set_f64(format!("{name}_p99_ms_{c}"), run.latencies.quantile_ms(0.99), 3);
        }
        json.set_f64(format!("l1_vs_redis_{c}"), l1.rps / redis.rps.max(1e-9), 3);
        json.set(format!("unexpected_layer_{c}"), l1.unexpected + l2.unexpected + miss.unexpected);
    }
    let queries = stampede(sb, [&a, &b], args.stampede).await?;
    let mut stampede_table =
        Table::new(format!("stampede: {} concurrent misses of one key over two nodes", args.stampede));
    stampede_table.row("database reads", queries);
    json.set("stampede_requests", args.stampede as u64).set("stampede_db_queries", queries);
    json.set("cores", cores() as u64);
    a.stop().await;
    b.stop().await;
    Ok((vec![table, stampede_table], json))
}
