//! The latency run: single-row INSERTs committed on a fixed schedule by a
//! few writer connections; two independent L1 caches report every applied
//! event. The latency of an id at a cache is the time its event was applied
//! there minus the time its commit returned to the writer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use herald_core::l1::{Applied, L1Cache};
use herald_core::time::now_us;
use herald_proto::v1::InvalidationEvent;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};
use tokio_util::sync::CancellationToken;

use super::{Args, LATENCY_TABLE, SETTLE_DEADLINE, capture_summary, connect, metric_delta, scrape};
use crate::report::{JsonLine, Latencies, Table};

/// Tenants the latency run's commits cycle through, so that a partitioned
/// log gets events in every partition.
const TENANTS: u64 = 16;

/// What one cache saw of the latency table.
#[derive(Default)]
struct Watched {
    /// id → when its event was applied (first time).
    arrivals: HashMap<i64, i64>,
    duplicates: u64,
    lagged: u64,
    widened: u64,
    unparsable_ids: u64,
    /// Events of the latency table applied.
    events: u64,
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
        self.events += 1;
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
                Ok(Applied::Flushed { .. } | Applied::Watermark { .. }) => {}
                Err(RecvError::Lagged(n)) => watched.lagged += n,
                Err(RecvError::Closed) => break,
            }
        }
        watched
    })
}

/// A watcher on each cache, and how many ids each has seen so far.
struct Watchers {
    stop: CancellationToken,
    progress: [Arc<AtomicU64>; 2],
    watchers: [JoinHandle<Watched>; 2],
}

impl Watchers {
    fn spawn(caches: [&L1Cache; 2]) -> Self {
        let stop = CancellationToken::new();
        let progress = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        let watchers = [
            spawn_watcher(caches[0], progress[0].clone(), stop.clone()),
            spawn_watcher(caches[1], progress[1].clone(), stop.clone()),
        ];
        Self { stop, progress, watchers }
    }
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

pub(super) struct LatencyOutcome {
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
    pub(super) flushes: [u64; 2],
}

struct WriterResult {
    commits: Vec<(i64, i64)>,
    errors: u64,
    first_error: Option<String>,
}

pub(super) async fn latency_run(
    url: &str,
    args: &Args,
    caches: [&L1Cache; 2],
    capture_ops: SocketAddr,
) -> anyhow::Result<LatencyOutcome> {
    let Watchers { stop, progress, watchers } = Watchers::spawn(caches);
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
    pub(super) fn table(&self, args: &Args, on: &str, errors: &mut Vec<String>) -> Table {
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
    pub(super) fn json(&self, json: &mut JsonLine, prefix: &str) {
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

/// What the pipeline delivers when writers commit as fast as they can.
pub(super) struct Burst {
    pub(super) commits: u64,
    /// Events (one per transaction and tenant) the capture appended.
    pub(super) events: u64,
    /// Ids both caches had once the last one arrived (or the deadline).
    pub(super) delivered: u64,
    pub(super) expected: u64,
    /// From the first statement to the last id applied at both caches.
    pub(super) elapsed: Duration,
}

impl Burst {
    pub(super) fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(super) fn row(&self) -> String {
        format!(
            "{:.0} events/s ({} commits × {TENANTS} tenants, {} of {} rows at both caches, {:.2} s)",
            self.events_per_s(),
            self.commits,
            self.delivered,
            self.expected,
            self.elapsed.as_secs_f64()
        )
    }
}

/// `writers` connections each commit `per_writer` transactions of one row
/// per tenant (so each commit is [`TENANTS`] events, one per partition a
/// tenant hashes to) as fast as they can; the burst ends when both caches
/// have every row.
pub(super) async fn burst_run(
    url: &str,
    caches: [&L1Cache; 2],
    writers: usize,
    per_writer: u64,
) -> anyhow::Result<Burst> {
    let Watchers { stop, progress, watchers } = Watchers::spawn(caches);
    let insert = format!(
        "INSERT INTO {LATENCY_TABLE} (tenant_id, slug, val) \
         SELECT 'bench' || t, 'b' || $1::bigint || '.' || t, 0 FROM generate_series(0, {}) t",
        TENANTS - 1
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = connect(url).await?;
        let statement = client.prepare(&insert).await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let n = i64::try_from(w as u64 * per_writer + i)?;
                client.execute(&statement, &[&n]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let commits = writers as u64 * per_writer;
    let expected = commits * TENANTS;
    while progress.iter().any(|p| p.load(Ordering::Relaxed) < expected) && start.elapsed() < SETTLE_DEADLINE * 6 {
        sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    stop.cancel();
    let [wa, wb] = watchers;
    // Each cache applies every event: count the first one's.
    let (a, _) = (wa.await?, wb.await?);
    let delivered = progress.iter().map(|p| p.load(Ordering::Relaxed)).min().unwrap_or(0);
    Ok(Burst { commits, events: a.events, delivered, expected, elapsed })
}
