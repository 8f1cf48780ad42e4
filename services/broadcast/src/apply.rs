//! Applying stream entries: decode, delete the L2 entries the tags name,
//! publish the invalidations on the L1 channel, publish row changes of
//! tables with a team column on the `team:{id}` channels, and only then
//! acknowledge.

use fred::prelude::*;
use herald_core::channel::{self, Channel, HistoryOptions};
use herald_core::keys::{KeySpace, Scope, TenantId};
use herald_core::l2::L2;
use herald_core::time::now_us;
use herald_proto::Message as _;
use herald_proto::v1::InvalidationEvent;

use crate::metrics::Metrics;
use crate::stats::Stats;
use crate::watermark::Forwarder;
use herald_core::stream::{self, Entry};
use herald_proto::v1::Watermark;

#[derive(Clone)]
pub struct Applier {
    redis: Pool,
    keys: KeySpace,
    l2: L2,
    group: String,
    metrics: Metrics,
    /// History options of the `team` namespace, when the gateway has one.
    teams: Option<HistoryOptions>,
    /// The partition's stream (acknowledged here) and L1 channel.
    stream: String,
    l1_channel: String,
    /// Replicas that must have a batch's L2 deletes before it is
    /// acknowledged (`broadcast.wait_replicas`), and the `WAIT` timeout.
    wait: Option<(u32, u64)>,
    /// What the ops channel's stats message reports.
    stats: Stats,
}

/// Entries kept in the dead stream at most (approximately).
const DEAD_STREAM_MAX_LEN: u64 = 100_000;

/// Team publications are idempotent per event and team for this long: a
/// redelivered event (applied again after a crash before XACK) publishes
/// nothing twice.
const TEAM_IDEMPOTENCY_TTL_S: u64 = 600;

impl Applier {
    pub fn new(redis: Pool, keys: KeySpace, group: String, metrics: Metrics) -> Self {
        let l2 = L2::new(redis.clone(), keys.clone());
        let (stream, l1_channel) = (keys.stream(), keys.l1_channel());
        Self { redis, keys, l2, group, metrics, teams: None, stream, l1_channel, wait: None, stats: Stats::default() }
    }

    /// Applies partition `i` of `n` of the log: acknowledges on its stream,
    /// publishes (invalidations and watermarks) on its L1 channel.
    pub fn for_partition(mut self, i: u16, n: u16) -> Self {
        self.stream = self.keys.stream_partition(i, n);
        self.l1_channel = self.keys.l1_partition_channel(i, n);
        self
    }

    /// Waits for `replicas` replicas (at most `timeout_ms` per master) to
    /// have a batch's L2 deletes before publishing and acknowledging it.
    pub fn with_replica_wait(mut self, replicas: u32, timeout_ms: u64) -> Self {
        self.wait = (replicas > 0).then_some((replicas, timeout_ms));
        self
    }

    /// Also publish row changes of tables with a team column on `team:{id}`
    /// channels, with the `team` namespace's history options.
    pub fn with_team_channels(mut self, history: Option<HistoryOptions>) -> Self {
        self.teams = history;
        self
    }

    /// Record what is applied into `stats` (for the ops channel).
    pub fn with_stats(mut self, stats: Stats) -> Self {
        self.stats = stats;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Applies `entries` and acknowledges them, then forwards the last
    /// watermark among them. On error nothing is acknowledged; the entries
    /// stay pending and are applied again later (deletes are idempotent).
    pub async fn apply(&self, entries: Vec<Entry>) -> Result<usize, fred::error::Error> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut events = Vec::with_capacity(entries.len());
        let mut ids = Vec::with_capacity(entries.len());
        let mut watermark = None;
        for entry in entries {
            if entry.watermark.is_some() {
                match decode_watermark(&entry) {
                    Ok(w) => watermark = Some((entry.id.clone(), w)),
                    Err(reason) => self.dead_letter(&entry, &reason).await?,
                }
            } else {
                match decode(&entry) {
                    Ok(event) => events.push(event),
                    Err(reason) => self.dead_letter(&entry, &reason).await?,
                }
            }
            ids.push(entry.id);
        }
        // All of a batch's L2 invalidations in flight at once (the pool
        // pipelines them): deletes and stamps commute, and every one has
        // finished before anything is published or acknowledged. With a
        // replica wait they all go over one client, whose connections the
        // WAIT then covers.
        let pinned = self.wait.map(|_| self.redis.next());
        let invalidations = events.iter().map(|event| async move {
            let client = pinned.unwrap_or_else(|| self.redis.next());
            let tags = herald_core::tags::event_tags(event);
            if event.all_tenants {
                self.l2.invalidate_all_scopes_on(client, &tags).await
            } else {
                match Scope::from_event_tenant(&event.tenant) {
                    Ok(scope) => {
                        Ok((self.l2.invalidate_on(client, &scope, &tags).await?, vec![self.l2.slot_of(&scope)]))
                    }
                    // Capture validates tenants; an event that still has a bad
                    // one names no key Herald could have written.
                    Err(_) => Ok((0, Vec::new())),
                }
            }
        });
        let applied = futures::future::try_join_all(invalidations).await.map_err(core_to_redis)?;
        self.metrics.l2_entries_deleted.inc_by(applied.iter().map(|(n, _)| n).sum());
        if let (Some(client), Some((replicas, timeout_ms))) = (pinned, self.wait) {
            let mut slots: Vec<u16> = applied.into_iter().flat_map(|(_, slots)| slots).collect();
            slots.sort_unstable();
            slots.dedup();
            let acked = herald_core::redis::wait_for_replicas(client, &slots, replicas, timeout_ms)
                .await
                .map_err(core_to_redis)?;
            if acked < i64::from(replicas) {
                return Err(fred::error::Error::new(
                    fred::error::ErrorKind::Unknown,
                    format!("only {acked} of {replicas} replicas acknowledged the l2 deletes; not acknowledged"),
                ));
            }
        }
        herald_core::l1::wire::publish_invalidations(&self.redis, &self.l1_channel, &events)
            .await
            .map_err(core_to_redis)?;
        self.publish_teams(&events).await?;
        let _: i64 = self.redis.next().xack(&self.stream, &self.group, ids).await?;
        let now = now_us();
        {
            let mut window = self.stats.window.lock().unwrap_or_else(|p| p.into_inner());
            for event in &events {
                let lag_us = (now - event.commit_time_us).max(0);
                self.metrics.lag.observe(lag_us as f64 / 1e6);
                window.record(&event.tenant, lag_us);
            }
        }
        self.metrics.events_applied.inc_by(events.len() as u64);
        if let Some((entry_id, watermark)) = watermark {
            let forwarder = Forwarder::new(
                self.redis.clone(),
                self.stream.clone(),
                self.group.clone(),
                self.l1_channel.clone(),
                self.metrics.clone(),
            );
            forwarder.forward(entry_id, watermark).await;
        }
        Ok(events.len())
    }

    /// One publication per event and team on `team:{id}` of the event's
    /// tenant: `{"type":"change","table","op","ids"}`. Idempotent per event
    /// and team, so the at-least-once redelivery of an event does not
    /// publish twice.
    async fn publish_teams(&self, events: &[InvalidationEvent]) -> Result<(), fred::error::Error> {
        let Some(history) = self.teams else { return Ok(()) };
        for event in events {
            if event.teams.is_empty() {
                continue;
            }
            let Ok(tenant) = TenantId::new(&event.tenant) else {
                // Team channels live inside a tenant; a global table has none.
                self.metrics.team_publications_skipped.inc();
                continue;
            };
            let data = team_change_json(event);
            for team in &event.teams {
                let Ok(channel) = Channel::parse(&format!("team:{team}")) else {
                    self.metrics.team_publications_skipped.inc();
                    continue;
                };
                let key = format!("ev:{}:team:{team}", event.event_id);
                let idempotency =
                    channel::validate_idempotency_key(&key).ok().map(|_| (key.as_str(), TEAM_IDEMPOTENCY_TTL_S));
                channel::publish(&self.redis, &self.keys, &tenant, &channel, history, data.as_bytes(), idempotency)
                    .await
                    .map_err(core_to_redis)?;
                self.metrics.team_publications.inc();
            }
        }
        Ok(())
    }

    /// Keeps an undecodable entry (with the reason) in the dead stream.
    async fn dead_letter(&self, entry: &Entry, reason: &str) -> Result<(), fred::error::Error> {
        self.metrics.malformed.inc();
        tracing::warn!(entry_id = %entry.id, %reason, "malformed stream entry moved to the dead stream");
        let payload = entry.payload.clone().or_else(|| entry.watermark.clone()).unwrap_or_default();
        let dead = self.keys.dead_stream();
        stream::append_dead_letter(self.redis.next(), &dead, &entry.id, reason, payload, DEAD_STREAM_MAX_LEN).await
    }
}

pub fn decode(entry: &Entry) -> Result<InvalidationEvent, String> {
    let payload = entry.payload.as_ref().ok_or("entry has no field e")?;
    let event = InvalidationEvent::decode(payload.as_ref()).map_err(|e| format!("undecodable event: {e}"))?;
    if event.table.is_empty() {
        return Err("event has no table".into());
    }
    if event.tags.is_empty() {
        return Err("event has no tags".into());
    }
    Ok(event)
}

pub fn decode_watermark(entry: &Entry) -> Result<Watermark, String> {
    let bytes = entry.watermark.as_ref().ok_or("entry has no field w")?;
    Watermark::decode(bytes.as_ref()).map_err(|e| format!("undecodable watermark: {e}"))
}

/// The payload of a team publication.
fn team_change_json(event: &InvalidationEvent) -> String {
    let op = event.operation().as_str_name().trim_start_matches("OPERATION_").to_lowercase();
    serde_json::json!({"type": "change", "table": event.table, "op": op, "ids": event.ids}).to_string()
}

pub(crate) fn core_to_redis(error: herald_core::Error) -> fred::error::Error {
    match error {
        herald_core::Error::Redis(e) => e,
        other => fred::error::Error::new(fred::error::ErrorKind::Unknown, other.to_string()),
    }
}
