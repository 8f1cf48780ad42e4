//! The WAL source: changes from a logical replication slot (pgoutput), no
//! statement triggers on the writers' path.
//!
//! One capture instance streams the slot; others stand by (Postgres lets one
//! connection stream a slot) and take over when it ends. Per batch of
//! messages: transactions become events (`txn.rs`), the events are appended
//! to the stream, and only then is the position confirmed to Postgres — at
//! least once, in commit order. A crash replays from the slot's confirmed
//! position with the same event ids.

pub mod client;
pub mod pgoutput;
pub mod schema;
pub mod slot;
pub mod txn;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt as _;
use herald_core::backoff::Backoff;
use herald_core::config::Config;
use herald_core::ops::ReadyFlag;
use herald_core::time::now_us;
use herald_proto::v1::{InvalidationEvent, Operation};
use tokio_util::sync::CancellationToken;

use self::client::{ReplicationStream, StreamError, StreamTarget, WalMessage};
use self::txn::{Assembled, Assembler, TxnError};
use crate::append::Appender;
use crate::error::Error;
use crate::metrics::Metrics;

/// Events appended per round trip at most.
const APPEND_BATCH: usize = 1_000;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("the slot is streamed by another capture (pid {0:?})")]
    Standby(Option<i32>),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Capture(#[from] Error),
    #[error(transparent)]
    Txn(#[from] TxnError),
    #[error("the server ended the replication stream")]
    Ended,
}

/// Readiness flags the WAL loop sets.
pub struct Readiness {
    pub postgres: ReadyFlag,
    pub redis: ReadyFlag,
}

/// Streams the slot until `shutdown`.
pub async fn run(
    config: Config,
    appender: Appender,
    appended: Arc<AtomicU64>,
    metrics: Metrics,
    ready: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::reconnect();
    let standby = Duration::from_millis(config.capture.standby_poll_ms);
    let capture = WalCapture { config, appender, appended, metrics };
    while !shutdown.is_cancelled() {
        match capture.session(&ready, &shutdown).await {
            Ok(()) => break,
            Err(SessionError::Standby(pid)) => {
                capture.metrics.standby.set(1);
                ready.postgres.set(true);
                tracing::debug!(?pid, "replication slot active elsewhere; standing by");
                crate::pause(&shutdown, standby).await;
            }
            Err(error) => {
                capture.metrics.errors.inc();
                match &error {
                    SessionError::Capture(Error::Redis(_) | Error::NotReplicated { .. }) => ready.redis.set(false),
                    _ => ready.postgres.set(false),
                }
                tracing::warn!(%error, "wal capture failed; resuming from the slot's confirmed position");
                crate::pause(&shutdown, backoff.next_delay()).await;
            }
        }
    }
    Ok(())
}

struct WalCapture {
    config: Config,
    appender: Appender,
    /// Everything committed up to this WAL position is in the event stream:
    /// what the watermark task confirms its positions against.
    appended: Arc<AtomicU64>,
    metrics: Metrics,
}

impl WalCapture {
    /// One replication session: slot checks, owed flush, then streaming.
    async fn session(&self, ready: &Readiness, shutdown: &CancellationToken) -> Result<(), SessionError> {
        let capture = &self.config.capture;
        let (client, connection) =
            tokio_postgres::connect(&self.config.postgres.url, tokio_postgres::NoTls).await.map_err(Error::from)?;
        let connection = tokio::spawn(connection);
        let state = slot::state(&client, &capture.slot).await?;
        if state.active_pid.is_some() {
            return Err(SessionError::Standby(state.active_pid));
        }
        let ensured = slot::ensure(&client, &capture.slot).await?;
        if ensured.lost {
            self.metrics.slot_recreated.inc();
        }
        let database: String =
            client.query_one("SELECT current_database()::text", &[]).await.map_err(Error::from)?.get(0);
        if slot::flush_pending(&client).await? {
            self.flush_everything(&database).await?;
            slot::flush_done(&client).await?;
        }
        let start_lsn = slot::state(&client, &capture.slot).await?.confirmed_lsn.unwrap_or(0);
        drop(client);
        connection.abort();

        let target = StreamTarget {
            slot: capture.slot.clone(),
            publication: capture.publication.clone(),
            start_lsn,
            status_interval: Duration::from_millis(200),
            buffer: 1_024,
        };
        let mut stream = match client::connect(&self.config.postgres, &target).await {
            Err(StreamError::SlotActive(_)) => return Err(SessionError::Standby(None)),
            other => other?,
        };
        self.metrics.standby.set(0);
        ready.postgres.set(true);
        tracing::info!(slot = %capture.slot, start = %txn::lsn_text(start_lsn), "streaming the replication slot");
        let chunk_rows = usize::try_from(capture.chunk_rows).unwrap_or(500);
        // Per session: each session resends the Relation messages, and a
        // transaction cut off by an error is resent whole.
        let flush_images = chunk_rows.saturating_mul(8).max(4_000);
        let mut assembler = Assembler::new(&self.config.tables, &database, chunk_rows, flush_images);
        let mut batch = Batch::default();
        let mut pressure_checked = Instant::now() - Duration::from_secs(1);
        loop {
            if pressure_checked.elapsed() >= Duration::from_millis(500) {
                pressure_checked = Instant::now();
                let len = self.appender.stream_len().await?;
                if len >= self.appender.stream_max_len() {
                    // The slot holds the backlog; reading pauses.
                    self.metrics.backpressure.set(1);
                    tracing::warn!(len, "event stream full: pausing replication, the slot holds the backlog");
                    pressure_checked = Instant::now() - Duration::from_millis(300);
                    crate::pause(shutdown, Duration::from_millis(200)).await;
                    continue;
                }
                self.metrics.backpressure.set(0);
            }
            let mut next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                message = stream.recv() => message?,
            };
            // Everything already received, up to a batch.
            loop {
                let Some(message) = next else { return Err(SessionError::Ended) };
                batch.take(&mut assembler, message, &self.appender, &self.metrics)?;
                if batch.payloads.len() >= APPEND_BATCH {
                    break;
                }
                match stream.recv().now_or_never() {
                    Some(message) => next = message?,
                    None => break,
                }
            }
            let payloads = std::mem::take(&mut batch.payloads);
            self.appender.append(&payloads).await?;
            ready.redis.set(true);
            let now = now_us();
            for commit_time in batch.commit_times.drain(..) {
                self.metrics.capture_lag.observe((now - commit_time).max(0) as f64 / 1e6);
            }
            self.metrics.events_appended.inc_by(payloads.len() as u64);
            let idle = if assembler.in_transaction() { None } else { batch.keepalive.take() };
            let committed = batch.committed.take();
            if let Some(position) = committed.map(|(lsn, _)| lsn).max(idle) {
                let commit_time = committed.map(|(_, time)| time);
                self.appended_through(&stream, position, commit_time);
            }
        }
    }

    /// Everything committed up to `lsn` is in the event stream (the last
    /// such commit at `commit_time_us`, when this batch had one): the one
    /// place that knows it, where a freshness watermark belongs. Confirms
    /// `lsn` to Postgres, which may then recycle the WAL before it.
    fn appended_through(&self, stream: &impl ReplicationStream, lsn: u64, commit_time_us: Option<i64>) {
        self.appended.fetch_max(lsn, Ordering::SeqCst);
        stream.confirm(lsn);
        self.metrics.confirmed_lsn.set(i64::try_from(lsn).unwrap_or(i64::MAX));
        match commit_time_us {
            Some(time) => self.metrics.wal_lag_seconds.set((now_us() - time).max(0) / 1_000_000),
            None => self.metrics.wal_lag_seconds.set(0),
        };
    }

    /// Appends one table-wide, every-tenant event per watched table — the
    /// format of a TRUNCATE of a tenant table, which broadcast applies to L2
    /// in every scope (moving every tenant's fill epoch) and which makes
    /// every L1 flush — because changes between the lost slot's position and
    /// the new one can no longer be known.
    async fn flush_everything(&self, database: &str) -> Result<(), Error> {
        let now = now_us();
        let events: Vec<InvalidationEvent> = self
            .config
            .tables
            .iter()
            .enumerate()
            .map(|(n, table)| InvalidationEvent {
                event_id: format!("{database}:slot-lost:{now}.{n}"),
                table: table.name.clone(),
                operation: Operation::Truncate as i32,
                tags: vec![table.name.clone()],
                all_tenants: true,
                commit_time_us: now,
                captured_time_us: now,
                ..Default::default()
            })
            .collect();
        let payloads: Vec<(String, Bytes)> =
            events.iter().map(|e| (e.tenant.clone(), self.appender.encode(e))).collect();
        self.appender.append(&payloads).await?;
        self.metrics.flush_everything.inc();
        self.metrics.events_appended.inc_by(payloads.len() as u64);
        tracing::error!(
            slot = %self.config.capture.slot,
            tables = events.len(),
            "replication slot was lost and recreated: flushed every cache (L1 and L2, every tenant)"
        );
        Ok(())
    }
}

/// What one batch of messages produced.
#[derive(Default)]
struct Batch {
    payloads: Vec<(String, Bytes)>,
    commit_times: Vec<i64>,
    /// End of the last transaction committed in this batch, and its time.
    committed: Option<(u64, i64)>,
    /// The server's position from a keepalive outside a transaction.
    keepalive: Option<u64>,
}

impl Batch {
    fn take(
        &mut self,
        assembler: &mut Assembler,
        message: WalMessage,
        appender: &Appender,
        metrics: &Metrics,
    ) -> Result<(), TxnError> {
        match message {
            WalMessage::Begin { final_lsn, xid, commit_time_us } => assembler.begin(final_lsn, xid, commit_time_us),
            WalMessage::Change(data) => {
                assembler.change(&data)?;
                if assembler.over_bound() {
                    self.add(assembler.flush(now_us()), appender, metrics);
                }
            }
            WalMessage::Message { transactional: true, prefix, content } => assembler.message(&prefix, &content)?,
            WalMessage::Message { .. } => {}
            WalMessage::Commit { end_lsn, commit_time_us, .. } => {
                self.add(assembler.commit(now_us()), appender, metrics);
                self.committed = Some((end_lsn, commit_time_us));
                self.commit_times.push(commit_time_us);
                metrics.transactions.inc();
            }
            WalMessage::KeepAlive { wal_end } => self.keepalive = Some(wal_end),
        }
        Ok(())
    }

    fn add(&mut self, assembled: Assembled, appender: &Appender, metrics: &Metrics) {
        for reason in &assembled.set_aside {
            tracing::warn!(%reason, "row images set aside");
        }
        metrics.dead_lettered.inc_by(assembled.set_aside.len() as u64);
        self.payloads.extend(assembled.events.iter().map(|e| (e.tenant.clone(), appender.encode(e))));
    }
}
