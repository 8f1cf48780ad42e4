//! `herald-bench coherence`: counts stale reads under writes and faults.
//!
//! Starts its own Redis server, capture, broadcast and two cache-api
//! processes (the release binaries next to this one), then runs the fault
//! schedule: each phase has writers changing rows through Postgres (values,
//! slug renames, deletes and re-inserts) and readers reading them through
//! both nodes by id and by slug over gRPC and HTTP, a fault injected a third
//! of the way in, then quiesce and a sweep of every layer. See
//! `herald_tests::coherence` for the definitions. `--redis-cluster` runs it
//! all on a Redis Cluster of its own, with a `CLUSTER FAILOVER` phase.
//! `--max-staleness-ms N` runs the nodes and near caches with that freshness
//! bound and judges every read against it: `stale_beyond_bound` must be 0 in
//! every phase (see `herald_tests::coherence::bound`).

use std::time::Duration;

use anyhow::bail;
use herald_tests::Source;
use herald_tests::coherence::bound::BoundReport;
use herald_tests::coherence::{Fault, PhaseReport, Settings, World};

use crate::report::{JsonLine, Table, cores};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of the steady-state phase (at the default read rate, 180 s
    /// gives over a million reads).
    #[arg(long, default_value_t = 180)]
    steady_seconds: u64,
    /// Seconds of each fault phase.
    #[arg(long, default_value_t = 20)]
    fault_seconds: u64,
    /// Phases, in order (steady, capture-killed, broadcast-killed,
    /// cache-api-killed, redis-clients-killed, redis-restart,
    /// postgres-terminated; redis-failover with --redis-cluster). Default:
    /// all of them, on a cluster redis-failover in place of the two
    /// single-server Redis faults.
    #[arg(long, value_delimiter = ',')]
    phases: Vec<Fault>,
    /// Run on a Redis Cluster of its own (3 masters with a replica each, 3
    /// log partitions, capture and broadcast waiting for 1 replica).
    #[arg(long)]
    redis_cluster: bool,
    /// Capture's source: outbox (on the configured Postgres) or wal (on a
    /// throwaway `wal_level = logical` cluster of its own).
    #[arg(long, default_value = "outbox")]
    source: String,
    /// A read older than this behind a commit is stale, in milliseconds.
    #[arg(long, default_value_t = 50)]
    window_ms: u64,
    #[arg(long, default_value_t = 100)]
    rows: usize,
    #[arg(long, default_value_t = 4)]
    writers: usize,
    #[arg(long, default_value_t = 24)]
    readers: usize,
    /// Reads per second over all readers; 0 reads as fast as possible
    /// (which saturates the CPU and then measures its scheduler).
    #[arg(long, default_value_t = 6000)]
    read_rate: u64,
    /// Readers of the near caches (herald-client in this process, one cache
    /// per node).
    #[arg(long, default_value_t = 2)]
    near_readers: usize,
    /// Near-cache reads per second over all near readers.
    #[arg(long, default_value_t = 8000)]
    near_read_rate: u64,
    /// Run the nodes with `cache.max_staleness_ms` (on_stale = bypass) and
    /// the near caches with `max_staleness`, and judge every read against it:
    /// stale beyond the bound = the value returned had been superseded more
    /// than this plus --window-ms before the read started.
    #[arg(long)]
    max_staleness_ms: Option<u64>,
}

const SINGLE_PHASES: &str =
    "steady,capture-killed,broadcast-killed,cache-api-killed,redis-clients-killed,redis-restart,postgres-terminated";
const CLUSTER_PHASES: &str =
    "steady,capture-killed,broadcast-killed,cache-api-killed,redis-failover,postgres-terminated";

pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.rows == 0 || args.writers == 0 || args.readers == 0 {
        bail!("--rows, --writers and --readers must be greater than 0");
    }
    if args.phases.is_empty() {
        let default = if args.redis_cluster { CLUSTER_PHASES } else { SINGLE_PHASES };
        args.phases =
            default.split(',').map(|p| p.parse().map_err(anyhow::Error::msg)).collect::<anyhow::Result<_>>()?;
    }
    let single_only = [Fault::RedisClients, Fault::RedisRestart];
    if args.redis_cluster && args.phases.iter().any(|p| single_only.contains(p)) {
        bail!(
            "redis-clients-killed and redis-restart act on a single Redis server; with --redis-cluster use redis-failover"
        );
    }
    if !args.redis_cluster && args.phases.contains(&Fault::Failover) {
        bail!("the redis-failover phase needs --redis-cluster");
    }
    let source = match args.source.as_str() {
        "wal" => Source::Wal,
        "outbox" => Source::Outbox,
        other => bail!("--source: {other:?} is neither wal nor outbox"),
    };
    let settings = Settings {
        source,
        rows: args.rows,
        writers: args.writers,
        readers: args.readers,
        window: Duration::from_millis(args.window_ms),
        read_rate: args.read_rate,
        near_readers: args.near_readers,
        near_read_rate: args.near_read_rate,
        cluster: args.redis_cluster,
        max_staleness: args.max_staleness_ms.map(Duration::from_millis),
        ..Settings::default()
    };
    let mut world = World::start(settings).await;
    let mut reports = Vec::new();
    for &phase in &args.phases {
        let seconds = if phase == Fault::Steady { args.steady_seconds } else { args.fault_seconds };
        eprintln!("phase {} ({seconds} s)…", phase.name());
        reports.push(world.run_phase(phase, Duration::from_secs(seconds)).await);
    }
    world.stop().await;

    let mut json = JsonLine::default();
    let (mut reads, mut stale, mut after, mut lag_p99) = (0u64, 0u64, 0u64, 0f64);
    let (mut near_reads, mut near_after, mut near_steady) = (0u64, 0u64, 0u64);
    for r in &reports {
        let mut t = table(r, args.window_ms);
        if let (Some(bound), Some(max)) = (&r.bound, args.max_staleness_ms) {
            bound_rows(&mut t, bound, max, args.window_ms);
        }
        println!("{}", t.render());
        reads += r.reads;
        stale += r.stale_beyond_window;
        after += r.stale_after_quiesce;
        lag_p99 = lag_p99.max(r.lag_p99_ms);
        near_reads += r.near_reads;
        near_after += r.near_stale_after_quiesce;
        if r.phase == Fault::Steady.name() {
            near_steady += r.near_stale_beyond_window;
        }
    }
    json.set("near_reads", near_reads).set("near_stale_after_quiesce", near_after);
    json.set("near_steady_stale_beyond_window", near_steady);
    json.set("reads", reads).set("stale_beyond_window", stale).set("stale_after_quiesce", after);
    json.set_f64("lag_p99_ms", lag_p99, 2).set("window_ms", args.window_ms);
    for r in &reports {
        let p = r.phase.replace('-', "_");
        json.set(format!("{p}_reads"), r.reads);
        json.set(format!("{p}_stale_beyond_window"), r.stale_beyond_window);
        json.set(format!("{p}_stale_after_quiesce"), r.stale_after_quiesce);
        json.set(format!("{p}_stale_during_fault"), r.stale_during);
        json.set_f64(format!("{p}_lag_p99_ms"), r.lag_p99_ms, 2);
        json.set(format!("{p}_near_reads"), r.near_reads);
        json.set(format!("{p}_near_stale_beyond_window"), r.near_stale_beyond_window);
        json.set(format!("{p}_near_stale_after_quiesce"), r.near_stale_after_quiesce);
        json.set(format!("{p}_near_stale_during_fault"), r.near_stale_during);
    }
    if let Some(max) = args.max_staleness_ms {
        bound_json(&mut json, &reports, max);
    }
    json.set("redis_cluster", u64::from(args.redis_cluster))
        .set("source", args.source.clone())
        .set("cores", cores() as u64);
    println!("{}", json.render());
    Ok(())
}

fn table(r: &PhaseReport, window_ms: u64) -> Table {
    let mut t = Table::new(format!("phase {}", r.phase));
    t.row("reads (errors)", format!("{} ({})", r.reads, r.read_errors));
    t.row("writes (errors)", format!("{} ({})", r.writes, r.write_errors));
    t.row(format!("stale beyond {window_ms} ms"), r.stale_beyond_window);
    if let Some((first, last)) = r.stale_span_ms {
        t.row(
            "  of which started",
            format!("{first:.0} ms to {last:.0} ms after the fault (it lasted {:.0} ms)", r.fault_ms),
        );
    }
    if r.stale_beyond_window > 0 {
        t.row(
            "  oldest superseding commit",
            format!("{:.1} ms before its read (slowest invalidation seen: {:.1} ms)", r.stale_oldest_ms, r.lag_max_ms),
        );
    }
    t.row("stale after quiesce", r.stale_after_quiesce);
    t.row("near-cache reads (errors)", format!("{} ({})", r.near_reads, r.near_read_errors));
    t.row(
        format!("near-cache stale beyond {window_ms} ms"),
        format!("{} ({} during the fault + 3 s)", r.near_stale_beyond_window, r.near_stale_during),
    );
    t.row("near-cache stale after quiesce", r.near_stale_after_quiesce);
    t.row("pipeline", &r.pipeline);
    t.row(
        "commit → every node applied",
        format!(
            "p50 {:.2} / p99 {:.2} / max {:.2} ms ({} writes unobserved: a watch not yet connected, or a node whose feed was down flushed)",
            r.lag_p50_ms, r.lag_p99_ms, r.lag_max_ms, r.lag_unobserved
        ),
    );
    for (i, e) in r.examples.iter().enumerate() {
        t.row(format!("example {}", i + 1), e);
    }
    t
}

/// The bound's rows of a phase's table.
fn bound_rows(t: &mut Table, b: &BoundReport, max_ms: u64, window_ms: u64) {
    t.row(format!("stale beyond the bound ({max_ms} + {window_ms} ms)"), b.stale_beyond_bound);
    if b.stale_beyond_bound + b.near_stale_beyond_bound > 0 {
        t.row("  oldest superseding commit", format!("{:.1} ms before its read", b.stale_oldest_ms));
    }
    t.row(
        "  reads from cache / postgres",
        format!("{} / {} (answers' layer: L1 or L2 / database)", b.reads_cached, b.reads_database),
    );
    t.row("  bypassed for the bound", format!("{} (nodes' metrics: {})", b.bypassed_total(), causes(&b.bypassed)));
    t.row("near-cache stale beyond the bound", b.near_stale_beyond_bound);
    t.row(
        "  near from RAM / bypassed for the bound",
        format!("{} / {} ({})", b.near_from_ram, b.near_bypassed_total(), causes(&b.near_bypassed)),
    );
}

fn causes(by_cause: &std::collections::BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = by_cause.iter().filter(|(_, n)| **n > 0).map(|(c, n)| format!("{c} {n}")).collect();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

/// The bound's keys of the JSON line: sums, then per phase.
fn bound_json(json: &mut JsonLine, reports: &[PhaseReport], max_ms: u64) {
    let judged: Vec<(&PhaseReport, &BoundReport)> =
        reports.iter().filter_map(|r| r.bound.as_ref().map(|b| (r, b))).collect();
    let sum = |f: fn(&BoundReport) -> u64| judged.iter().map(|(_, b)| f(b)).sum::<u64>();
    json.set("max_staleness_ms", max_ms);
    json.set("stale_beyond_bound", sum(|b| b.stale_beyond_bound));
    json.set("near_stale_beyond_bound", sum(|b| b.near_stale_beyond_bound));
    json.set("reads_cached", sum(|b| b.reads_cached)).set("reads_database", sum(|b| b.reads_database));
    json.set("bypassed", sum(BoundReport::bypassed_total));
    for (r, b) in judged {
        let p = r.phase.replace('-', "_");
        json.set(format!("{p}_stale_beyond_bound"), b.stale_beyond_bound);
        json.set(format!("{p}_near_stale_beyond_bound"), b.near_stale_beyond_bound);
        json.set(format!("{p}_reads_cached"), b.reads_cached);
        json.set(format!("{p}_reads_database"), b.reads_database);
        json.set(format!("{p}_bypassed"), b.bypassed_total());
        json.set(format!("{p}_near_from_ram"), b.near_from_ram);
        json.set(format!("{p}_near_bypassed"), b.near_bypassed_total());
    }
}
