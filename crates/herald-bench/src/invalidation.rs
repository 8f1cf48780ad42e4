//! `herald-bench invalidation`: how long a commit takes to reach two L1
//! caches, and what capture costs the writers.
//!
//! 1. Latency: single-row INSERTs committed on a fixed schedule (`--rate`)
//!    by a few writer connections, into a watched table; capture and
//!    broadcast run in-process; two independent L1 caches with their own
//!    subscribers report every applied event. Latency of an id at a cache is
//!    the time it was applied there minus the time its commit returned to
//!    the writer.
//! 2. Writer throughput: N connections INSERT in autocommit as fast as they
//!    can into a plain table, a Herald-watched table (capture draining) and a
//!    table with the naive per-statement `pg_notify` trigger.
//! 3. With `--redis-cluster`: the latency run again, on a Redis Cluster with
//!    a partitioned log (`--partitions`), against the single Redis of 1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use herald_core::config::{BroadcastConfig, CaptureConfig, Config, L1Config, PostgresConfig, TableConfig};
use herald_core::l1::{Applied, L1Cache};
use herald_core::time::now_us;
use herald_proto::v1::InvalidationEvent;
use herald_tests::redis_cluster::RedisCluster;
use herald_tests::{Sandbox, cluster_settings};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::report::{JsonLine, Latencies, Table, cores};

#[derive(clap::Args)]
pub struct Args {
    /// Commits per second offered during the latency run.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the latency run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Writer connections sharing the latency run's schedule.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Concurrent connections of each writer-throughput run.
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64])]
    clients: Vec<usize>,
    /// Measured length of each writer-throughput run (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    tps_seconds: u64,
    /// Also run the latency run on a Redis Cluster of its own (3 masters
    /// with a replica each; capture and broadcast wait for 1 replica), after
    /// the single-Redis one, with the same offered load.
    #[arg(long)]
    redis_cluster: bool,
    /// Log partitions of the cluster run.
    #[arg(long, default_value_t = 3)]
    partitions: u16,
}

/// Tenants the latency run's commits cycle through, so that a partitioned
/// log gets events in every partition.
const TENANTS: u64 = 16;

const LATENCY_TABLE: &str = "bench_latency";
const PLAIN_TABLE: &str = "bench_plain";
const HERALD_TABLE: &str = "bench_herald";
const NOTIFY_TABLE: &str = "bench_notify";
const NOTIFY_CHANNEL: &str = "bench_notify";
const WARMUP: Duration = Duration::from_secs(1);
/// How long the latency run waits for the last invalidations after the
/// last commit.
const SETTLE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a Herald throughput run may take to drain its outbox afterwards.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// The naive design of seed 000: NOTIFY in every writer's transaction.
const NOTIFY_TRIGGER: &str = "
CREATE FUNCTION bench_notify_stmt() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('bench_notify', (SELECT string_agg(id::text, ',') FROM new_rows));
    RETURN NULL;
END
$fn$;
CREATE TRIGGER bench_notify_stmt AFTER INSERT ON bench_notify
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_stmt();";

fn table_sql(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (id bigserial PRIMARY KEY, tenant_id text NOT NULL, slug text NOT NULL, val int NOT NULL);"
    )
}

fn watched(name: &str) -> TableConfig {
    TableConfig {
        name: name.into(),
        schema: "public".into(),
        table: None,
        id_column: "id".into(),
        key_columns: vec!["slug".into()],
        tenant_column: Some("tenant_id".into()),
        team_column: None,
        watch_columns: Vec::new(),
    }
}

/// The sandbox's test timings back to production defaults (ops servers stay
/// on ephemeral ports).
fn production_timings(config: &mut Config) {
    config.postgres.pool_size = PostgresConfig::default().pool_size;
    config.capture = CaptureConfig { ops_addr: "127.0.0.1:0".into(), ..CaptureConfig::default() };
    config.broadcast = BroadcastConfig { ops_addr: "127.0.0.1:0".into(), ..BroadcastConfig::default() };
    config.l1 = L1Config::default();
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.rate == 0 || args.seconds == 0 || args.tps_seconds == 0 || args.writers == 0 {
        bail!("--rate, --seconds, --tps-seconds and --writers must be greater than 0");
    }
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients must list connection counts greater than 0");
    }
    if args.redis_cluster && !(1..=herald_core::keys::MAX_PARTITIONS).contains(&args.partitions) {
        bail!("--partitions must be 1 to {}", herald_core::keys::MAX_PARTITIONS);
    }
    let mut sandbox = Sandbox::start_with(production_timings).await;
    let result = measure(&mut sandbox, &args).await;
    sandbox.cleanup().await;
    let (latency, throughput) = result?;
    let cluster = if args.redis_cluster { Some(cluster_latency(&args).await?) } else { None };

    let mut errors = Vec::new();
    println!("{}", latency.table(&args, "one Redis, 1 partition", &mut errors).render());
    if let Some(cluster) = &cluster {
        let on = format!("Redis Cluster, 3 masters + 3 replicas, {} partitions, WAIT 1", args.partitions);
        println!("{}", cluster.table(&args, &on, &mut errors).render());
    }
    println!("{}", throughput_table(&throughput, &mut errors).render());
    let mut json = JsonLine::default();
    latency.json(&mut json, "");
    if let Some(cluster) = &cluster {
        cluster.json(&mut json, "cluster_");
        json.set("partitions", u64::from(args.partitions));
    }
    throughput_json(&throughput, &mut json);
    json.set("cores", cores() as u64).set("errors", errors.len() as u64);
    println!("{}", json.render());
    if !errors.is_empty() {
        bail!("benchmark had errors: {}", errors.join("; "));
    }
    Ok(())
}

async fn measure(sandbox: &mut Sandbox, args: &Args) -> anyhow::Result<(LatencyOutcome, Vec<TpsRun>)> {
    let mut sql: String = [LATENCY_TABLE, PLAIN_TABLE, HERALD_TABLE, NOTIFY_TABLE].map(table_sql).concat();
    sql.push_str(NOTIFY_TRIGGER);
    sandbox.sql(&sql).await;
    sandbox.config.tables.push(watched(LATENCY_TABLE));
    sandbox.config.tables.push(watched(HERALD_TABLE));
    sandbox.install().await;
    let capture = sandbox.spawn_capture().await;
    let mut broadcast = Some(sandbox.spawn_broadcast().await);
    let a = sandbox.l1().await;
    let b = sandbox.l1().await;
    let url = sandbox.config.postgres.url.clone();

    eprintln!("latency: {} commits/s for {} s, {} writers", args.rate, args.seconds, args.writers);
    let mut latency = latency_run(&url, args, [&a.cache, &b.cache], capture.ops_addr).await?;
    latency.flushes = [a.cache.metrics().flushes.get(), b.cache.metrics().flushes.get()];

    let mut runs = Vec::new();
    let listener = NotifyListener::start(&url).await?;
    for &clients in &args.clients {
        for variant in [Variant::Plain, Variant::HeraldCapture, Variant::Herald, Variant::Notify] {
            eprintln!("throughput: {} with {clients} clients for {} s", variant.name(), args.tps_seconds);
            if variant == Variant::HeraldCapture
                && let Some(running) = broadcast.take()
            {
                // The writer's cost of capture alone: broadcast and the L1
                // holders run elsewhere in production; here they would share
                // the same two cores.
                running.stop().await?;
            }
            let before = scrape(capture.ops_addr).await.unwrap_or_default();
            let notified = listener.received();
            let load = writer_load(&url, variant.table(), clients, Duration::from_secs(args.tps_seconds)).await?;
            let during = metric_delta(&before, &scrape(capture.ops_addr).await.unwrap_or_default());
            let mut run = TpsRun { variant, clients, load, capture: during, drain: None, notified: 0 };
            if broadcast.is_none() {
                broadcast = Some(sandbox.spawn_broadcast().await);
            }
            match variant {
                Variant::Herald | Variant::HeraldCapture => {
                    run.drain = Some(drain(&url, capture.ops_addr, [&a.cache, &b.cache]).await?)
                }
                Variant::Notify => {
                    run.notified =
                        listener.wait_for(notified + run.load.committed, Duration::from_secs(5)).await - notified;
                }
                Variant::Plain => {}
            }
            runs.push(run);
        }
    }
    Ok((latency, runs))
}

/// The latency run on a Redis Cluster of its own, with production timings,
/// `--partitions` log partitions and capture and broadcast waiting for one
/// replica (as a cluster with replicas should run).
async fn cluster_latency(args: &Args) -> anyhow::Result<LatencyOutcome> {
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3));
    let url = cluster.url();
    let partitions = args.partitions;
    let mut sandbox = Sandbox::start_with(|c| {
        production_timings(c);
        cluster_settings(c, url);
        c.redis.partitions = partitions;
    })
    .await;
    let result = async {
        sandbox.sql(&table_sql(LATENCY_TABLE)).await;
        sandbox.config.tables.push(watched(LATENCY_TABLE));
        sandbox.install().await;
        let capture = sandbox.spawn_capture().await;
        let broadcast = sandbox.spawn_broadcast().await;
        let (a, b) = (sandbox.l1().await, sandbox.l1().await);
        eprintln!("latency on the cluster: {} commits/s for {} s, {partitions} partitions", args.rate, args.seconds);
        let mut latency =
            latency_run(&sandbox.config.postgres.url, args, [&a.cache, &b.cache], capture.ops_addr).await?;
        latency.flushes = [a.cache.metrics().flushes.get(), b.cache.metrics().flushes.get()];
        broadcast.stop().await?;
        capture.stop().await?;
        Ok(latency)
    }
    .await;
    sandbox.cleanup().await;
    result
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.context("failed to connect to postgres")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

// ---------------------------------------------------------------- latency

/// What one cache saw of the latency table.
#[derive(Default)]
struct Watched {
    /// id → when its event was applied (first time).
    arrivals: HashMap<i64, i64>,
    duplicates: u64,
    lagged: u64,
    widened: u64,
    unparsable_ids: u64,
    /// Writer's statement → appended to the stream (event timestamps).
    to_capture: Latencies,
    /// Appended to the stream → applied at this cache.
    to_apply: Latencies,
}

impl Watched {
    fn observe(&mut self, event: &InvalidationEvent, applied_us: i64, progress: &AtomicU64) {
        if event.table != LATENCY_TABLE {
            return;
        }
        if event.widened {
            self.widened += 1;
        }
        self.to_capture.record_us(non_negative(event.captured_time_us - event.commit_time_us));
        self.to_apply.record_us(non_negative(applied_us - event.captured_time_us));
        for id in &event.ids {
            let Ok(id) = id.parse::<i64>() else {
                self.unparsable_ids += 1;
                continue;
            };
            match self.arrivals.entry(id) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(applied_us);
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                std::collections::hash_map::Entry::Occupied(_) => self.duplicates += 1,
            }
        }
    }
}

fn non_negative(us: i64) -> u64 {
    u64::try_from(us).unwrap_or(0)
}

fn spawn_watcher(cache: &L1Cache, progress: Arc<AtomicU64>, stop: CancellationToken) -> JoinHandle<Watched> {
    let mut events = cache.watch();
    tokio::spawn(async move {
        let mut watched = Watched::default();
        loop {
            let next = tokio::select! {
                biased;
                next = events.recv() => next,
                _ = stop.cancelled() => break,
            };
            match next {
                Ok(Applied::Event(event)) => watched.observe(&event, now_us(), &progress),
                // Counted from the cache's metrics.
                Ok(Applied::Flushed { .. }) => {}
                Err(RecvError::Lagged(n)) => watched.lagged += n,
                Err(RecvError::Closed) => break,
            }
        }
        watched
    })
}

/// One cache's view of the commits.
#[derive(Default)]
struct CacheOutcome {
    received: u64,
    missing: u64,
    /// Applied before the writer saw its commit return (latency counted 0).
    early: u64,
    latencies: Latencies,
    watched: Watched,
}

struct LatencyOutcome {
    commits: u64,
    achieved_rate: f64,
    write_errors: u64,
    first_error: Option<String>,
    /// Most commits scheduled but not yet returned at any tick.
    max_backlog: u64,
    /// After the last commit, until every cache had every id (or deadline).
    settle: Duration,
    caches: [CacheOutcome; 2],
    all: Latencies,
    capture: HashMap<String, f64>,
    flushes: [u64; 2],
}

struct WriterResult {
    commits: Vec<(i64, i64)>,
    errors: u64,
    first_error: Option<String>,
}

async fn latency_run(
    url: &str,
    args: &Args,
    caches: [&L1Cache; 2],
    capture_ops: SocketAddr,
) -> anyhow::Result<LatencyOutcome> {
    let stop = CancellationToken::new();
    let progress = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let watchers = [
        spawn_watcher(caches[0], progress[0].clone(), stop.clone()),
        spawn_watcher(caches[1], progress[1].clone(), stop.clone()),
    ];
    let before = scrape(capture_ops).await.unwrap_or_default();

    let total = args.rate * args.seconds;
    // Sized for the whole run, so that the schedule never waits for writers.
    let (jobs_tx, jobs_rx) = tokio::sync::mpsc::channel::<u64>(usize::try_from(total)?.max(1));
    let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
    let completed = Arc::new(AtomicU64::new(0));
    let insert = format!("INSERT INTO {LATENCY_TABLE} (tenant_id, slug, val) VALUES ($1, $2, $3) RETURNING id");
    let mut writers = Vec::new();
    for _ in 0..args.writers {
        let client = connect(url).await?;
        let statement = client.prepare(&insert).await?;
        let (jobs_rx, completed) = (jobs_rx.clone(), completed.clone());
        writers.push(tokio::spawn(async move {
            let mut result = WriterResult { commits: Vec::new(), errors: 0, first_error: None };
            loop {
                let job = { jobs_rx.lock().await.recv().await };
                let Some(seq) = job else { break };
                let tenant = format!("bench{}", seq % TENANTS);
                let slug = format!("s{seq}");
                let val = i32::try_from(seq % 1_000_000).unwrap_or(0);
                match client.query_one(&statement, &[&tenant, &slug, &val]).await {
                    Ok(row) => result.commits.push((row.get::<_, i64>(0), now_us())),
                    Err(error) => {
                        result.errors += 1;
                        result.first_error.get_or_insert_with(|| error.to_string());
                    }
                }
                completed.fetch_add(1, Ordering::Relaxed);
            }
            result
        }));
    }

    let start = Instant::now();
    let mut ticks = interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let (mut sent, mut max_backlog) = (0u64, 0u64);
    while sent < total {
        ticks.tick().await;
        let due = ((start.elapsed().as_secs_f64() * args.rate as f64) as u64 + 1).min(total);
        while sent < due {
            jobs_tx.send(sent).await.context("writers stopped")?;
            sent += 1;
        }
        max_backlog = max_backlog.max(sent - completed.load(Ordering::Relaxed));
    }
    drop(jobs_tx);
    let mut commits = Vec::with_capacity(usize::try_from(total)?);
    let (mut write_errors, mut first_error) = (0, None);
    for writer in writers {
        let result = writer.await?;
        commits.extend(result.commits);
        write_errors += result.errors;
        first_error = first_error.or(result.first_error);
    }
    let elapsed = start.elapsed();
    let achieved_rate = commits.len() as f64 / elapsed.as_secs_f64();

    let settle_start = Instant::now();
    let expected = commits.len() as u64;
    while progress.iter().any(|p| p.load(Ordering::Relaxed) < expected) && settle_start.elapsed() < SETTLE_DEADLINE {
        sleep(Duration::from_millis(5)).await;
    }
    let settle = settle_start.elapsed();
    stop.cancel();
    let [wa, wb] = watchers;
    let watched = [wa.await?, wb.await?];
    let capture = metric_delta(&before, &scrape(capture_ops).await.unwrap_or_default());

    let mut all = Latencies::new();
    let caches = watched.map(|watched| {
        let mut outcome = CacheOutcome::default();
        for &(id, committed_us) in &commits {
            match watched.arrivals.get(&id) {
                Some(&applied_us) => {
                    outcome.received += 1;
                    let latency = applied_us - committed_us;
                    if latency < 0 {
                        outcome.early += 1;
                    }
                    outcome.latencies.record_us(non_negative(latency));
                }
                None => outcome.missing += 1,
            }
        }
        all.add(&outcome.latencies);
        outcome.watched = watched;
        outcome
    });
    Ok(LatencyOutcome {
        commits: expected,
        achieved_rate,
        write_errors,
        first_error,
        max_backlog,
        settle,
        caches,
        all,
        capture,
        flushes: [0, 0],
    })
}

impl LatencyOutcome {
    fn table(&self, args: &Args, on: &str, errors: &mut Vec<String>) -> Table {
        let mut t = Table::new(format!(
            "invalidation latency: commit returned → applied at L1 ({} commits/s offered for {} s, {} writers; {on})",
            args.rate, args.seconds, args.writers
        ));
        t.row("commits", self.commits)
            .row("achieved rate", format!("{:.1} commits/s", self.achieved_rate))
            .row("max schedule backlog", format!("{} commits", self.max_backlog));
        if self.write_errors > 0 {
            t.row(
                "write errors",
                format!("{} (first: {})", self.write_errors, self.first_error.as_deref().unwrap_or("")),
            );
            errors.push(format!("{} commits failed", self.write_errors));
        }
        for (name, (cache, flushes)) in ["L1 a", "L1 b"].iter().zip(self.caches.iter().zip(self.flushes)) {
            let w = &cache.watched;
            t.row(
                format!("{name} invalidations"),
                format!(
                    "{} of {} (missing {}, early {}, duplicates {}, lagged {}, widened {}, flushes {})",
                    cache.received,
                    self.commits,
                    cache.missing,
                    cache.early,
                    w.duplicates,
                    w.lagged,
                    w.widened,
                    flushes
                ),
            );
            t.row(format!("{name} latency"), cache.latencies.summary());
            if cache.missing > 0 {
                errors.push(format!("{name}: {} invalidations missing", cache.missing));
            }
            if w.lagged > 0 {
                errors.push(format!("{name}: watch receiver lagged by {} events", w.lagged));
            }
            if w.unparsable_ids > 0 {
                errors.push(format!("{name}: {} ids were not integers", w.unparsable_ids));
            }
        }
        t.row("both caches", self.all.summary());
        let a = &self.caches[0].watched;
        t.row("split: statement → captured", a.to_capture.summary())
            .row("split: captured → applied (a)", a.to_apply.summary())
            .row("settle after last commit", format!("{:.0} ms", self.settle.as_secs_f64() * 1000.0));
        t.row("capture during run", capture_summary(&self.capture));
        t
    }

    /// Its JSON fields, each name prefixed with `prefix`.
    fn json(&self, json: &mut JsonLine, prefix: &str) {
        let k = |name: &str| format!("{prefix}{name}");
        json.set_f64(k("p50_ms"), self.all.quantile_ms(0.50), 3)
            .set_f64(k("p95_ms"), self.all.quantile_ms(0.95), 3)
            .set_f64(k("p99_ms"), self.all.quantile_ms(0.99), 3)
            .set_f64(k("max_ms"), self.all.max_ms(), 3)
            .set_f64(k("rate"), self.achieved_rate, 1)
            .set(k("commits"), self.commits)
            .set(k("missing"), self.caches.iter().map(|c| c.missing).sum::<u64>())
            .set(k("invalidations_a"), self.caches[0].received)
            .set(k("invalidations_b"), self.caches[1].received)
            .set(k("early"), self.caches.iter().map(|c| c.early).sum::<u64>())
            .set(k("lagged"), self.caches.iter().map(|c| c.watched.lagged).sum::<u64>())
            .set(k("write_errors"), self.write_errors)
            .set_f64(k("capture_p99_ms"), self.caches[0].watched.to_capture.quantile_ms(0.99), 3)
            .set_f64(k("apply_p99_ms"), self.caches[0].watched.to_apply.quantile_ms(0.99), 3);
    }
}

// ---------------------------------------------------------------- throughput

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    /// Herald's triggers and capture; broadcast stopped during the run.
    HeraldCapture,
    /// Everything: triggers, capture, broadcast, two L1 holders.
    Herald,
    Notify,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::HeraldCapture => "herald (capture on)",
            Variant::Herald => "herald (capture, broadcast, 2 L1 on the same cores)",
            Variant::Notify => "notify",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Variant::Plain => PLAIN_TABLE,
            Variant::Herald | Variant::HeraldCapture => HERALD_TABLE,
            Variant::Notify => NOTIFY_TABLE,
        }
    }
}

struct Load {
    tps: f64,
    /// Commits during warm-up and measurement.
    committed: u64,
    errors: u64,
    first_error: Option<String>,
}

struct Drain {
    /// Outbox rows left when the writers stopped.
    depth_at_stop: i64,
    /// Until the outbox was empty.
    outbox: Duration,
    /// Until both L1 caches had applied every appended event.
    applied: Duration,
    /// Rows still in the outbox at the deadline.
    left: i64,
    /// Events appended but not applied by both caches at the deadline.
    behind: u64,
}

struct TpsRun {
    variant: Variant,
    clients: usize,
    load: Load,
    capture: HashMap<String, f64>,
    drain: Option<Drain>,
    notified: u64,
}

/// `clients` connections INSERTing in autocommit into `table`: 1 s warm-up,
/// then `duration` measured.
async fn writer_load(url: &str, table: &str, clients: usize, duration: Duration) -> anyhow::Result<Load> {
    let insert = format!("INSERT INTO {table} (tenant_id, slug, val) VALUES ($1, $2, $3)");
    let connections = futures::future::try_join_all((0..clients).map(|_| async {
        let client = connect(url).await?;
        let statement = client.prepare(&insert).await?;
        anyhow::Ok((client, statement))
    }))
    .await?;
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(i, (client, statement))| {
            let (count, stop) = (count.clone(), stop.clone());
            tokio::spawn(async move {
                let tenant = format!("tenant{}", i % 4);
                let (mut n, mut errors, mut first_error) = (0u64, 0u64, None);
                while !stop.load(Ordering::Relaxed) {
                    let slug = format!("c{i}-{n}");
                    let val = i32::try_from(n % 1_000_000).unwrap_or(0);
                    match client.execute(&statement, &[&tenant, &slug, &val]).await {
                        Ok(_) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| error.to_string());
                        }
                    }
                    n += 1;
                }
                (errors, first_error)
            })
        })
        .collect();
    sleep(WARMUP).await;
    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    sleep(duration).await;
    let (c1, t1) = (count.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    let (mut errors, mut first_error) = (0, None);
    for task in tasks {
        let (e, first) = task.await?;
        errors += e;
        first_error = first_error.or(first);
    }
    Ok(Load {
        tps: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
        committed: count.load(Ordering::Relaxed),
        errors,
        first_error,
    })
}

/// Waits until capture has emptied the outbox and both L1 caches have
/// applied every event capture appended, so the next run starts quiet.
async fn drain(url: &str, capture_ops: SocketAddr, caches: [&L1Cache; 2]) -> anyhow::Result<Drain> {
    let client = connect(url).await?;
    let start = Instant::now();
    let depth =
        || async { anyhow::Ok(client.query_one("SELECT count(*) FROM herald.outbox", &[]).await?.get::<_, i64>(0)) };
    let depth_at_stop = depth().await?;
    let mut left = depth_at_stop;
    while left > 0 && start.elapsed() < DRAIN_DEADLINE {
        sleep(Duration::from_millis(20)).await;
        left = depth().await?;
    }
    let outbox = start.elapsed();
    let mut behind = 0;
    while start.elapsed() < DRAIN_DEADLINE {
        let appended = scrape(capture_ops).await?.get("herald_capture_events_appended_total").copied().unwrap_or(0.0);
        let applied = caches.iter().map(|c| c.applied().events).min().unwrap_or(0);
        behind = (appended as u64).saturating_sub(applied);
        if behind == 0 {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    Ok(Drain { depth_at_stop, outbox, applied: start.elapsed(), left, behind })
}

/// A `LISTEN bench_notify` session, as the seed-000 daemon would hold.
struct NotifyListener {
    _client: Client,
    received: Arc<AtomicU64>,
}

impl NotifyListener {
    async fn start(url: &str) -> anyhow::Result<Self> {
        let (client, mut connection) =
            tokio_postgres::connect(url, NoTls).await.context("failed to connect to postgres")?;
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(_) = message {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        client.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}")).await?;
        Ok(Self { _client: client, received })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until `target` notifications arrived or `deadline` passed.
    async fn wait_for(&self, target: u64, deadline: Duration) -> u64 {
        let start = Instant::now();
        while self.received() < target && start.elapsed() < deadline {
            sleep(Duration::from_millis(10)).await;
        }
        self.received()
    }
}

fn find(runs: &[TpsRun], variant: Variant, clients: usize) -> Option<&TpsRun> {
    runs.iter().find(|r| r.variant == variant && r.clients == clients)
}

fn client_counts(runs: &[TpsRun]) -> Vec<usize> {
    let mut counts: Vec<usize> = runs.iter().map(|r| r.clients).collect();
    counts.dedup();
    counts
}

fn throughput_table(runs: &[TpsRun], errors: &mut Vec<String>) -> Table {
    let mut t = Table::new("writer throughput: single-row INSERT, autocommit (transactions/s)");
    for clients in client_counts(runs) {
        let tps = |v| find(runs, v, clients).map_or(0.0, |r| r.load.tps);
        let plain = tps(Variant::Plain);
        t.row(format!("{clients} clients: plain table"), format!("{plain:.0}"));
        for variant in [Variant::HeraldCapture, Variant::Herald] {
            t.row(
                format!("{clients} clients: {}", variant.name()),
                format!("{:.0} ({:.2} × plain)", tps(variant), ratio(tps(variant), plain)),
            );
        }
        t.row(
            format!("{clients} clients: per-statement NOTIFY"),
            format!("{:.0} ({:.2} × plain)", tps(Variant::Notify), ratio(tps(Variant::Notify), plain)),
        );
        for run in [Variant::HeraldCapture, Variant::Herald].into_iter().filter_map(|v| find(runs, v, clients)) {
            t.row(format!("{clients} clients: capture during {}", run.variant.name()), capture_summary(&run.capture));
            if let Some(drain) = &run.drain {
                t.row(
                    format!("{clients} clients: herald outbox after run"),
                    format!(
                        "{} rows at stop, outbox empty after {:.0} ms, all applied at L1 after {:.0} ms{}",
                        drain.depth_at_stop,
                        drain.outbox.as_secs_f64() * 1000.0,
                        drain.applied.as_secs_f64() * 1000.0,
                        if drain.left > 0 || drain.behind > 0 {
                            format!(" ({} rows LEFT, {} events NOT APPLIED)", drain.left, drain.behind)
                        } else {
                            String::new()
                        }
                    ),
                );
                if drain.left > 0 || drain.behind > 0 {
                    errors.push(format!(
                        "{clients} clients: not drained after {} s ({} outbox rows, {} events not applied)",
                        DRAIN_DEADLINE.as_secs(),
                        drain.left,
                        drain.behind
                    ));
                }
            }
        }
        if let Some(run) = find(runs, Variant::Notify, clients) {
            t.row(
                format!("{clients} clients: notifications received"),
                format!("{} of {} commits", run.notified, run.load.committed),
            );
        }
        for run in runs.iter().filter(|r| r.clients == clients && r.load.errors > 0) {
            let first = run.load.first_error.as_deref().unwrap_or("");
            t.row(
                format!("{clients} clients: {} errors", run.variant.name()),
                format!("{} (first: {first})", run.load.errors),
            );
            errors.push(format!("{clients} clients, {}: {} failed inserts", run.variant.name(), run.load.errors));
        }
    }
    t
}

fn throughput_json(runs: &[TpsRun], json: &mut JsonLine) {
    for clients in client_counts(runs) {
        let tps = |v| find(runs, v, clients).map_or(0.0, |r| r.load.tps);
        json.set_f64(format!("tps_plain_{clients}"), tps(Variant::Plain), 0)
            .set_f64(format!("tps_herald_{clients}"), tps(Variant::HeraldCapture), 0)
            .set_f64(format!("tps_herald_all_{clients}"), tps(Variant::Herald), 0)
            .set_f64(format!("tps_notify_{clients}"), tps(Variant::Notify), 0)
            .set_f64(format!("tps_ratio_{clients}"), ratio(tps(Variant::HeraldCapture), tps(Variant::Plain)), 3)
            .set_f64(format!("tps_all_ratio_{clients}"), ratio(tps(Variant::Herald), tps(Variant::Plain)), 3)
            .set_f64(format!("tps_notify_ratio_{clients}"), ratio(tps(Variant::Notify), tps(Variant::Plain)), 3);
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

// ---------------------------------------------------------------- capture metrics

/// Capture's `/metrics`, unlabelled samples only.
async fn scrape(addr: SocketAddr) -> anyhow::Result<HashMap<String, f64>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: capture\r\nConnection: close\r\n\r\n").await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

/// Counters as differences, gauges as their last value.
fn metric_delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> HashMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            let counter = k.ends_with("_total") || k.ends_with("_sum") || k.ends_with("_count");
            (k.clone(), if counter { v - before.get(k).copied().unwrap_or(0.0) } else { *v })
        })
        .collect()
}

fn capture_summary(m: &HashMap<String, f64>) -> String {
    if m.is_empty() {
        return "(metrics unavailable)".into();
    }
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
    let lag_count = get("herald_capture_lag_seconds_count");
    let mean_lag_ms = if lag_count > 0.0 { get("herald_capture_lag_seconds_sum") / lag_count * 1000.0 } else { 0.0 };
    format!(
        "events {:.0}, batches {:.0}, doorbells {:.0}, errors {:.0}, mean statement→append {mean_lag_ms:.2} ms",
        get("herald_capture_events_appended_total"),
        get("herald_capture_batches_total"),
        get("herald_capture_doorbells_total"),
        get("herald_capture_errors_total"),
    )
}
