//! Capture's metrics, under `herald_capture_*`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct Metrics {
    pub events_appended: Counter,
    pub rows_drained: Counter,
    pub dead_lettered: Counter,
    pub widened: Counter,
    pub batches: Counter,
    pub errors: Counter,
    pub unreplicated: Counter,
    pub doorbells: Counter,
    pub busy: Gauge,
    pub outbox_depth: Gauge,
    pub oldest_pending_seconds: Gauge,
    pub backpressure: Gauge,
    /// Writer's statement → appended to the stream, seconds.
    pub capture_lag: Histogram,
    /// Freshness watermarks appended to the stream.
    pub watermarks: Counter,
    /// WAL position of the last watermark appended.
    pub watermark_lsn: Gauge,
    // The WAL source.
    pub transactions: Counter,
    pub standby: Gauge,
    pub slot_recreated: Counter,
    pub flush_everything: Counter,
    pub confirmed_lsn: Gauge,
    pub wal_lag_seconds: Gauge,
    pub slot_retained_bytes: Gauge,
    pub slot_lag_bytes: Gauge,
    pub slot_active_pid: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events_appended: Counter::default(),
            rows_drained: Counter::default(),
            dead_lettered: Counter::default(),
            widened: Counter::default(),
            batches: Counter::default(),
            errors: Counter::default(),
            unreplicated: Counter::default(),
            doorbells: Counter::default(),
            busy: Gauge::default(),
            outbox_depth: Gauge::default(),
            oldest_pending_seconds: Gauge::default(),
            backpressure: Gauge::default(),
            capture_lag: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            watermarks: Counter::default(),
            watermark_lsn: Gauge::default(),
            transactions: Counter::default(),
            standby: Gauge::default(),
            slot_recreated: Counter::default(),
            flush_everything: Counter::default(),
            confirmed_lsn: Gauge::default(),
            wal_lag_seconds: Gauge::default(),
            slot_retained_bytes: Gauge::default(),
            slot_lag_bytes: Gauge::default(),
            slot_active_pid: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("herald_capture");
        r.register("events_appended", "events appended to the stream", self.events_appended.clone());
        r.register(
            "watermarks",
            "freshness watermarks appended (every commit up to the position has its events before)",
            self.watermarks.clone(),
        );
        r.register("watermark_lsn", "WAL position of the last watermark appended", self.watermark_lsn.clone());
        r.register("rows_drained", "outbox rows drained", self.rows_drained.clone());
        r.register(
            "dead_lettered",
            "outbox rows moved to herald.dead_letter, whole or only their bad images",
            self.dead_lettered.clone(),
        );
        r.register("widened", "events widened to a table-wide tag to fit the size limit", self.widened.clone());
        r.register("batches", "drain transactions committed", self.batches.clone());
        r.register("errors", "drain attempts that failed and were retried", self.errors.clone());
        r.register(
            "unreplicated",
            "batches kept in the outbox because fewer than capture.wait_replicas replicas acknowledged them in time",
            self.unreplicated.clone(),
        );
        r.register("doorbells", "doorbell notifications received", self.doorbells.clone());
        r.register("busy", "1 while this instance holds the doorbell lease (writers skip NOTIFY)", self.busy.clone());
        r.register("outbox_depth", "rows waiting in herald.outbox (sampled, capped at 1e6)", self.outbox_depth.clone());
        r.register(
            "oldest_pending_seconds",
            "age of the oldest outbox row (sampled)",
            self.oldest_pending_seconds.clone(),
        );
        r.register("backpressure", "1 while appends pause because the stream is full", self.backpressure.clone());
        r.register(
            "lag_seconds",
            "writer statement (outbox) or commit (wal) to stream append",
            self.capture_lag.clone(),
        );
        r.register("transactions", "committed transactions read from the replication slot", self.transactions.clone());
        r.register("standby", "1 while another instance streams the slot and this one waits", self.standby.clone());
        r.register(
            "slot_recreated",
            "replication slots found lost or missing and recreated (each followed by a flush of every cache)",
            self.slot_recreated.clone(),
        );
        r.register(
            "flush_everything",
            "flush-everything events appended after a lost slot",
            self.flush_everything.clone(),
        );
        r.register("confirmed_lsn", "last LSN this instance confirmed to Postgres", self.confirmed_lsn.clone());
        r.register(
            "wal_lag_seconds",
            "commit to append of the last transaction appended (0 while idle)",
            self.wal_lag_seconds.clone(),
        );
        r.register(
            "slot_retained_wal_bytes",
            "WAL the replication slot keeps on the database server (sampled); a slot nobody reads grows it forever",
            self.slot_retained_bytes.clone(),
        );
        r.register(
            "slot_lag_bytes",
            "WAL written since the slot's confirmed position (sampled)",
            self.slot_lag_bytes.clone(),
        );
        r.register(
            "slot_active_pid",
            "backend streaming the slot, 0 when none (sampled)",
            self.slot_active_pid.clone(),
        );
    }
}
