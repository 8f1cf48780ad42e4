//! Capture: Postgres changes into Herald's durable event log.
//!
//! Two sources (`capture.source`, see `source.rs`): the WAL source streams a
//! logical replication slot (`wal/`), and writers pay almost nothing. The
//! outbox source, for databases without `wal_level = logical`:
//! writers' statement triggers put one row per statement, table and chunk of
//! rows into `herald.outbox`, inside the writer's transaction. Capture drains
//! the outbox in bounded batches, appends protobuf `InvalidationEvent`s to the
//! Redis stream (one per outbox row, tenant and chunk of ids), and deletes the
//! rows it appended. It sleeps on a doorbell (`NOTIFY`, rung by writers only
//! while capture is idle), drains continuously while busy, and polls slowly as
//! a backstop.

pub mod append;
pub mod doorbell;
pub mod drain;
pub mod error;
pub mod events;
pub mod install;
pub mod metrics;
pub mod schema;
pub mod source;
pub mod status;
pub mod wal;
pub mod watermark;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use fred::prelude::*;
use herald_core::backoff::Backoff;
use herald_core::config::{Config, ms};
use herald_core::keys::KeySpace;
use herald_core::ops;
use herald_core::stream::EventLog;
use tokio::net::TcpListener;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use crate::append::Appender;
use crate::doorbell::{Doorbell, Wake};
use crate::drain::Drainer;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::source::Source;

/// Longest sleep between polls of an empty outbox while busy.
const BUSY_POLL_MAX: Duration = Duration::from_millis(8);

/// Runs capture until `shutdown` fires. Serves `/healthz`, `/readyz` and
/// `/metrics` on `ops`. Returns after the batch in flight has committed.
pub async fn run(config: Config, ops: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Metrics::default();
    let (readiness, ops_task) = ops::start(ops, |registry| metrics.register(registry), &config.http, shutdown.clone());

    let keys = KeySpace::new(&config.env)?;
    // Every write capture makes (drains, dead letters, the doorbell lease)
    // may be lost in a crash without harm: a lost drain commit only means
    // its rows are appended again (duplicates are harmless). So its commits
    // skip the WAL flush wait and do not add to the flushes writers wait on.
    let pool = herald_core::pg::pool_with_settings(&config.postgres, &[("synchronous_commit", "off")])?;
    let redis = herald_core::redis::build_pool(&config.redis)?;
    let _connections = redis.connect();
    let log = EventLog::new(&keys, config.redis.partitions);
    let appender = Appender::new(&config, redis.clone(), log.clone(), metrics.clone());
    let drainer = Drainer::new(&config, pool.clone(), appender.clone(), metrics.clone());
    let pg_ready = readiness.flag("postgres");
    let redis_ready = readiness.flag("redis");

    let Some(source) = resolve_source(&config, &pool, &shutdown).await? else { return Ok(()) };
    if source == Source::Wal {
        tracing::info!(stream = %keys.stream(), slot = %config.capture.slot, tables = config.tables.len(), "capture started (wal source)");
        let mut backoff = Backoff::reconnect();
        while !shutdown.is_cancelled() {
            match ensure_groups(&redis, &log, &config.broadcast.group).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, "cannot create the consumer group; retrying");
                    pause(&shutdown, backoff.next_delay()).await;
                }
            }
        }
        // Rows an earlier outbox installation left behind go first.
        while let Ok(drained) = drainer.drain_once().await {
            if drained.rows == 0 {
                break;
            }
        }
        let sampler = tokio::spawn(sample_slot(config.clone(), metrics.clone(), shutdown.clone()));
        let appended = Arc::new(AtomicU64::new(0));
        let confirm = watermark::Confirm::AppendedThrough(appended.clone());
        let watermarks =
            tokio::spawn(watermark::run(pool.clone(), appender.clone(), confirm, metrics.clone(), shutdown.clone()));
        let ready = wal::Readiness { postgres: pg_ready, redis: redis_ready };
        let result = wal::run(config, appender, appended, metrics, ready, shutdown).await;
        sampler.abort();
        watermarks.abort();
        let _ = redis.quit().await;
        let _ = ops_task.await;
        return result;
    }
    let sampler = tokio::spawn(sample_depth(pool.clone(), metrics.clone(), shutdown.clone()));
    let watermarks = tokio::spawn(watermark::run(
        pool.clone(),
        appender.clone(),
        watermark::Confirm::OutboxDrained,
        metrics.clone(),
        shutdown.clone(),
    ));
    let bell_ready = readiness.flag("doorbell");
    let mut bell = Doorbell::new(config.postgres.clone(), pool.clone());
    let mut backoff = Backoff::reconnect();
    let mut group_ready = false;
    let mut last_rows = Instant::now();
    let mut busy_poll = Duration::from_millis(1);
    let mut pressure_checked = Instant::now() - Duration::from_secs(1);
    let idle_poll = ms(config.capture.poll_interval_ms);
    let linger = ms(config.capture.linger_ms);
    tracing::info!(streams = ?log.streams(), tables = config.tables.len(), "capture started");

    while !shutdown.is_cancelled() {
        if !bell.is_connected() {
            match bell.connect().await {
                Ok(()) => bell_ready.set(true),
                Err(error) => {
                    bell_ready.set(false);
                    tracing::warn!(%error, "doorbell connection failed; polling");
                }
            }
        }
        if !group_ready {
            match ensure_groups(&redis, &log, &config.broadcast.group).await {
                Ok(()) => group_ready = true,
                Err(error) => {
                    redis_ready.set(false);
                    tracing::warn!(%error, "cannot create the consumer group; retrying");
                    pause(&shutdown, backoff.next_delay()).await;
                    continue;
                }
            }
        }
        if pressure_checked.elapsed() >= Duration::from_millis(500) {
            pressure_checked = Instant::now();
            match drainer.stream_len().await {
                Ok(len) if len >= drainer.stream_max_len() => {
                    metrics.backpressure.set(1);
                    tracing::warn!(
                        len,
                        max = drainer.stream_max_len(),
                        "event stream full: pausing appends, the outbox holds the backlog"
                    );
                    pressure_checked = Instant::now() - Duration::from_millis(300);
                    pause(&shutdown, Duration::from_millis(200)).await;
                    continue;
                }
                Ok(_) => {
                    metrics.backpressure.set(0);
                }
                Err(error) => tracing::debug!(%error, "stream length check failed"),
            }
        }

        match drainer.drain_once().await {
            Ok(drained) => {
                pg_ready.set(true);
                redis_ready.set(true);
                backoff.reset();
                if drained.rows > 0 {
                    last_rows = Instant::now();
                    busy_poll = Duration::from_millis(1);
                    if let Err(error) = bell.renew().await {
                        tracing::debug!(%error, "doorbell lease renewal failed");
                    }
                    metrics.busy.set(i64::from(bell.is_busy()));
                    continue;
                }
                if bell.is_busy() {
                    if last_rows.elapsed() < linger {
                        if let Err(error) = bell.renew().await {
                            tracing::debug!(%error, "doorbell lease renewal failed");
                        }
                        pause(&shutdown, busy_poll).await;
                        busy_poll = (busy_poll * 2).min(BUSY_POLL_MAX);
                        continue;
                    }
                    match bell.try_idle().await {
                        // Idle now: drain once more, then sleep on the bell.
                        Ok(true) => {
                            metrics.busy.set(0);
                        }
                        // The lease has not expired, or a writer is in flight: keep polling.
                        Ok(false) => pause(&shutdown, busy_poll).await,
                        Err(error) => {
                            tracing::debug!(%error, "doorbell idle transition failed");
                            pause(&shutdown, busy_poll).await;
                        }
                    }
                    continue;
                }
                bell.clear();
                let wake = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    wake = bell.wait(idle_poll) => wake,
                };
                match wake {
                    Wake::Rung => {
                        metrics.doorbells.inc();
                        if let Err(error) = bell.renew().await {
                            tracing::debug!(%error, "doorbell lease renewal failed");
                        }
                        metrics.busy.set(i64::from(bell.is_busy()));
                    }
                    Wake::Timeout => {}
                    Wake::Lost => {
                        bell_ready.set(false);
                        pause(&shutdown, backoff.next_delay()).await;
                    }
                }
            }
            Err(error) => {
                metrics.errors.inc();
                match &error {
                    Error::Redis(_) | Error::NotReplicated { .. } => redis_ready.set(false),
                    _ => pg_ready.set(false),
                }
                tracing::warn!(%error, "drain failed; the rows stay in the outbox and are retried");
                pause(&shutdown, backoff.next_delay()).await;
            }
        }
    }
    tracing::info!("capture stopping");
    sampler.abort();
    watermarks.abort();
    let _ = redis.quit().await;
    let _ = ops_task.await;
    Ok(())
}

/// The consumer group on every partition, so events appended before the
/// first broadcast starts are delivered.
async fn ensure_groups(redis: &Pool, log: &EventLog, group: &str) -> herald_core::Result<()> {
    for stream in log.streams() {
        herald_core::redis::ensure_group(redis, stream, group).await?;
    }
    Ok(())
}

/// The installed source (see `source.rs`); retried while Postgres is
/// unreachable, `None` when shut down first.
async fn resolve_source(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Source>> {
    let mut backoff = Backoff::reconnect();
    while !shutdown.is_cancelled() {
        let installed = match pool.get().await {
            Ok(client) => source::installed(&**client).await,
            Err(error) => Err(error.into()),
        };
        match installed {
            // Capture may start before the install job has run.
            Ok(None) => {
                tracing::warn!("the herald schema is not installed yet; waiting for `herald-capture install`");
                pause(shutdown, backoff.next_delay()).await;
            }
            Ok(installed) => return Ok(Some(source::for_run(config.capture.source, installed)?)),
            Err(error) => {
                tracing::warn!(%error, "cannot read the installed capture source; retrying");
                pause(shutdown, backoff.next_delay()).await;
            }
        }
    }
    Ok(None)
}

pub(crate) async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = sleep(duration) => {}
    }
}

/// Samples outbox depth and the oldest row's age for `/metrics`.
async fn sample_depth(pool: deadpool_postgres::Pool, metrics: Metrics, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Ok(client) = pool.get().await
            && let Ok(row) = client
                .query_one(
                    "SELECT (SELECT count(*) FROM (SELECT 1 FROM herald.outbox LIMIT 1000000) s), \
                            coalesce((SELECT extract(epoch FROM clock_timestamp() - changed_at)::int8 \
                                      FROM herald.outbox ORDER BY id LIMIT 1), 0)",
                    &[],
                )
                .await
        {
            metrics.outbox_depth.set(row.get(0));
            metrics.oldest_pending_seconds.set(row.get(1));
        }
        pause(&shutdown, Duration::from_secs(2)).await;
    }
}

/// Samples the replication slot for `/metrics`: retained WAL, lag, the
/// streaming backend.
async fn sample_slot(config: Config, metrics: Metrics, shutdown: CancellationToken) {
    let mut client = None;
    while !shutdown.is_cancelled() {
        if client.as_ref().is_none_or(|c: &tokio_postgres::Client| c.is_closed()) {
            client = match tokio_postgres::connect(&config.postgres.url, tokio_postgres::NoTls).await {
                Ok((c, connection)) => {
                    tokio::spawn(connection);
                    Some(c)
                }
                Err(_) => None,
            };
        }
        if let Some(c) = &client
            && let Ok(state) = wal::slot::state(c, &config.capture.slot).await
        {
            metrics.slot_retained_bytes.set(state.retained_bytes.unwrap_or(0));
            metrics.slot_lag_bytes.set(state.lag_bytes.unwrap_or(0));
            metrics.slot_active_pid.set(i64::from(state.active_pid.unwrap_or(0)));
        }
        pause(&shutdown, Duration::from_secs(2)).await;
    }
}
