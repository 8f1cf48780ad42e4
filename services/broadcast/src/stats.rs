//! Broadcast's stats message on the ops channel (`[gateway.ops]`), once a
//! second by default: invalidations per second, commit → applied lag (p50,
//! p99) of the events applied since the last message, the stream's pending
//! and unread entries, events per tenant, errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::metrics::Metrics;

/// What the applier saw since the last message.
#[derive(Default)]
pub struct Window {
    /// Commit → applied, microseconds, one per event.
    lags_us: Vec<i64>,
    /// Events per tenant (`""`: a global table).
    tenants: BTreeMap<String, u64>,
}

/// Samples kept per window at most (a busy second keeps the first ones).
const MAX_SAMPLES: usize = 100_000;

impl Window {
    pub fn record(&mut self, tenant: &str, lag_us: i64) {
        if self.lags_us.len() < MAX_SAMPLES {
            self.lags_us.push(lag_us.max(0));
        }
        match self.tenants.get_mut(tenant) {
            Some(n) => *n += 1,
            None => {
                self.tenants.insert(tenant.to_string(), 1);
            }
        }
    }
}

/// Shared between the applier (which records) and the stats loop.
#[derive(Clone, Default)]
pub struct Stats {
    pub window: Arc<Mutex<Window>>,
    /// Entries of the stream the group has not read yet (`XINFO GROUPS` lag).
    pub stream_unread: Arc<AtomicI64>,
}

/// Builds each message, remembering the counters of the previous one.
pub struct StatsMessage {
    instance: String,
    metrics: Metrics,
    stats: Stats,
    previous: (u64, u64, u64),
}

impl StatsMessage {
    pub fn new(instance: String, metrics: Metrics, stats: Stats) -> Self {
        let previous = counters(&metrics);
        Self { instance, metrics, stats, previous }
    }

    pub fn next(&mut self, elapsed: Duration) -> Vec<u8> {
        let window = std::mem::take(&mut *self.stats.window.lock().unwrap_or_else(|p| p.into_inner()));
        let now = counters(&self.metrics);
        let (events, deleted, errors) = (
            now.0.saturating_sub(self.previous.0),
            now.1.saturating_sub(self.previous.1),
            now.2.saturating_sub(self.previous.2),
        );
        self.previous = now;
        let secs = elapsed.as_secs_f64().max(1e-3);
        let per_s = |n: u64| (n as f64 / secs * 10.0).round() / 10.0;
        let mut lags = window.lags_us;
        lags.sort_unstable();
        json!({
            "source": "broadcast",
            "instance": self.instance,
            "invalidations_per_s": per_s(events),
            "l2_deleted_per_s": per_s(deleted),
            "lag_ms": {"p50": percentile_ms(&lags, 0.50), "p99": percentile_ms(&lags, 0.99)},
            "stream_pending": self.metrics.pending.get(),
            "stream_unread": self.stats.stream_unread.load(Ordering::Relaxed),
            "tenants": window.tenants,
            "errors": errors,
        })
        .to_string()
        .into_bytes()
    }
}

fn counters(m: &Metrics) -> (u64, u64, u64) {
    (m.events_applied.get(), m.l2_entries_deleted.get(), m.errors.get() + m.malformed.get())
}

/// The `q` quantile of sorted microsecond samples, in milliseconds (null when empty).
fn percentile_ms(sorted_us: &[i64], q: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let i = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    Some((sorted_us[i] as f64 / 100.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reports_the_window_and_empties_it() {
        let metrics = Metrics::default();
        let stats = Stats::default();
        let mut message = StatsMessage::new("b1".into(), metrics.clone(), stats.clone());
        for lag_ms in 1..=100 {
            stats.window.lock().unwrap().record("acme", lag_ms * 1000);
        }
        stats.window.lock().unwrap().record("globex", 5000);
        metrics.events_applied.inc_by(101);
        let m: serde_json::Value = serde_json::from_slice(&message.next(Duration::from_secs(1))).unwrap();
        assert_eq!(m["invalidations_per_s"], 101.0);
        assert_eq!(m["lag_ms"]["p50"], 50.0);
        assert_eq!(m["lag_ms"]["p99"], 99.0);
        assert_eq!(m["tenants"]["acme"], 100);
        assert_eq!(m["tenants"]["globex"], 1);
        let m: serde_json::Value = serde_json::from_slice(&message.next(Duration::from_secs(1))).unwrap();
        assert_eq!(m["invalidations_per_s"], 0.0);
        assert!(m["lag_ms"]["p50"].is_null());
        assert_eq!(m["tenants"], json!({}));
    }
}
