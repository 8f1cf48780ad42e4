//! Draining the outbox into the event stream: one transaction per batch,
//! `FOR UPDATE SKIP LOCKED` so several captures share the work, rows deleted
//! only after their events were appended.

use std::collections::HashMap;

use bytes::Bytes;
use herald_core::config::{Config, TableConfig};
use herald_core::time::now_us;

use crate::append::Appender;
use crate::error::Result;
use crate::events::{OutboxRow, Parsed, events_of};
use crate::metrics::Metrics;

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub rows: usize,
    pub appended: usize,
    pub dead: usize,
}

/// Drains outbox rows into the stream.
#[derive(Clone)]
pub struct Drainer {
    pool: deadpool_postgres::Pool,
    appender: Appender,
    tables: HashMap<String, TableConfig>,
    chunk_rows: usize,
    batch_size: i64,
    metrics: Metrics,
}

const SELECT_BATCH: &str = "\
    SELECT o.id, o.table_name, o.op, o.rows, o.txid::text, \
           (extract(epoch FROM o.changed_at) * 1000000)::int8, o.traceparent, pos.lsn, pos.db \
    FROM herald.outbox o \
    CROSS JOIN (SELECT (pg_current_wal_insert_lsn() - '0/0')::int8 AS lsn, current_database()::text AS db) pos \
    ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED";

const ANY_PENDING: &str = "SELECT EXISTS (SELECT 1 FROM herald.outbox)";

const DELETE_DRAINED: &str = "DELETE FROM herald.outbox WHERE id = ANY($1)";

const DEAD_LETTER: &str = "\
    INSERT INTO herald.dead_letter (id, table_name, op, rows, txid, changed_at, traceparent, reason) \
    SELECT o.id, o.table_name, o.op, o.rows, o.txid, o.changed_at, o.traceparent, r.reason \
    FROM herald.outbox o JOIN unnest($1::int8[], $2::text[]) AS r(id, reason) ON r.id = o.id \
    ON CONFLICT (id) DO NOTHING";

/// The images of one outbox row that cannot become events, kept with the
/// reason; the rest of the row is applied.
const SET_ASIDE: &str = "\
    INSERT INTO herald.dead_letter (id, table_name, op, rows, txid, changed_at, traceparent, reason) \
    SELECT o.id, o.table_name, o.op, $2, o.txid, o.changed_at, o.traceparent, $3 \
    FROM herald.outbox o WHERE o.id = $1 \
    ON CONFLICT (id) DO NOTHING";

impl Drainer {
    pub fn new(config: &Config, pool: deadpool_postgres::Pool, appender: Appender, metrics: Metrics) -> Self {
        let tables = config.tables.iter().map(|t| (t.name.clone(), t.clone())).collect();
        Self {
            pool,
            appender,
            tables,
            chunk_rows: usize::try_from(config.capture.chunk_rows).unwrap_or(500),
            batch_size: config.capture.batch_size,
            metrics,
        }
    }

    /// Length of the longest partition's stream, for backpressure.
    pub async fn stream_len(&self) -> Result<u64> {
        self.appender.stream_len().await
    }

    /// The length at which appends pause.
    pub fn stream_max_len(&self) -> u64 {
        self.appender.stream_max_len()
    }

    /// Drains one batch. On error nothing is deleted: the rows stay in the
    /// outbox (events that were appended before the error will be appended
    /// again — duplicates are harmless).
    pub async fn drain_once(&self) -> Result<Drained> {
        let mut client = self.pool.get().await?;
        // An empty outbox costs one round trip, not a transaction. (The pool's
        // connections commit without waiting for their WAL flush: see run.)
        let pending = client.prepare_cached(ANY_PENDING).await?;
        if !client.query_one(&pending, &[]).await?.get::<_, bool>(0) {
            return Ok(Drained::default());
        }
        let select = client.prepare_cached(SELECT_BATCH).await?;
        let delete = client.prepare_cached(DELETE_DRAINED).await?;
        let tx = client.transaction().await?;
        let rows = tx.query(&select, &[&self.batch_size]).await?;
        if rows.is_empty() {
            return Ok(Drained::default());
        }
        let mut done = Vec::with_capacity(rows.len());
        let mut dead_ids = Vec::new();
        let mut dead_reasons = Vec::new();
        let mut set_aside = Vec::new();
        let mut events = Vec::with_capacity(rows.len());
        let captured = now_us();
        for row in &rows {
            let id: i64 = row.get(0);
            done.push(id);
            match self.events_from_row(row, captured) {
                Ok(parsed) => {
                    events.extend(parsed.events);
                    if !parsed.set_aside.is_empty() {
                        tracing::warn!(outbox_id = id, reason = %parsed.reason, "row images set aside in herald.dead_letter");
                        set_aside.push((id, parsed.set_aside, parsed.reason));
                    }
                }
                Err(reason) => {
                    tracing::warn!(outbox_id = id, %reason, "malformed outbox row moved to herald.dead_letter");
                    dead_ids.push(id);
                    dead_reasons.push(reason);
                }
            }
        }
        let encoded: Vec<(Bytes, i64)> = events.iter().map(|e| (self.appender.encode(e), e.commit_time_us)).collect();
        let payloads: Vec<(String, Bytes)> =
            events.iter().zip(&encoded).map(|(e, (bytes, _))| (e.tenant.clone(), bytes.clone())).collect();
        // Dropping `tx` on error rolls back: the rows stay and the batch is
        // appended again later.
        self.appender.append(&payloads).await?;
        if !dead_ids.is_empty() {
            tx.execute(DEAD_LETTER, &[&dead_ids, &dead_reasons]).await?;
        }
        for (id, images, reason) in &set_aside {
            tx.execute(SET_ASIDE, &[id, images, reason]).await?;
        }
        tx.execute(&delete, &[&done]).await?;
        tx.commit().await?;

        let now = now_us();
        for (_, commit_time) in &encoded {
            self.metrics.capture_lag.observe((now - commit_time).max(0) as f64 / 1e6);
        }
        self.metrics.rows_drained.inc_by(rows.len() as u64);
        self.metrics.events_appended.inc_by(encoded.len() as u64);
        self.metrics.dead_lettered.inc_by((dead_ids.len() + set_aside.len()) as u64);
        self.metrics.batches.inc();
        Ok(Drained { rows: rows.len(), appended: encoded.len(), dead: dead_ids.len() })
    }

    /// Builds the events of one outbox row, or the reason it is malformed.
    fn events_from_row(&self, row: &tokio_postgres::Row, captured: i64) -> std::result::Result<Parsed, String> {
        let id: i64 = row.get(0);
        let table: String = row.try_get(1).map_err(|e| format!("table_name: {e}"))?;
        let op: String = row.try_get(2).map_err(|e| format!("op: {e}"))?;
        let rows: Vec<Option<String>> = row.try_get(3).map_err(|e| format!("rows: {e}"))?;
        let txid: String = row.get(4);
        let commit_time_us: i64 = row.get(5);
        let traceparent: Option<String> = row.get(6);
        let lsn: i64 = row.get(7);
        let database: String = row.get(8);
        let config = self.tables.get(&table).ok_or_else(|| format!("unknown table {table:?}"))?;
        let mut traceparent = traceparent.unwrap_or_default();
        if !traceparent.is_empty() {
            let span = tracing::info_span!("capture.event", outbox_id = id, table = %table);
            herald_core::telemetry::set_parent(&span, &traceparent);
            let continued = herald_core::telemetry::traceparent(&span);
            if !continued.is_empty() {
                traceparent = continued;
            }
        }
        let event_id = format!("{database}:{id}");
        let outbox_row = OutboxRow {
            event_id: &event_id,
            op: &op,
            rows: &rows,
            txid: txid.parse().unwrap_or_default(),
            commit_lsn: u64::try_from(lsn).unwrap_or_default(),
            commit_time_us,
            captured_time_us: captured,
            traceparent: &traceparent,
        };
        events_of(config, &outbox_row, self.chunk_rows)
    }
}
