//! Draining the outbox into the event stream: one transaction per batch,
//! `FOR UPDATE SKIP LOCKED` so several captures share the work, rows deleted
//! only after their events were appended.

use std::collections::HashMap;

use bytes::Bytes;
use fred::prelude::*;
use herald_core::config::Config;
use herald_core::keys::TenantId;
use herald_core::time::now_us;
use herald_proto::Message as _;
use herald_proto::v1::{InvalidationEvent, Operation};
use tracing::Instrument;

use crate::error::Result;
use crate::metrics::Metrics;

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub rows: usize,
    pub appended: usize,
    pub dead: usize,
    /// The batch was full: more rows are probably waiting.
    pub full: bool,
}

/// Per-table facts capture needs to validate rows.
#[derive(Debug, Clone)]
struct TableInfo {
    has_tenant: bool,
}

/// Drains outbox rows into the stream.
#[derive(Clone)]
pub struct Drainer {
    pool: deadpool_postgres::Pool,
    redis: Pool,
    stream: String,
    tables: HashMap<String, TableInfo>,
    batch_size: i64,
    max_event_bytes: usize,
    stream_max_len: u64,
    metrics: Metrics,
}

const SELECT_BATCH: &str = "\
    SELECT id, table_name, op, tenant, ids, tags, teams, txid::text, \
           (extract(epoch FROM changed_at) * 1000000)::int8, traceparent, \
           (pg_current_wal_insert_lsn() - '0/0')::int8, current_database()::text \
    FROM herald.outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

const DEAD_LETTER: &str = "\
    INSERT INTO herald.dead_letter (id, table_name, op, tenant, ids, tags, teams, txid, changed_at, traceparent, reason) \
    SELECT o.id, o.table_name, o.op, o.tenant, o.ids, o.tags, o.teams, o.txid, o.changed_at, o.traceparent, r.reason \
    FROM herald.outbox o JOIN unnest($1::int8[], $2::text[]) AS r(id, reason) ON r.id = o.id \
    ON CONFLICT (id) DO NOTHING";

impl Drainer {
    pub fn new(config: &Config, pool: deadpool_postgres::Pool, redis: Pool, stream: String, metrics: Metrics) -> Self {
        let tables = config
            .tables
            .iter()
            .map(|t| (t.name.clone(), TableInfo { has_tenant: t.tenant_column.is_some() }))
            .collect();
        Self {
            pool,
            redis,
            stream,
            tables,
            batch_size: config.capture.batch_size,
            max_event_bytes: config.capture.max_event_bytes,
            stream_max_len: config.capture.stream_max_len,
            metrics,
        }
    }

    /// Length of the stream, for backpressure.
    pub async fn stream_len(&self) -> Result<u64> {
        Ok(self.redis.next().xlen(&self.stream).await?)
    }

    /// The length at which appends pause.
    pub fn stream_max_len(&self) -> u64 {
        self.stream_max_len
    }

    /// Drains one batch. On error nothing is deleted: the rows stay in the
    /// outbox (events that were appended before the error will be appended
    /// again — duplicates are harmless).
    pub async fn drain_once(&self) -> Result<Drained> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx.query(SELECT_BATCH, &[&self.batch_size]).await?;
        if rows.is_empty() {
            return Ok(Drained::default());
        }
        let mut done = Vec::with_capacity(rows.len());
        let mut dead_ids = Vec::new();
        let mut dead_reasons = Vec::new();
        let mut events = Vec::with_capacity(rows.len());
        let captured = now_us();
        for row in &rows {
            let id: i64 = row.get(0);
            done.push(id);
            match self.event_from_row(row, captured) {
                Ok(event) => events.push(event),
                Err(reason) => {
                    tracing::warn!(outbox_id = id, %reason, "malformed outbox row moved to herald.dead_letter");
                    dead_ids.push(id);
                    dead_reasons.push(reason);
                }
            }
        }
        let encoded: Vec<(Bytes, i64)> = events.iter().map(|e| (self.encode(e), e.commit_time_us)).collect();
        if !encoded.is_empty() {
            self.append(&encoded).instrument(tracing::debug_span!("capture.append", events = encoded.len())).await?;
        }
        if !dead_ids.is_empty() {
            tx.execute(DEAD_LETTER, &[&dead_ids, &dead_reasons]).await?;
        }
        tx.execute("DELETE FROM herald.outbox WHERE id = ANY($1)", &[&done]).await?;
        tx.commit().await?;

        let now = now_us();
        for (_, commit_time) in &encoded {
            self.metrics.capture_lag.observe((now - commit_time).max(0) as f64 / 1e6);
        }
        self.metrics.rows_drained.inc_by(rows.len() as u64);
        self.metrics.events_appended.inc_by(encoded.len() as u64);
        self.metrics.dead_lettered.inc_by(dead_ids.len() as u64);
        self.metrics.batches.inc();
        Ok(Drained {
            rows: rows.len(),
            appended: encoded.len(),
            dead: dead_ids.len(),
            full: rows.len() as i64 >= self.batch_size,
        })
    }

    async fn append(&self, encoded: &[(Bytes, i64)]) -> Result<()> {
        let hard_cap = self.stream_max_len.saturating_mul(2);
        let pipeline = self.redis.next().pipeline();
        for (bytes, _) in encoded {
            let _: () =
                pipeline.xadd(&self.stream, false, ("MAXLEN", "~", hard_cap as i64), "*", ("e", bytes.clone())).await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// Encodes `event`, widening it to a table-wide invalidation when it
    /// would not fit `capture.max_event_bytes`.
    fn encode(&self, event: &InvalidationEvent) -> Bytes {
        let bytes = event.encode_to_vec();
        if bytes.len() <= self.max_event_bytes {
            return bytes.into();
        }
        self.metrics.widened.inc();
        tracing::warn!(event_id = %event.event_id, bytes = bytes.len(), "event too large, widened to a table-wide invalidation");
        let mut widened = event.clone();
        widened.ids.clear();
        widened.tags = vec![event.table.clone()];
        widened.widened = true;
        if widened.encoded_len() > self.max_event_bytes {
            widened.teams.clear();
        }
        widened.encode_to_vec().into()
    }

    /// Builds the event of one outbox row, or the reason it is malformed.
    fn event_from_row(
        &self,
        row: &tokio_postgres::Row,
        captured: i64,
    ) -> std::result::Result<InvalidationEvent, String> {
        let id: i64 = row.get(0);
        let table: String = row.try_get(1).map_err(|e| format!("table_name: {e}"))?;
        let op: String = row.try_get(2).map_err(|e| format!("op: {e}"))?;
        let tenant: Option<String> = row.try_get(3).map_err(|e| format!("tenant: {e}"))?;
        let text_array = |idx: usize, what: &str| -> std::result::Result<Vec<String>, String> {
            let values: Vec<Option<String>> = row.try_get(idx).map_err(|e| format!("{what}: {e}"))?;
            values.into_iter().map(|v| v.ok_or_else(|| format!("{what}: contains NULL"))).collect()
        };
        let ids = text_array(4, "ids")?;
        let tags = text_array(5, "tags")?;
        let teams = text_array(6, "teams")?;
        let txid: String = row.get(7);
        let commit_time_us: i64 = row.get(8);
        let traceparent: Option<String> = row.get(9);
        let lsn: i64 = row.get(10);
        let database: String = row.get(11);

        let info = self.tables.get(&table).ok_or_else(|| format!("unknown table {table:?}"))?;
        let operation = match op.as_str() {
            "I" => Operation::Insert,
            "U" => Operation::Update,
            "D" => Operation::Delete,
            "T" => Operation::Truncate,
            other => return Err(format!("unknown op {other:?}")),
        };
        let mut all_tenants = false;
        let tenant = match (tenant, info.has_tenant) {
            (Some(t), true) if t == "*" && operation == Operation::Truncate => {
                all_tenants = true;
                String::new()
            }
            (Some(t), true) => TenantId::new(&t).map_err(|e| e.to_string())?.to_string(),
            (None, true) => return Err("tenant is NULL for a table with a tenant column".into()),
            (Some(_), false) => return Err("tenant set for a table without a tenant column".into()),
            (None, false) => String::new(),
        };
        if operation != Operation::Truncate && ids.is_empty() {
            return Err("no ids".into());
        }
        if !tags.iter().any(|t| t == &table) {
            return Err("tags lack the table-wide tag".into());
        }
        if let Some(bad) = tags.iter().find(|t| *t != &table && !t.starts_with(&format!("{table}."))) {
            return Err(format!("tag {bad:?} does not belong to table {table:?}"));
        }

        let mut event = InvalidationEvent {
            event_id: format!("{database}:{id}"),
            tenant,
            table,
            operation: operation as i32,
            ids,
            tags,
            teams,
            txid: txid.parse().unwrap_or_default(),
            commit_lsn: u64::try_from(lsn).unwrap_or_default(),
            commit_time_us,
            captured_time_us: captured,
            traceparent: traceparent.unwrap_or_default(),
            widened: false,
            all_tenants,
        };
        if !event.traceparent.is_empty() {
            let span = tracing::info_span!("capture.event", event_id = %event.event_id, table = %event.table);
            herald_core::telemetry::set_parent(&span, &event.traceparent);
            let continued = herald_core::telemetry::traceparent(&span);
            if !continued.is_empty() {
                event.traceparent = continued;
            }
        }
        Ok(event)
    }
}
