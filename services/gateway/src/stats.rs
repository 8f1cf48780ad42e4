//! The gateway's stats message on the ops channel (`[gateway.ops]`), once a
//! second by default: sockets and subscriptions held, and what happened
//! since the last message, per second.

use std::time::Duration;

use serde_json::json;

use crate::metrics::Metrics;

/// Builds each message from the metrics, remembering the counters of the
/// previous one.
pub struct StatsMessage {
    node: String,
    metrics: Metrics,
    previous: Counters,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    deliveries: u64,
    drops: u64,
    slow_closes: u64,
    publish_errors: u64,
    malformed: u64,
    recovery_reads: u64,
    rate_limited: u64,
}

impl Counters {
    fn read(m: &Metrics) -> Self {
        Self {
            deliveries: m.deliveries.get(),
            drops: m.drops.get(),
            slow_closes: m.slow_closes.get(),
            publish_errors: m.publish_errors.get(),
            malformed: m.malformed_messages.get(),
            recovery_reads: m.recovery_reads.get(),
            rate_limited: m.rate_limited.get(),
        }
    }
}

impl StatsMessage {
    pub fn new(node: String, metrics: Metrics) -> Self {
        let previous = Counters::read(&metrics);
        Self { node, metrics, previous }
    }

    /// The next message: gauges now, counters as rates over `elapsed`.
    pub fn next(&mut self, elapsed: Duration) -> Vec<u8> {
        let now = Counters::read(&self.metrics);
        let prev = std::mem::replace(&mut self.previous, now);
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs * 10.0).round() / 10.0;
        json!({
            "source": "gateway",
            "node": self.node,
            "sockets": self.metrics.sockets.get(),
            "subscriptions": self.metrics.subscriptions.get(),
            "redis_channels": self.metrics.redis_channels.get(),
            "deliveries_per_s": rate(now.deliveries, prev.deliveries),
            "recovery_reads_per_s": rate(now.recovery_reads, prev.recovery_reads),
            "drops": now.drops - prev.drops,
            "slow_closes": now.slow_closes - prev.slow_closes,
            "rate_limited": now.rate_limited - prev.rate_limited,
            "errors": (now.publish_errors - prev.publish_errors) + (now.malformed - prev.malformed),
        })
        .to_string()
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_the_counters_since_the_last_message() {
        let metrics = Metrics::default();
        let mut stats = StatsMessage::new("n1".into(), metrics.clone());
        metrics.deliveries.inc_by(30);
        metrics.sockets.set(4);
        let first: serde_json::Value = serde_json::from_slice(&stats.next(Duration::from_secs(2))).unwrap();
        assert_eq!(first["deliveries_per_s"], 15.0);
        assert_eq!(first["sockets"], 4);
        let second: serde_json::Value = serde_json::from_slice(&stats.next(Duration::from_secs(1))).unwrap();
        assert_eq!(second["deliveries_per_s"], 0.0);
    }
}
