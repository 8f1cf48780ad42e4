//! Judging reads against a freshness bound ([`Settings::max_staleness`],
//! the nodes' `cache.max_staleness_ms` and the near caches'
//! `max_staleness`): a read is **stale beyond the bound** when the value it
//! returned had been superseded (the newer state's COMMIT had returned to
//! its writer) more than the bound plus the measuring window before the
//! read started. With the bound set that number must be 0 in every phase,
//! faults included; the reads served from a cache and those bypassed to
//! Postgres say what it cost.
//!
//! [`Settings::max_staleness`]: super::Settings::max_staleness

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use herald_client::NearCache;
use herald_client::state::StaleCause;
use herald_proto::v1::Layer;

use super::{Histories, Read, note};
use crate::http_get;

/// What a phase showed about the bound.
#[derive(Debug, Clone, Default)]
pub struct BoundReport {
    /// Reads through the nodes whose value was superseded more than bound +
    /// window before they started.
    pub stale_beyond_bound: u64,
    /// Of those, the oldest superseding commit, milliseconds before its read.
    pub stale_oldest_ms: f64,
    /// Reads through the nodes answered from L1 or L2, and from Postgres
    /// (a miss's fill or a bypass), by the answers' `Layer`.
    pub reads_cached: u64,
    pub reads_database: u64,
    /// Reads the nodes sent to Postgres because they could not vouch for
    /// the bound (`herald_cache_bypassed_total`, by cause, summed over the
    /// nodes over the phase).
    pub bypassed: BTreeMap<String, u64>,
    /// Reads the nodes served from their cache past the bound
    /// (`on_stale = "serve"`: `herald_cache_served_stale_total`), by cause.
    pub served_stale: BTreeMap<String, u64>,
    /// The same judgement of the near caches' reads.
    pub near_stale_beyond_bound: u64,
    /// Near-cache reads answered from RAM (`herald_l1_hits_total`).
    pub near_from_ram: u64,
    /// Near-cache reads sent to the node for the bound, by cause.
    pub near_bypassed: BTreeMap<String, u64>,
}

impl BoundReport {
    pub fn bypassed_total(&self) -> u64 {
        self.bypassed.values().sum()
    }

    pub fn served_stale_total(&self) -> u64 {
        self.served_stale.values().sum()
    }

    pub fn near_bypassed_total(&self) -> u64 {
        self.near_bypassed.values().sum()
    }
}

/// Counters read at the start of a phase, to report the phase's share.
pub(super) struct Snapshot {
    /// Per node: bypassed and served stale, by cause.
    nodes: Vec<[BTreeMap<String, u64>; 2]>,
    near: Vec<(u64, BTreeMap<String, u64>)>,
}

impl Snapshot {
    pub(super) async fn take(ops: &[SocketAddr], near: &[NearCache]) -> Self {
        let mut nodes = Vec::new();
        for addr in ops {
            let text = http_get(*addr, "/metrics").await;
            nodes.push(["herald_cache_bypassed_total", "herald_cache_served_stale_total"].map(|m| by_cause(&text, m)));
        }
        Self { nodes, near: near.iter().map(near_counters).collect() }
    }

    /// What the counters grew by since `self` (a node restarted in the phase
    /// starts again from 0: then its whole count is the phase's).
    pub(super) fn since(&self, later: &Snapshot, report: &mut BoundReport) {
        let grown = |before: u64, after: u64| if after >= before { after - before } else { after };
        for (before, after) in self.nodes.iter().zip(&later.nodes) {
            for (i, into) in [&mut report.bypassed, &mut report.served_stale].into_iter().enumerate() {
                for (cause, n) in &after[i] {
                    *into.entry(cause.clone()).or_default() += grown(before[i].get(cause).copied().unwrap_or(0), *n);
                }
            }
        }
        for ((hits_before, before), (hits_after, after)) in self.near.iter().zip(&later.near) {
            report.near_from_ram += grown(*hits_before, *hits_after);
            for (cause, n) in after {
                *report.near_bypassed.entry(cause.clone()).or_default() +=
                    grown(before.get(cause).copied().unwrap_or(0), *n);
            }
        }
    }
}

fn near_counters(near: &NearCache) -> (u64, BTreeMap<String, u64>) {
    let stale = near.stale_metrics();
    let causes = [StaleCause::NoWatermark, StaleCause::WatermarkBehind]
        .into_iter()
        .map(|c| (c.label().to_string(), stale.bypassed(c)))
        .collect();
    (near.metrics().hits.get(), causes)
}

/// A node's counter `metric` (from its `/metrics` text), summed over
/// resources, by cause.
fn by_cause(text: &str, metric: &str) -> BTreeMap<String, u64> {
    let mut causes = BTreeMap::new();
    let prefix = format!("{metric}{{");
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let Some(cause) = labels.split("cause=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
        *causes.entry(cause.to_string()).or_default() += value.trim().parse::<f64>().unwrap_or(0.0) as u64;
    }
    causes
}

/// Counts the reads whose value had been superseded more than `limit`
/// before they started; the oldest such supersession, milliseconds.
pub(super) fn beyond(reads: &[Read], histories: &Histories, limit: Duration, examples: &mut Vec<String>) -> (u64, f64) {
    let limit_us = limit.as_micros() as i64;
    let (mut stale, mut oldest_ms) = (0, 0f64);
    for read in reads {
        let Some(history) = histories.get(&read.key) else { continue };
        // The last time the returned state became current; it was current
        // until the next state committed (if any did).
        let superseded_at = match history.iter().rposition(|(_, s)| *s == read.state) {
            Some(j) => match history.get(j + 1) {
                Some((t, _)) => *t,
                None => continue,
            },
            // A state the key never had: superseded since the start.
            None => history[0].0,
        };
        let age_us = read.started_us - superseded_at;
        if age_us > limit_us {
            stale += 1;
            oldest_ms = oldest_ms.max(age_us as f64 / 1000.0);
            note(
                examples,
                format!(
                    "bound: read of {} ({:?}) returned {:?}, superseded {:.1} ms before the read started",
                    read.key,
                    read.layer,
                    read.state,
                    age_us as f64 / 1000.0
                ),
            );
        }
    }
    (stale, oldest_ms)
}

/// Reads answered from a node's cache (L1 or L2) and from Postgres.
pub(super) fn layers(reads: &[Read]) -> (u64, u64) {
    let cached = reads.iter().filter(|r| matches!(r.layer, Layer::L1 | Layer::L2)).count() as u64;
    let database = reads.iter().filter(|r| r.layer == Layer::Database).count() as u64;
    (cached, database)
}
