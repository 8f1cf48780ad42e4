//! `herald-bench near-cache`: what a near cache (herald-client) buys.
//!
//! 1. In-process hits: `NearCache::get` of a held resource on one thread,
//!    latency per hit (ns) and hits/s.
//! 2. In the same run, the baselines: gRPC `Get` of a cache-api L1 hit and
//!    direct Redis `GET` (fred, 8 pipelined connections) at 1 and 64
//!    concurrent callers.
//! 3. Commit → near-cache entry dropped: single-row UPDATEs at `--rate`
//!    commits/s through capture (`--source`: the WAL source on a throwaway
//!    `wal_level = logical` cluster that flushes its WAL like a production
//!    server, or the outbox source on the configured Postgres) and
//!    broadcast, each its own process with production timings; the latency of each is the
//!    time the near cache applied its event (and so dropped the entry) minus
//!    the event's `commit_time_us` (end of the writer's statement, just
//!    before its commit: the figure is a slight overestimate).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use herald_client::feed::{self, FeedOptions, Messages, Source};
use herald_client::state::Coherence;
use herald_client::{NearCache, NearConfig, Target};
use herald_core::config::{BroadcastConfig, CaptureConfig, Config, L1Config};
use herald_core::time::now_us;
use herald_proto::v1::watch_message::Body;
use herald_proto::v1::{Layer, Operation, WatchRequest};
use herald_tests::cache_api::{ACME_TOKEN, authed, configure};
use herald_tests::process::ChildService;
use herald_tests::{Sandbox, Source as TestSource, assert_eventually, logical};
use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;

use crate::cache::{describe, grpc_run, redis_run, seed_users, start_node};
use crate::report::{JsonLine, Latencies, Table, cores};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rows (and cached entries) read.
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    /// Commits per second of the commit → near run.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the commit → near run, in seconds.
    #[arg(long, default_value_t = 5)]
    commit_seconds: u64,
    /// The capture source of the commit → near run: wal or outbox.
    #[arg(long, default_value = "wal")]
    source: String,
}

const WRITERS: u64 = 4;

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.seconds == 0 || args.rows == 0 || args.rate == 0 || args.commit_seconds == 0 {
        bail!("--seconds, --rows, --rate and --commit-seconds must be greater than 0");
    }
    let adjust = |c: &mut Config| {
        configure(c);
        c.postgres.pool_size = 8;
        // Production timings: what a deployment's invalidations go through.
        c.capture = CaptureConfig {
            ops_addr: "127.0.0.1:0".into(),
            source: c.capture.source,
            slot: c.capture.slot.clone(),
            ..CaptureConfig::default()
        };
        c.broadcast = BroadcastConfig { ops_addr: "127.0.0.1:0".into(), ..BroadcastConfig::default() };
        c.l1 = L1Config::default();
    };
    let sb = match args.source.as_str() {
        "wal" => {
            let admin = tokio::task::spawn_blocking(|| logical::durable_cluster().admin_url()).await?;
            Sandbox::start_at(admin, TestSource::Wal, adjust).await
        }
        "outbox" => Sandbox::start_at(herald_tests::admin_url(), TestSource::Outbox, adjust).await,
        other => bail!("--source: {other:?} is neither wal nor outbox"),
    };
    sb.sql("CREATE SEQUENCE herald_reads").await;
    let result = measure(&sb, &args).await;
    sb.cleanup().await;
    let (tables, json) = result?;
    for t in tables {
        println!("{}", t.render());
    }
    println!("{}", json.render());
    Ok(())
}

fn slug(n: u64, rows: usize) -> String {
    format!("u{}", (n.wrapping_mul(2_654_435_761) % rows as u64) + 1)
}

/// Hits on this thread for `duration`: (hits/s, latency histogram in ns).
async fn near_hits(cache: &NearCache, rows: usize, duration: Duration) -> anyhow::Result<(f64, Histogram<u64>)> {
    let targets: Vec<Target> = (0..rows as u64).map(|n| Target::resource("user_by_slug", &[&slug(n, rows)])).collect();
    let mut histogram = Histogram::<u64>::new(3)?;
    // Timed one by one (the clock read is part of each figure) …
    let deadline = Instant::now() + duration / 2;
    let mut n = 0usize;
    while Instant::now() < deadline {
        let target = &targets[n % rows];
        let t = Instant::now();
        let hit = cache.get("acme", target).await?;
        histogram.record(t.elapsed().as_nanos() as u64)?;
        if hit.is_none() {
            bail!("a held row was not found");
        }
        n += 1;
    }
    // … and untimed, for the rate.
    let started = Instant::now();
    let mut hits = 0u64;
    while started.elapsed() < duration / 2 {
        for target in targets.iter().take(1024) {
            hits += u64::from(cache.get("acme", target).await?.is_some());
        }
    }
    Ok((hits as f64 / started.elapsed().as_secs_f64(), histogram))
}

/// A Watch source that notes, for every event, now − its commit time.
struct Timed {
    addr: std::net::SocketAddr,
    lags: Arc<Mutex<Latencies>>,
}

impl Source for Timed {
    fn open(&self, _rotate: bool) -> BoxFuture<'static, Result<Messages, tonic::Status>> {
        let (addr, lags) = (self.addr, self.lags.clone());
        Box::pin(async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut client = herald_proto::v1::cache_client::CacheClient::new(channel);
            let watch = WatchRequest { tenants: vec!["acme".into()], ..Default::default() };
            let stream = client.watch(authed(watch, ACME_TOKEN)).await?.into_inner();
            let timed = stream.inspect(move |message| {
                if let Ok(herald_proto::v1::WatchMessage { body: Some(Body::Events(events)) }) = message {
                    let now = now_us();
                    let mut lags = lags.lock().unwrap_or_else(|p| p.into_inner());
                    // The run's UPDATEs only (not the rows' INSERTs, captured late).
                    let updates = events.events.iter().filter(|e| e.operation() == Operation::Update);
                    for event in updates.filter(|e| e.commit_time_us > 0) {
                        lags.record_us(u64::try_from(now - event.commit_time_us).unwrap_or(0));
                    }
                }
            });
            Ok(timed.boxed())
        })
    }
}

/// Commits at `rate` for `seconds`; returns commit → near-applied latencies.
async fn commit_to_near(sb: &Sandbox, grpc: std::net::SocketAddr, args: &Args) -> anyhow::Result<(Latencies, u64)> {
    let lags = Arc::new(Mutex::new(Latencies::new()));
    let state = Coherence::new(64 << 20, Duration::from_secs(300), Duration::from_millis(1_500));
    let options = FeedOptions {
        heartbeat_timeout: Duration::from_millis(1_500),
        backoff: (Duration::from_millis(20), Duration::from_millis(500)),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(feed::run(state.clone(), Timed { addr: grpc, lags: lags.clone() }, options, shutdown.clone()));
    assert_eventually!(10, async { state.is_live() }, "near cache never live");
    // The whole pipeline streams before the clock starts: one probe commit
    // reaches the near cache (a WAL capture may still be opening its slot).
    let count = || lags.lock().unwrap_or_else(|p| p.into_inner()).count();
    sb.sql("UPDATE res_users SET name = 'probe' WHERE tenant_id = 'acme' AND website_slug = 'u1'").await;
    assert_eventually!(30, async { count() > 0 }, "the probe commit never reached the near cache");
    *lags.lock().unwrap_or_else(|p| p.into_inner()) = Latencies::new();
    let per_writer = Duration::from_secs_f64(WRITERS as f64 / args.rate as f64);
    let total = args.rate * args.commit_seconds / WRITERS;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = herald_core::pg::pool(&sb.config.postgres)?;
        let rows = args.rows;
        writers.push(tokio::spawn(async move {
            let db = pool.get().await?;
            let stmt =
                db.prepare("UPDATE res_users SET name = $1 WHERE tenant_id = 'acme' AND website_slug = $2").await?;
            let mut ticks = interval(per_writer);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
            for i in 0..total {
                ticks.tick().await;
                let n = i * WRITERS + w;
                db.execute(&stmt, &[&format!("v{n}"), &slug(n, rows)]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let committed = total * WRITERS;
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() < committed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let lags = std::mem::take(&mut *lags.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((lags, committed))
}

async fn measure(sb: &Sandbox, args: &Args) -> anyhow::Result<(Vec<Table>, JsonLine)> {
    seed_users(sb, args.rows).await;
    // Broadcast and (below) capture run as their own processes, as deployed:
    // on a thread of their own rather than on this program's runtime.
    let _broadcast = ChildService::spawn("herald-broadcast", &sb.config);
    let node = start_node(&sb.config, L1Config::default()).await?;
    let duration = Duration::from_secs(args.seconds);
    let mut json = JsonLine::default();
    let mut table =
        Table::new(format!("near cache (in-process) vs cache-api gRPC L1 hit and Redis GET ({}s each)", args.seconds));

    let warm = grpc_run(&node, args.rows, 16, Duration::from_secs(2), Layer::L1).await?;
    table.row("warm-up (gRPC)", describe(&warm));
    let mut config = NearConfig::new(format!("http://{}", node.grpc), ACME_TOKEN, &["acme"]);
    config.max_bytes = 256 << 20;
    let cache = NearCache::connect(config)?;
    if !cache.wait_live(Duration::from_secs(10)).await {
        bail!("near cache never live");
    }
    for n in 0..args.rows as u64 {
        cache.get("acme", &Target::resource("user_by_slug", &[&slug(n, args.rows)])).await?;
    }
    let held = cache.entry_count();
    if held < args.rows as u64 {
        bail!("near cache holds {held} of {} rows after warm-up", args.rows);
    }
    let (near_rate, near) = near_hits(&cache, args.rows, duration).await?;
    let (p50, p99) = (near.value_at_quantile(0.50), near.value_at_quantile(0.99));
    table.row(
        "near-cache hit, 1 thread",
        format!("{near_rate:>9.0} hits/s  p50 {p50} ns  p99 {p99} ns  (n={})", near.len()),
    );
    json.set("near_hit_p50_ns", p50).set("near_hit_p99_ns", p99).set_f64("near_hits_per_s_1thread", near_rate, 0);
    let mut redis_64 = 0.0;
    for c in [1usize, 64] {
        let grpc = grpc_run(&node, args.rows, c, duration, Layer::L1).await?;
        let redis = redis_run(sb, args.rows, c, duration).await?;
        table.row(format!("c={c:<3} cache-api L1 hit (gRPC)"), describe(&grpc));
        table.row(format!("c={c:<3} direct Redis GET"), describe(&redis));
        json.set_f64(format!("grpc_l1_hit_rps_{c}"), grpc.rps, 0);
        json.set_f64(format!("redis_get_rps_{c}"), redis.rps, 0);
        json.set_f64(format!("redis_get_p50_ms_{c}"), redis.latencies.quantile_ms(0.5), 3);
        if c == 64 {
            redis_64 = redis.rps;
        }
    }
    let ratio = near_rate / f64::max(redis_64, 1e-9);
    table.row("near hits/s (1 thread) / Redis GET/s (c=64)", format!("{ratio:.1}×"));
    json.set_f64("near_vs_redis_64", ratio, 2);
    cache.close();

    let _capture = ChildService::spawn("herald-capture", &sb.config);
    let (lags, committed) = commit_to_near(sb, node.grpc, args).await?;
    let mut commits = Table::new(format!("commit → near-cache entry dropped, {} commits/s", args.rate));
    commits.row(
        "latency",
        format!(
            "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} of {committed} events)",
            lags.quantile_ms(0.5),
            lags.quantile_ms(0.99),
            lags.max_ms(),
            lags.count()
        ),
    );
    json.set_f64("commit_to_near_p50_ms", lags.quantile_ms(0.5), 2);
    json.set_f64("commit_to_near_p99_ms", lags.quantile_ms(0.99), 2);
    json.set("commit_to_near_events", lags.count()).set("commits", committed);
    json.set("cores", cores() as u64).set("source", args.source.clone());
    node.stop().await;
    Ok((vec![table, commits], json))
}
