//! Freshness watermarks: a stream record saying "every change committed up
//! to WAL position P has its events before me", with Postgres's clock when P
//! was taken. A *candidate* (P, time) is taken from Postgres; it is appended
//! once *confirmed*, which each source does its own way:
//!
//! - **WAL** ([`Confirm::AppendedThrough`]): P is the flushed WAL position.
//!   A commit visible at that time ended at or before it, and the
//!   replication stream delivers commits in WAL order; once the source has
//!   appended everything up to P (a commit at or past it, or an idle
//!   keepalive), every such commit's events are in the stream.
//! - **Outbox** ([`Confirm::OutboxDrained`]), from two snapshots: the
//!   candidate also takes a fresh transaction id X; a transaction T whose
//!   commit record ends at or before P had its xid before X was handed out,
//!   so `T.xid < X`. A later statement confirms it when its snapshot has
//!   `xmin ≥ X` (every transaction with an xid below X has ended, so T is
//!   visible) and no outbox row with `txid < X` is left: T's rows are gone,
//!   and a drain deletes rows only in the transaction that committed after
//!   their events were appended. A transaction with an xid that stays open
//!   (a long write) holds confirmation back while it is open.
//!
//! Several captures may each append watermarks; they only ever say true
//! things. Each one goes to every partition of the log.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use herald_proto::Message as _;
use herald_proto::v1::Watermark;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::append::Appender;
use crate::metrics::Metrics;

/// How a candidate position is confirmed.
#[derive(Clone)]
pub enum Confirm {
    /// The WAL source: confirmed once the source appended through it.
    AppendedThrough(Arc<AtomicU64>),
    /// The outbox source: confirmed by a later snapshot (see the module).
    OutboxDrained,
}

/// Outbox source: confirms the previous candidate (`$1`, an xid as text, or
/// NULL) and takes the next one, in one statement.
const OUTBOX_PROBE: &str = "\
    SELECT coalesce($1::text::xid8 <= pg_snapshot_xmin(pg_current_snapshot()) \
                    AND NOT EXISTS (SELECT 1 FROM herald.outbox WHERE txid < $1::text::xid8), false), \
           (pg_current_wal_lsn() - '0/0')::int8, \
           pg_current_xact_id()::text, \
           (extract(epoch FROM clock_timestamp()) * 1000000)::int8";

/// WAL source: the flushed position and the time.
const WAL_PROBE: &str = "\
    SELECT (pg_current_wal_flush_lsn() - '0/0')::int8, (extract(epoch FROM clock_timestamp()) * 1000000)::int8";

/// Probe at least this often.
const INTERVAL: Duration = Duration::from_millis(50);

/// A position taken but not yet confirmed.
#[derive(Debug, Clone)]
struct Candidate {
    /// The outbox source's transaction id, as text.
    xid: Option<String>,
    watermark: Watermark,
}

/// Appends watermarks to the event log until `shutdown`.
pub async fn run(
    pool: deadpool_postgres::Pool,
    appender: Appender,
    confirm: Confirm,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut candidate: Option<Candidate> = None;
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        match probe(&pool, &confirm, candidate.as_ref()).await {
            Ok((confirmed, next)) => {
                if confirmed && let Some(done) = candidate.take() {
                    let lsn = done.watermark.lsn;
                    match appender.append_watermark(Bytes::from(done.watermark.encode_to_vec())).await {
                        Ok(()) => {
                            metrics.watermarks.inc();
                            metrics.watermark_lsn.set(i64::try_from(lsn).unwrap_or(i64::MAX));
                        }
                        Err(error) => tracing::debug!(%error, "watermark append failed"),
                    }
                }
                if candidate.is_none() {
                    candidate = Some(next);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "watermark probe failed");
                candidate = None;
            }
        }
        // An outbox probe scans what is left of the outbox: with a deep
        // backlog it is slower, and then it runs less often.
        let pause = INTERVAL.max(started.elapsed() * 20);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = sleep(pause) => {}
        }
    }
}

type ProbeError = Box<dyn std::error::Error + Send + Sync>;

/// Whether `candidate` is confirmed, and the next candidate.
async fn probe(
    pool: &deadpool_postgres::Pool,
    confirm: &Confirm,
    candidate: Option<&Candidate>,
) -> Result<(bool, Candidate), ProbeError> {
    let client = pool.get().await?;
    match confirm {
        Confirm::OutboxDrained => {
            let xid = candidate.and_then(|c| c.xid.as_deref());
            let row = client.query_one(OUTBOX_PROBE, &[&xid]).await?;
            let next = Candidate { xid: row.get(2), watermark: watermark(row.get(1), row.get(3)) };
            Ok((row.get(0), next))
        }
        Confirm::AppendedThrough(appended) => {
            let row = client.query_one(WAL_PROBE, &[]).await?;
            let confirmed = candidate.is_some_and(|c| appended.load(Ordering::SeqCst) >= c.watermark.lsn);
            Ok((confirmed, Candidate { xid: None, watermark: watermark(row.get(0), row.get(1)) }))
        }
    }
}

fn watermark(lsn: i64, pg_time_us: i64) -> Watermark {
    Watermark { lsn: u64::try_from(lsn).unwrap_or_default(), pg_time_us }
}
