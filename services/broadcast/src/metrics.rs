//! Broadcast's metrics, under `herald_broadcast_*`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct Metrics {
    pub events_applied: Counter,
    pub l2_entries_deleted: Counter,
    pub malformed: Counter,
    pub claimed: Counter,
    pub errors: Counter,
    pub heartbeats: Counter,
    pub pending: Gauge,
    /// Change publications on `team:{id}` channels.
    pub team_publications: Counter,
    /// Team changes that could not become a publication (global table,
    /// team id that is not a valid channel id).
    pub team_publications_skipped: Counter,
    /// Writer's statement → L1 invalidation published, seconds.
    pub lag: Histogram,
    /// Freshness watermarks published on the L1 channel.
    pub watermarks_forwarded: Counter,
    /// Watermarks dropped because older entries stayed pending too long.
    pub watermarks_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events_applied: Counter::default(),
            l2_entries_deleted: Counter::default(),
            malformed: Counter::default(),
            claimed: Counter::default(),
            errors: Counter::default(),
            heartbeats: Counter::default(),
            pending: Gauge::default(),
            team_publications: Counter::default(),
            team_publications_skipped: Counter::default(),
            lag: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            watermarks_forwarded: Counter::default(),
            watermarks_dropped: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("herald_broadcast");
        r.register(
            "events_applied",
            "events applied (L2 deleted, L1 published, acknowledged)",
            self.events_applied.clone(),
        );
        r.register("l2_entries_deleted", "L2 entries deleted by tag invalidations", self.l2_entries_deleted.clone());
        r.register(
            "malformed",
            "stream entries that could not be decoded (moved to the dead stream)",
            self.malformed.clone(),
        );
        r.register("claimed", "pending entries claimed from idle consumers", self.claimed.clone());
        r.register("errors", "apply attempts that failed and will be retried", self.errors.clone());
        r.register("heartbeats", "heartbeats published on the L1 channel", self.heartbeats.clone());
        r.register("pending", "entries read but not yet acknowledged by the group (sampled)", self.pending.clone());
        r.register("team_publications", "row changes published on team:{id} channels", self.team_publications.clone());
        r.register(
            "team_publications_skipped",
            "team changes not published (global table or team id not a valid channel id)",
            self.team_publications_skipped.clone(),
        );
        r.register("lag_seconds", "writer statement to L1 invalidation published", self.lag.clone());
        r.register(
            "watermarks_forwarded",
            "freshness watermarks published on the L1 channel after everything before them was applied",
            self.watermarks_forwarded.clone(),
        );
        r.register(
            "watermarks_dropped",
            "watermarks dropped because older stream entries stayed pending (the next one covers them)",
            self.watermarks_dropped.clone(),
        );
    }
}
