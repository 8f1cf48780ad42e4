//! `herald-bench invalidation`: how long a commit takes to reach two L1
//! caches, and what capture costs the writers — for both capture sources,
//! on one throwaway cluster with `wal_level = logical` (so every row pays
//! the same WAL level) that flushes its WAL like a production server.
//!
//! 1. Latency: single-row INSERTs committed on a fixed schedule (`--rate`)
//!    by a few writer connections, into a table watched by the `--source`
//!    capture and by broadcast (child processes, as deployed); two
//!    independent L1 caches with their own subscribers report every applied
//!    event.
//!    Latency of an id at a cache is the time it was applied there minus
//!    the time its commit returned to the writer.
//! 2. Writer throughput: N connections run single-row statements in
//!    autocommit as fast as they can, against a plain table, an
//!    outbox-watched table (statement triggers; outbox capture draining), a
//!    WAL-watched table (publication, `REPLICA IDENTITY FULL`, no trigger;
//!    WAL capture streaming) and a table with the naive per-statement
//!    `pg_notify` trigger — INSERT and UPDATE of a non-key column, in
//!    `--rounds` rounds whose order rotates; ratios to plain are taken per
//!    round and their median reported. One more row runs the `--source`
//!    table with broadcast and two L1 holders on the same cores too. UPDATE
//!    and DELETE rows weigh the two ways to old images (`REPLICA IDENTITY
//!    FULL` against row triggers, in the same publication). CPU of the
//!    writers' backends, the walsender, capture and Redis comes from
//!    `/proc/<pid>/stat`.
//! 3. A burst: writers commit one row per tenant of 16 as fast as they can;
//!    events/s until both caches have every row.
//! 4. With `--redis-cluster`: the latency run and the burst again on a Redis
//!    Cluster of their own with `--partitions` log partitions, beside the
//!    single Redis of the same invocation.

mod cluster;
mod latency;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fred::interfaces::StreamsInterface as _;
use futures::StreamExt as _;
use herald_core::config::{BroadcastConfig, CaptureConfig, Config, L1Config, PostgresConfig, TableConfig};
use herald_tests::process::ChildService;
use herald_tests::{Sandbox, Source, free_port, logical};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, sleep};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use self::latency::{Burst, LatencyOutcome, burst_run, latency_run};
use crate::procstat;
use crate::report::{JsonLine, Table, cores};

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
    #[arg(long, default_value_t = 5)]
    tps_seconds: u64,
    /// Rounds of every throughput row; the order of the variants rotates.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The capture source of the latency run, of `tps_ratio_*` and of the
    /// everything-running row: wal or outbox.
    #[arg(long, default_value = "wal")]
    source: String,
    /// Transactions of each burst (16 rows, one per tenant, each).
    #[arg(long, default_value_t = 4_000)]
    burst_commits: u64,
    /// Also run the latency run and the burst on a Redis Cluster of their own
    /// (3 masters with a replica each; capture and broadcast wait for one
    /// replica), after the single-Redis ones, with the same load.
    #[arg(long)]
    redis_cluster: bool,
    /// Log partitions of the cluster run.
    #[arg(long, default_value_t = 3)]
    partitions: u16,
}

const LATENCY_TABLE: &str = "bench_latency";
const PLAIN_TABLE: &str = "bench_plain";
const OUTBOX_TABLE: &str = "bench_outbox";
const WAL_TABLE: &str = "bench_wal";
/// In the same publication, old images by row triggers (`capture.old_images
/// = "triggers"`) instead of `REPLICA IDENTITY FULL`.
const TRIGGERS_TABLE: &str = "bench_triggers";
const NOTIFY_TABLE: &str = "bench_notify";
const NOTIFY_CHANNEL: &str = "bench_notify";
const WARMUP: Duration = Duration::from_secs(1);
/// How long the latency run waits for the last invalidations after the
/// last commit.
const SETTLE_DEADLINE: Duration = Duration::from_secs(10);
/// How long capture may take to catch up after a throughput run.
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);
/// Rows each client owns for UPDATE runs.
const ROWS_PER_CLIENT: i64 = 100;

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
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_stmt();
CREATE TRIGGER bench_notify_upd AFTER UPDATE ON bench_notify
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_stmt();";

fn table_sql(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (id bigserial PRIMARY KEY, tenant_id text NOT NULL, slug text NOT NULL, val int NOT NULL);"
    )
}

/// Rows the UPDATE runs change (ids 1 ..= clients × ROWS_PER_CLIENT).
fn seed_sql(name: &str, rows: i64) -> String {
    format!(
        "INSERT INTO {name} (tenant_id, slug, val) SELECT 'tenant' || (g % 4), 'seed' || g, 0 \
         FROM generate_series(1, {rows}) g;"
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
        watch_columns: vec!["val".into()],
    }
}

/// The sandbox's test timings back to production defaults (ops servers stay
/// on ephemeral ports; the source and slot stay).
fn production_timings(config: &mut Config) {
    config.postgres.pool_size = PostgresConfig::default().pool_size;
    config.capture = CaptureConfig {
        ops_addr: format!("127.0.0.1:{}", free_port()),
        source: config.capture.source,
        slot: config.capture.slot.clone(),
        ..CaptureConfig::default()
    };
    config.broadcast = BroadcastConfig { ops_addr: "127.0.0.1:0".into(), ..BroadcastConfig::default() };
    config.l1 = L1Config::default();
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.rate == 0 || args.seconds == 0 || args.tps_seconds == 0 || args.writers == 0 || args.rounds == 0 {
        bail!("--rate, --seconds, --tps-seconds, --writers and --rounds must be greater than 0");
    }
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients must list connection counts greater than 0");
    }
    if args.burst_commits < cluster::BURST_WRITERS as u64 {
        bail!("--burst-commits must be at least {}", cluster::BURST_WRITERS);
    }
    if args.redis_cluster && !(1..=herald_core::keys::MAX_PARTITIONS).contains(&args.partitions) {
        bail!("--partitions must be 1 to {}", herald_core::keys::MAX_PARTITIONS);
    }
    let source = match args.source.as_str() {
        "wal" => Source::Wal,
        "outbox" => Source::Outbox,
        other => bail!("--source: {other:?} is neither wal nor outbox"),
    };
    eprintln!("starting a throwaway cluster (wal_level = logical, fsync on)");
    let admin = tokio::task::spawn_blocking(|| logical::durable_cluster().admin_url()).await?;
    let mut wal = Sandbox::start_at(admin.clone(), Source::Wal, production_timings).await;
    let mut outbox = Sandbox::start_at(admin.clone(), Source::Outbox, production_timings).await;
    let result = measure(&mut wal, &mut outbox, source, &args).await;
    wal.cleanup().await;
    outbox.cleanup().await;
    let (latency, burst, throughput) = result?;
    let cluster = if args.redis_cluster { Some(cluster::run(admin, source, &args).await?) } else { None };

    let mut errors = Vec::new();
    let mut single = latency.table(&args, "one Redis, 1 partition", &mut errors);
    single.row("burst", burst.row());
    println!("{}", single.render());
    if let Some(cluster) = &cluster {
        let on = format!("Redis Cluster, 3 masters + 3 replicas, {} partitions, WAIT 1", args.partitions);
        let mut table = cluster.latency.table(&args, &on, &mut errors);
        table.row("burst", cluster.burst.row());
        println!("{}", table.render());
    }
    println!("{}", throughput.table(source, &mut errors).render());
    let mut json = JsonLine::default();
    latency.json(&mut json, "");
    json.set_f64("events_per_s", burst.events_per_s(), 0);
    if let Some(cluster) = &cluster {
        cluster.latency.json(&mut json, "cluster_");
        json.set_f64("cluster_events_per_s", cluster.burst.events_per_s(), 0);
        json.set("partitions", u64::from(args.partitions));
    }
    throughput.json(source, &mut json);
    json.set("source", args.source.clone()).set("cores", cores() as u64).set("errors", errors.len() as u64);
    println!("{}", json.render());
    if !errors.is_empty() {
        bail!("benchmark had errors: {}", errors.join("; "));
    }
    Ok(())
}

/// A capture child process and where its metrics are.
struct CaptureProcess {
    child: ChildService,
    ops: SocketAddr,
}

impl CaptureProcess {
    fn spawn(sandbox: &Sandbox) -> anyhow::Result<Self> {
        let ops = sandbox.config.capture.ops_addr.parse()?;
        Ok(Self { child: ChildService::spawn("herald-capture", &sandbox.config), ops })
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        while scrape(self.ops).await.is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("capture at {} never served /metrics", self.ops);
            }
            sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

async fn measure(
    wal: &mut Sandbox,
    outbox: &mut Sandbox,
    source: Source,
    args: &Args,
) -> anyhow::Result<(LatencyOutcome, Burst, Throughput)> {
    let max_clients = args.clients.iter().copied().max().unwrap_or(1) as i64;
    let seeded = max_clients * ROWS_PER_CLIENT;
    let mut sql: String = [LATENCY_TABLE, PLAIN_TABLE, WAL_TABLE, TRIGGERS_TABLE, NOTIFY_TABLE].map(table_sql).concat();
    for table in [PLAIN_TABLE, WAL_TABLE, TRIGGERS_TABLE, NOTIFY_TABLE] {
        sql.push_str(&seed_sql(table, seeded));
    }
    // After the seed rows: one NOTIFY of all their ids would not fit.
    sql.push_str(NOTIFY_TRIGGER);
    wal.sql(&sql).await;
    outbox
        .sql(&format!("{}{}{}", table_sql(LATENCY_TABLE), table_sql(OUTBOX_TABLE), seed_sql(OUTBOX_TABLE, seeded)))
        .await;
    wal.config.tables = vec![watched(LATENCY_TABLE), watched(WAL_TABLE), watched(TRIGGERS_TABLE)];
    outbox.config.tables = vec![watched(LATENCY_TABLE), watched(OUTBOX_TABLE)];
    wal.install().await;
    outbox.install().await;
    // The triggers table as `old_images = "triggers"` installs it: its own
    // identity back, its triggers typed from the catalog (the publication
    // still sends its deletes' keys, which capture ignores).
    let catalog = herald_capture::install::column_types(&connect(&wal.config.postgres.url).await?, &wal.config).await?;
    let triggers = watched(TRIGGERS_TABLE);
    wal.sql(&format!(
        "{}{}",
        herald_capture::wal::schema::replica_identity_restore_sql(&[watched(LATENCY_TABLE), watched(WAL_TABLE)]),
        herald_capture::wal::schema::table_sql(&triggers, &catalog[TRIGGERS_TABLE])
    ))
    .await;
    let captures = [CaptureProcess::spawn(wal)?, CaptureProcess::spawn(outbox)?];
    for capture in &captures {
        capture.ready().await?;
    }
    let (chosen, chosen_capture) = match source {
        Source::Wal => (&*wal, &captures[0]),
        Source::Outbox => (&*outbox, &captures[1]),
    };
    let mut broadcast = Some(ChildService::spawn("herald-broadcast", &chosen.config));
    let a = chosen.l1().await;
    let b = chosen.l1().await;

    eprintln!("latency ({}): {} commits/s for {} s, {} writers", args.source, args.rate, args.seconds, args.writers);
    let url = chosen.config.postgres.url.clone();
    let mut latency = latency_run(&url, args, [&a.cache, &b.cache], chosen_capture.ops).await?;
    latency.flushes = [a.cache.metrics().flushes.get(), b.cache.metrics().flushes.get()];
    eprintln!("burst ({})", args.source);
    let per_writer = args.burst_commits / cluster::BURST_WRITERS as u64;
    let burst = burst_run(&url, [&a.cache, &b.cache], cluster::BURST_WRITERS, per_writer).await?;

    let listener = NotifyListener::start(&wal.config.postgres.url).await?;
    let slot = wal.config.capture.slot.clone();
    let redis_pid = procstat::redis_pid(&wal.redis).await?;
    let mut throughput = Throughput::default();
    let target = |variant: Variant| -> (&Sandbox, &'static str) {
        match variant {
            Variant::Plain => (&*wal, PLAIN_TABLE),
            Variant::Outbox => (&*outbox, OUTBOX_TABLE),
            Variant::Wal => (&*wal, WAL_TABLE),
            Variant::Notify => (&*wal, NOTIFY_TABLE),
            Variant::Triggers => (&*wal, TRIGGERS_TABLE),
            Variant::All => match source {
                Source::Wal => (&*wal, WAL_TABLE),
                Source::Outbox => (&*outbox, OUTBOX_TABLE),
            },
        }
    };
    let mut delete_base = 1_000_000_000i64;
    for round in 0..args.rounds {
        for &clients in &args.clients {
            for op in [Op::Insert, Op::Update, Op::Delete] {
                let mut variants: Vec<Variant> = match op {
                    Op::Delete if clients != max_clients as usize => continue,
                    Op::Delete => vec![Variant::Plain, Variant::Wal, Variant::Triggers],
                    Op::Update => {
                        vec![Variant::Plain, Variant::Outbox, Variant::Wal, Variant::Triggers, Variant::Notify]
                    }
                    Op::Insert if clients == max_clients as usize => {
                        vec![Variant::Plain, Variant::Outbox, Variant::Wal, Variant::Notify, Variant::All]
                    }
                    _ => vec![Variant::Plain, Variant::Outbox, Variant::Wal, Variant::Notify],
                };
                let shift = round % variants.len();
                variants.rotate_left(shift);
                for variant in variants {
                    let (sandbox, table) = target(variant);
                    let url = sandbox.config.postgres.url.clone();
                    eprintln!(
                        "round {}: {} {} with {clients} clients for {} s",
                        round + 1,
                        op.name(),
                        variant.name(),
                        args.tps_seconds
                    );
                    // Broadcast runs only in the everything-running row.
                    if variant == Variant::All {
                        if broadcast.is_none() {
                            broadcast = Some(ChildService::spawn("herald-broadcast", &chosen.config));
                        }
                    } else if let Some(running) = broadcast.take() {
                        running.stop().await;
                    }
                    if op == Op::Delete {
                        // Enough rows for any rate this machine reaches.
                        let rows = 40_000 * args.tps_seconds as i64;
                        sandbox
                            .sql(&format!(
                                "INSERT INTO {table} (id, tenant_id, slug, val) SELECT g, 'tenant' || (g % 4), 'd' || g, 0 \
                                 FROM generate_series({delete_base}, {}) g",
                                delete_base + rows - 1
                            ))
                            .await;
                        settle(wal, outbox, &slot, &captures).await?;
                    }
                    let pids = Pids {
                        walsender: walsender_pid(wal, &slot).await,
                        captures: captures.iter().filter_map(|c| c.child.pid()).collect(),
                        redis: redis_pid,
                    };
                    let notified = listener.received();
                    let load = writer_load(
                        &url,
                        table,
                        op,
                        clients,
                        delete_base,
                        Duration::from_secs(args.tps_seconds),
                        &pids,
                    )
                    .await?;
                    if op == Op::Delete {
                        delete_base += 100_000_000;
                    }
                    let drained = settle(wal, outbox, &slot, &captures).await?;
                    let notified =
                        listener.wait_for(notified + load.committed, Duration::from_secs(5)).await - notified;
                    throughput.runs.push(TpsRun { round, variant, op, clients, load, drained, notified });
                }
            }
        }
    }
    if broadcast.is_none() {
        broadcast = Some(ChildService::spawn("herald-broadcast", &chosen.config));
    }
    let _broadcast = broadcast;
    for capture in captures {
        capture.child.kill().await;
    }
    Ok((latency, burst, throughput))
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.context("failed to connect to postgres")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

// ---------------------------------------------------------------- throughput

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Plain,
    /// Outbox statement triggers; outbox capture draining.
    Outbox,
    /// In the publication with `REPLICA IDENTITY FULL`, no trigger; WAL
    /// capture streaming.
    Wal,
    Notify,
    /// In the publication, old images by row triggers (the update one does
    /// not fire on these statements; the delete one does).
    Triggers,
    /// The `--source` table with broadcast and two L1 holders running too.
    All,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Outbox => "outbox",
            Variant::Wal => "wal",
            Variant::Notify => "notify",
            Variant::Triggers => "wal, old images by triggers",
            Variant::All => "source+broadcast+2 L1",
        }
    }
}

/// CPU time over a measured run, milliseconds.
#[derive(Default, Clone, Copy)]
struct Cpu {
    backends: f64,
    walsender: f64,
    capture_wal: f64,
    capture_outbox: f64,
    redis: f64,
}

impl Cpu {
    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            backends: self.backends - before.backends,
            walsender: self.walsender - before.walsender,
            capture_wal: self.capture_wal - before.capture_wal,
            capture_outbox: self.capture_outbox - before.capture_outbox,
            redis: self.redis - before.redis,
        }
    }
}

struct Load {
    tps: f64,
    /// Commits during warm-up and measurement.
    committed: u64,
    /// Commits during measurement.
    measured: u64,
    errors: u64,
    first_error: Option<String>,
    cpu: Cpu,
}

struct TpsRun {
    round: usize,
    variant: Variant,
    op: Op,
    clients: usize,
    load: Load,
    /// Until both captures had caught up after the run.
    drained: Duration,
    notified: u64,
}

/// Processes whose CPU is measured besides the writers' backends.
struct Pids {
    walsender: Option<u32>,
    /// WAL capture, outbox capture.
    captures: Vec<u32>,
    redis: u32,
}

fn cpu_ms(pid: u32) -> Option<f64> {
    procstat::cpu_seconds(pid).map(|s| s * 1000.0)
}

fn cpu_now(backends: &[u32], pids: &Pids) -> Cpu {
    Cpu {
        backends: backends.iter().filter_map(|&p| cpu_ms(p)).sum(),
        walsender: pids.walsender.and_then(cpu_ms).unwrap_or(0.0),
        capture_wal: pids.captures.first().and_then(|&p| cpu_ms(p)).unwrap_or(0.0),
        capture_outbox: pids.captures.get(1).and_then(|&p| cpu_ms(p)).unwrap_or(0.0),
        redis: cpu_ms(pids.redis).unwrap_or(0.0),
    }
}

async fn walsender_pid(wal: &Sandbox, slot: &str) -> Option<u32> {
    let client = connect(&wal.config.postgres.url).await.ok()?;
    let row =
        client.query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await.ok()??;
    row.get::<_, Option<i32>>(0).and_then(|p| u32::try_from(p).ok())
}

/// `clients` connections running `op` in autocommit against `table`: 1 s
/// warm-up, then `duration` measured.
async fn writer_load(
    url: &str,
    table: &str,
    op: Op,
    clients: usize,
    delete_base: i64,
    duration: Duration,
    pids: &Pids,
) -> anyhow::Result<Load> {
    let sql = match op {
        Op::Insert => format!("INSERT INTO {table} (tenant_id, slug, val) VALUES ($1, $2, $3)"),
        Op::Update => format!("UPDATE {table} SET val = val + 1 WHERE id = $1"),
        Op::Delete => format!("DELETE FROM {table} WHERE id = $1"),
    };
    let connections = futures::future::try_join_all((0..clients).map(|_| async {
        let client = connect(url).await?;
        let statement = client.prepare(&sql).await?;
        let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        anyhow::Ok((client, statement, pid as u32))
    }))
    .await?;
    let backends: Vec<u32> = connections.iter().map(|(_, _, pid)| *pid).collect();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(i, (client, statement, _))| {
            let (count, stop) = (count.clone(), stop.clone());
            tokio::spawn(async move {
                let tenant = format!("tenant{}", i % 4);
                let (mut n, mut errors, mut first_error) = (0i64, 0u64, None);
                while !stop.load(Ordering::Relaxed) {
                    let result = match op {
                        Op::Insert => {
                            let slug = format!("c{i}-{n}");
                            let val = i32::try_from(n % 1_000_000).unwrap_or(0);
                            client.execute(&statement, &[&tenant, &slug, &val]).await
                        }
                        Op::Update => {
                            let id = i as i64 * ROWS_PER_CLIENT + 1 + n % ROWS_PER_CLIENT;
                            client.execute(&statement, &[&id]).await
                        }
                        Op::Delete => {
                            let id = delete_base + i as i64 + n * clients as i64;
                            client.execute(&statement, &[&id]).await
                        }
                    };
                    match result {
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
    let (c0, t0, cpu0) = (count.load(Ordering::Relaxed), Instant::now(), cpu_now(&backends, pids));
    sleep(duration).await;
    let (c1, t1, cpu1) = (count.load(Ordering::Relaxed), Instant::now(), cpu_now(&backends, pids));
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
        measured: c1 - c0,
        errors,
        first_error,
        cpu: cpu1.since(cpu0),
    })
}

/// Waits until the outbox is empty and the slot has confirmed the WAL
/// written so far, then empties both event streams (broadcast does not run
/// during these rows; the stream must not reach capture's backpressure
/// length), so the next run starts quiet.
async fn settle(
    wal: &Sandbox,
    outbox: &Sandbox,
    slot: &str,
    captures: &[CaptureProcess; 2],
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let wal_client = connect(&wal.config.postgres.url).await?;
    let outbox_client = connect(&outbox.config.postgres.url).await?;
    let target: String = wal_client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    loop {
        let depth: i64 = outbox_client.query_one("SELECT count(*) FROM herald.outbox", &[]).await?.get(0);
        let behind: i64 = wal_client
            .query_one(
                "SELECT coalesce(pg_wal_lsn_diff($1::text::pg_lsn, confirmed_flush_lsn), 1)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $2",
                &[&target, &slot],
            )
            .await?
            .get(0);
        if depth == 0 && behind <= 0 {
            break;
        }
        if start.elapsed() > DRAIN_DEADLINE {
            bail!(
                "captures did not catch up within {} s (outbox {depth} rows, slot {behind} bytes behind)",
                DRAIN_DEADLINE.as_secs()
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    let drained = start.elapsed();
    for (sandbox, capture) in [(wal, &captures[0]), (outbox, &captures[1])] {
        if scrape(capture.ops).await.is_err() {
            bail!("a capture process stopped serving /metrics");
        }
        let _: i64 = sandbox.redis.next().xtrim(sandbox.keys.stream(), ("MAXLEN", "=", 0)).await?;
    }
    Ok(drained)
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

#[derive(Default)]
struct Throughput {
    runs: Vec<TpsRun>,
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}

impl Throughput {
    fn run(&self, round: usize, variant: Variant, op: Op, clients: usize) -> Option<&TpsRun> {
        self.runs.iter().find(|r| r.round == round && r.variant == variant && r.op == op && r.clients == clients)
    }

    fn rounds(&self) -> usize {
        self.runs.iter().map(|r| r.round + 1).max().unwrap_or(0)
    }

    /// Ratio to plain of the same round, per round.
    fn ratios(&self, variant: Variant, op: Op, clients: usize) -> Vec<f64> {
        (0..self.rounds())
            .filter_map(|round| {
                let plain = self.run(round, Variant::Plain, op, clients)?.load.tps;
                Some(ratio(self.run(round, variant, op, clients)?.load.tps, plain))
            })
            .collect()
    }

    fn median_ratio(&self, variant: Variant, op: Op, clients: usize) -> f64 {
        median(self.ratios(variant, op, clients))
    }

    fn median_tps(&self, variant: Variant, op: Op, clients: usize) -> f64 {
        median(
            self.runs
                .iter()
                .filter(|r| r.variant == variant && r.op == op && r.clients == clients)
                .map(|r| r.load.tps)
                .collect(),
        )
    }

    /// Median CPU microseconds per commit of `variant`'s runs.
    fn cpu_per_commit(&self, variant: Variant, op: Op, clients: usize) -> [f64; 5] {
        let runs: Vec<&TpsRun> =
            self.runs.iter().filter(|r| r.variant == variant && r.op == op && r.clients == clients).collect();
        let per = |f: fn(&Cpu) -> f64| {
            median(runs.iter().map(|r| f(&r.load.cpu) * 1000.0 / r.load.measured.max(1) as f64).collect())
        };
        [per(|c| c.backends), per(|c| c.walsender), per(|c| c.capture_wal), per(|c| c.capture_outbox), per(|c| c.redis)]
    }

    fn client_counts(&self) -> Vec<usize> {
        let mut counts: Vec<usize> = self.runs.iter().map(|r| r.clients).collect();
        counts.sort_unstable();
        counts.dedup();
        counts
    }

    fn table(&self, source: Source, errors: &mut Vec<String>) -> Table {
        let mut t = Table::new(format!(
            "writer throughput: single-row statements, autocommit, transactions/s per round (× plain of the same \
             round); {} rounds, order rotated; median of the ratios",
            self.rounds()
        ));
        for op in [Op::Insert, Op::Update, Op::Delete] {
            for clients in self.client_counts() {
                for variant in
                    [Variant::Plain, Variant::Outbox, Variant::Wal, Variant::Triggers, Variant::Notify, Variant::All]
                {
                    let runs: Vec<&TpsRun> =
                        (0..self.rounds()).filter_map(|r| self.run(r, variant, op, clients)).collect();
                    if runs.is_empty() {
                        continue;
                    }
                    let per_round: Vec<String> = runs
                        .iter()
                        .map(|r| match self.run(r.round, Variant::Plain, op, clients) {
                            Some(plain) if variant != Variant::Plain => {
                                format!("{:.0} ({:.2})", r.load.tps, ratio(r.load.tps, plain.load.tps))
                            }
                            _ => format!("{:.0}", r.load.tps),
                        })
                        .collect();
                    let summary = if variant == Variant::Plain {
                        format!("median {:.0}", self.median_tps(variant, op, clients))
                    } else {
                        format!("median {:.2} × plain", self.median_ratio(variant, op, clients))
                    };
                    let name = if variant == Variant::All {
                        format!("{} ({})", variant.name(), source_name(source))
                    } else {
                        variant.name().to_string()
                    };
                    t.row(
                        format!("{} {clients} clients: {name}", op.name()),
                        format!("{} — {summary}", per_round.join(", ")),
                    );
                }
                for variant in [Variant::Plain, Variant::Outbox, Variant::Wal, Variant::Triggers] {
                    let [backends, walsender, capture_wal, capture_outbox, redis] =
                        self.cpu_per_commit(variant, op, clients);
                    if self.run(0, variant, op, clients).is_none() {
                        continue;
                    }
                    t.row(
                        format!("{} {clients} clients: {} CPU µs/commit", op.name(), variant.name()),
                        format!(
                            "backends {backends:.0}, walsender {walsender:.0}, capture(wal) {capture_wal:.0}, \
                             capture(outbox) {capture_outbox:.0}, redis {redis:.0}"
                        ),
                    );
                }
            }
        }
        for run in &self.runs {
            if run.load.errors > 0 {
                let first = run.load.first_error.as_deref().unwrap_or("");
                errors.push(format!(
                    "round {} {} {} {} clients: {} failed statements (first: {first})",
                    run.round + 1,
                    run.op.name(),
                    run.variant.name(),
                    run.clients,
                    run.load.errors
                ));
            }
            if run.variant == Variant::Notify && run.op == Op::Insert && run.notified < run.load.committed {
                t.row(
                    format!("round {} notify {} clients", run.round + 1, run.clients),
                    format!("{} notifications of {} commits", run.notified, run.load.committed),
                );
            }
        }
        let slowest = self.runs.iter().map(|r| r.drained).max().unwrap_or_default();
        t.row("captures caught up after each run within", format!("{:.0} ms", slowest.as_secs_f64() * 1000.0));
        t
    }

    fn json(&self, source: Source, json: &mut JsonLine) {
        let chosen = match source {
            Source::Wal => Variant::Wal,
            Source::Outbox => Variant::Outbox,
        };
        for clients in self.client_counts() {
            json.set_f64(format!("tps_plain_{clients}"), self.median_tps(Variant::Plain, Op::Insert, clients), 0)
                .set_f64(format!("tps_ratio_{clients}"), self.median_ratio(chosen, Op::Insert, clients), 3)
                .set_f64(format!("tps_update_ratio_{clients}"), self.median_ratio(chosen, Op::Update, clients), 3);
            for variant in [Variant::Wal, Variant::Outbox, Variant::Notify] {
                json.set_f64(
                    format!("tps_{}_ratio_{clients}", variant.name()),
                    self.median_ratio(variant, Op::Insert, clients),
                    3,
                )
                .set_f64(
                    format!("tps_update_{}_ratio_{clients}", variant.name()),
                    self.median_ratio(variant, Op::Update, clients),
                    3,
                );
            }
            if self.run(0, Variant::All, Op::Insert, clients).is_some() {
                json.set_f64(
                    format!("tps_{}_all_ratio_{clients}", source_name(source)),
                    self.median_ratio(Variant::All, Op::Insert, clients),
                    3,
                );
            }
            if self.run(0, Variant::Wal, Op::Delete, clients).is_some() {
                json.set_f64(
                    format!("tps_delete_ratio_{clients}"),
                    self.median_ratio(Variant::Wal, Op::Delete, clients),
                    3,
                )
                .set_f64(
                    format!("tps_delete_triggers_ratio_{clients}"),
                    self.median_ratio(Variant::Triggers, Op::Delete, clients),
                    3,
                );
            }
            if self.run(0, Variant::Triggers, Op::Update, clients).is_some() {
                json.set_f64(
                    format!("tps_update_triggers_ratio_{clients}"),
                    self.median_ratio(Variant::Triggers, Op::Update, clients),
                    3,
                );
            }
            let [backends, walsender, capture_wal, _, _] = self.cpu_per_commit(Variant::Wal, Op::Insert, clients);
            json.set_f64(format!("cpu_us_per_commit_backends_wal_{clients}"), backends, 1)
                .set_f64(format!("cpu_us_per_commit_walsender_{clients}"), walsender, 1)
                .set_f64(format!("cpu_us_per_commit_capture_wal_{clients}"), capture_wal, 1);
            let [backends, _, _, capture_outbox, _] = self.cpu_per_commit(Variant::Outbox, Op::Insert, clients);
            json.set_f64(format!("cpu_us_per_commit_backends_outbox_{clients}"), backends, 1).set_f64(
                format!("cpu_us_per_commit_capture_outbox_{clients}"),
                capture_outbox,
                1,
            );
        }
    }
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Wal => "wal",
        Source::Outbox => "outbox",
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
