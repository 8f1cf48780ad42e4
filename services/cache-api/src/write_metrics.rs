//! Metrics of write commands (`write.rs`), under `herald_cache_write_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
}

impl Default for WriteMetrics {
    fn default() -> Self {
        Self {
            writes: Family::default(),
            wait_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 14))),
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
    }

    pub fn outcome(&self, command: &str, outcome: &'static str) {
        self.writes.get_or_create(&OutcomeLabel { command: command.into(), outcome }).inc();
    }

    pub fn waited(&self, command: &str, seconds: f64) {
        self.wait_seconds.get_or_create(&CommandLabel { command: command.into() }).observe(seconds);
    }
}
