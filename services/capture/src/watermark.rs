//! Freshness watermarks for the outbox source: a stream record saying
//! "every change committed up to WAL position P has its events before me".
//!
//! The argument, from two snapshots:
//!
//! 1. A *candidate* is taken in one statement: P = `pg_current_wal_lsn()`
//!    and X = a fresh transaction id. A transaction T whose commit record
//!    ends at or before P had its xid before X was handed out, so
//!    `T.xid < X`.
//! 2. A later statement *confirms* it when its snapshot has `xmin ≥ X`
//!    (every transaction with an xid below X has ended, so T is visible) and
//!    no outbox row with `txid < X` is left. T's rows are then gone, and a
//!    drain deletes rows only in the transaction that committed after their
//!    events were appended. So the events of every commit up to P are in the
//!    stream, and the watermark appended now comes after them.
//!
//! Several captures may each append watermarks; they only ever say true
//! things. A transaction with an xid that stays open (a long write) holds
//! confirmation back: while it is open, nobody can vouch for the positions
//! after it began.

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use herald_core::stream::EventLog;
use herald_proto::Message as _;
use herald_proto::v1::Watermark;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Confirms the previous candidate (`$1`, an xid as text, or NULL) and takes
/// the next one, in one statement.
const PROBE: &str = "\
    SELECT coalesce($1::text::xid8 <= pg_snapshot_xmin(pg_current_snapshot()) \
                    AND NOT EXISTS (SELECT 1 FROM herald.outbox WHERE txid < $1::text::xid8), false), \
           (pg_current_wal_lsn() - '0/0')::int8, \
           pg_current_xact_id()::text, \
           (extract(epoch FROM clock_timestamp()) * 1000000)::int8";

/// Probe at least this often.
const INTERVAL: Duration = Duration::from_millis(50);

/// An unchanged position is appended again only after this long.
const REPEAT_AFTER: Duration = Duration::from_secs(1);

/// A position taken but not yet confirmed.
#[derive(Debug, Clone)]
struct Candidate {
    xid: String,
    watermark: Watermark,
}

/// Appends watermarks to the event stream until `shutdown`.
pub async fn run(
    pool: deadpool_postgres::Pool,
    redis: Pool,
    log: EventLog,
    max_len: u64,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut candidate: Option<Candidate> = None;
    let mut last: Option<(u64, Instant)> = None;
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        match probe(&pool, candidate.as_ref()).await {
            Ok((confirmed, next)) => {
                if confirmed && let Some(done) = candidate.take() {
                    let lsn = done.watermark.lsn;
                    let repeat = last.is_some_and(|(l, at)| l == lsn && at.elapsed() < REPEAT_AFTER);
                    if !repeat {
                        let bytes = Bytes::from(done.watermark.encode_to_vec());
                        match log.append_watermark(redis.next(), bytes, max_len).await {
                            Ok(()) => {
                                metrics.watermarks.inc();
                                metrics.watermark_lsn.set(i64::try_from(lsn).unwrap_or(i64::MAX));
                                last = Some((lsn, Instant::now()));
                            }
                            Err(error) => tracing::debug!(%error, "watermark append failed"),
                        }
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
        // A probe scans what is left of the outbox: with a deep backlog it
        // is slower, and then it runs less often.
        let pause = INTERVAL.max(started.elapsed() * 20);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = sleep(pause) => {}
        }
    }
}

async fn probe(
    pool: &deadpool_postgres::Pool,
    candidate: Option<&Candidate>,
) -> Result<(bool, Candidate), Box<dyn std::error::Error + Send + Sync>> {
    let client = pool.get().await?;
    let xid = candidate.map(|c| c.xid.as_str());
    let row = client.query_one(PROBE, &[&xid]).await?;
    let lsn: i64 = row.get(1);
    let next = Candidate {
        xid: row.get(2),
        watermark: Watermark { lsn: u64::try_from(lsn).unwrap_or_default(), pg_time_us: row.get(3) },
    };
    Ok((row.get(0), next))
}
