//! Metrics of write commands (`write.rs`), under `herald_cache_write_*`,
//! and of the write-behind writer (`applier.rs`), under
//! `herald_cache_write_behind_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub command: String,
    /// `reached`, `not_reached`, or the error kind.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    pub command: String,
}

#[derive(Clone)]
pub struct WriteMetrics {
    /// Writes by command and outcome.
    pub writes: Family<OutcomeLabel, Counter>,
    /// Seconds from the commit to every live node past it (reached waits).
    pub wait_seconds: Family<CommandLabel, Histogram>,
    /// Write-behind commands not applied yet, every tenant's (as last
    /// counted by this node's writer: every node reports the same total).
    pub behind_pending: Gauge,
    /// Seconds from the enqueue (Redis's time) to the apply's commit.
    pub behind_lag_seconds: Histogram,
    /// Commands applied by this node, by outcome (applied, duplicate: found
    /// already applied, so skipped).
    pub behind_applied: Family<OutcomeLabel, Counter>,
    /// Commands moved to the dead-commands stream.
    pub behind_poisoned: Family<CommandLabel, Counter>,
    /// Apply attempts that failed transiently and were retried.
    pub behind_retries: Counter,
}

impl Default for WriteMetrics {
    fn default() -> Self {
        Self {
            writes: Family::default(),
            wait_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 14))),
            behind_pending: Gauge::default(),
            behind_lag_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            behind_applied: Family::default(),
            behind_poisoned: Family::default(),
            behind_retries: Counter::default(),
        }
    }
}

impl WriteMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("herald_cache_write");
        r.register(
            "commands",
            "write commands by outcome (reached, not_reached: the nodes did not catch up in time, or the error)",
            self.writes.clone(),
        );
        r.register(
            "wait_seconds",
            "commit to every live node past it, for waits that were reached",
            self.wait_seconds.clone(),
        );
        let r = registry.sub_registry_with_prefix("herald_cache_write_behind");
        r.register("pending", "write-behind commands not applied yet (every tenant's)", self.behind_pending.clone());
        r.register("lag_seconds", "enqueue to applied commit", self.behind_lag_seconds.clone());
        r.register("applied", "commands applied (applied, or duplicate: already applied)", self.behind_applied.clone());
        r.register("poisoned", "commands moved to the dead-commands stream", self.behind_poisoned.clone());
        r.register("retries", "apply attempts that failed transiently and were retried", self.behind_retries.clone());
    }

    pub fn outcome(&self, command: &str, outcome: &'static str) {
        self.writes.get_or_create(&OutcomeLabel { command: command.into(), outcome }).inc();
    }

    pub fn waited(&self, command: &str, seconds: f64) {
        self.wait_seconds.get_or_create(&CommandLabel { command: command.into() }).observe(seconds);
    }
}
