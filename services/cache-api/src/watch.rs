//! `Watch` (v2): the feed of near caches. One stream per client carries the
//! invalidations this node applies for the watched tenants, framed as
//! `Ready`, `Events{seq}` and `Heartbeat{generation, seq}`, and ends with a
//! status whenever the node cannot vouch for completeness (its L1 flushed or
//! went not-live: `UNAVAILABLE`; the watcher fell behind: `DATA_LOSS`).
//! docs/near-cache.md states the contract and why fills stay safe.
//!
//! Completeness rests on [`L1Cache::watch`]: every event after it was applied
//! and every flush, in order. The stream subscribes before it reads the
//! generation and checks liveness, so any flush after its `Ready` reaches it.
//!
//! Freshness rides the same channel: each freshness watermark arrives after
//! the events it covers, so once the stream has sent those events it may
//! vouch for the watermark. Every `position` carries the stream's staleness
//! (node clock minus the watermark's Postgres time, plus
//! `cache.clock_skew_ms`), and a heartbeat follows each new watermark, so a
//! near cache with a `max_staleness_ms` knows how fresh it is.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use herald_core::keys::TenantId;
use herald_core::l1::{Applied, L1Cache};
use herald_proto::v1::watch_message::{Body, Events, Heartbeat, Ready};
use herald_proto::v1::{InvalidationEvent, WatchMessage, WatchPosition, WatchRequest};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc;
use tonic::Status;

use crate::auth::Caller;
use crate::error::Error;

/// Most events in one `Events` message.
const MAX_BATCH: usize = 256;

/// Which tenants a stream watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// `*`: every tenant (a token bound to every tenant only).
    All,
    Only(BTreeSet<TenantId>),
}

impl Watched {
    /// The tenants of `request`, each checked against the caller's token.
    pub fn of(caller: &Caller, request: &WatchRequest) -> Result<Self, Error> {
        let names: Vec<&str> = if request.tenants.is_empty() {
            vec![request.tenant.as_str()]
        } else {
            request.tenants.iter().map(String::as_str).collect()
        };
        if names.contains(&"*") {
            if names.len() > 1 {
                return Err(Error::InvalidArgument("`*` watches every tenant: name no other tenant with it".into()));
            }
            if !caller.trusted() {
                return Err(Error::PermissionDenied { token: caller.token.clone(), tenant: "*".into() });
            }
            return Ok(Watched::All);
        }
        let tenants = names.into_iter().map(|t| caller.tenant(t)).collect::<Result<BTreeSet<_>, _>>()?;
        Ok(Watched::Only(tenants))
    }

    fn includes(&self, tenant: &str) -> bool {
        match self {
            Watched::All => true,
            Watched::Only(set) => set.iter().any(|t| t.as_str() == tenant),
        }
    }
}

/// Whether a watcher of `watched` tenants filtering by `tables` and `tags`
/// gets `event`. Events of other tenants never pass; tenant-wide events (a
/// TRUNCATE of a tenant table) and global-scope events (tables without a
/// tenant column, whose entries every tenant may read) reach every watcher.
/// The cache API's own invalidations (Delete, Set, InvalidateTags,
/// InvalidatePrefix) name no table, so a table filter cannot exclude them.
pub fn matches(event: &InvalidationEvent, watched: &Watched, tables: &[String], tags: &[String]) -> bool {
    let ours = event.all_tenants || event.tenant.is_empty() || watched.includes(&event.tenant);
    let table_ok = tables.is_empty() || event.table.is_empty() || tables.contains(&event.table);
    let tags_ok = tags.is_empty()
        || herald_core::tags::is_table_wide(event)
        || !event.key_prefixes.is_empty()
        || event.tags.iter().any(|t| tags.iter().any(|w| w == t));
    ours && table_ok && tags_ok
}

/// What one stream needs; its permits are held until it ends.
pub struct Stream<P> {
    pub l1: L1Cache,
    pub node: String,
    pub heartbeat: Duration,
    /// `cache.clock_skew_ms`: added to every staleness sent.
    pub clock_skew_ms: u64,
    pub watched: Watched,
    pub tables: Vec<String>,
    pub tags: Vec<String>,
    pub permits: P,
}

type Sender = mpsc::Sender<Result<WatchMessage, Status>>;

fn message(body: Body) -> Result<WatchMessage, Status> {
    Ok(WatchMessage { body: Some(body) })
}

fn flushed() -> Status {
    Status::unavailable(
        "this node's cache generation changed (its invalidation feed was interrupted or it flushed): \
         drop everything and watch again",
    )
}

/// Starts `stream`: fails with `UNAVAILABLE` when the node is not live,
/// else spawns its task and returns the receiving end.
pub fn start<P: Send + 'static>(stream: Stream<P>) -> Result<mpsc::Receiver<Result<WatchMessage, Status>>, Status> {
    // Read before subscribing: the position may only understate what the
    // stream has delivered (read-your-writes and the staleness bound rely
    // on it).
    let applied_before = stream.l1.applied();
    let watermark_before = stream.l1.watermark_time_us();
    let applied = stream.l1.watch();
    let generation = stream.l1.generation();
    if !stream.l1.is_live() {
        return Err(Status::unavailable("this node's invalidation feed is down; retry"));
    }
    let (tx, rx) = mpsc::channel(64);
    let position =
        WatchPosition { commit_lsn: applied_before.commit_lsn, events: applied_before.events, staleness_ms: None };
    let freshness = Freshness { watermark_time_us: watermark_before, clock_skew_ms: stream.clock_skew_ms };
    tokio::spawn(run(stream, applied, generation, (position, freshness), tx));
    Ok(rx)
}

async fn run<P>(
    stream: Stream<P>,
    mut applied: tokio::sync::broadcast::Receiver<Applied>,
    generation: u64,
    (mut position, mut freshness): (WatchPosition, Freshness),
    tx: Sender,
) {
    let _permits = &stream.permits;
    let ready = Ready {
        node_id: stream.node.clone(),
        generation,
        position: Some(freshness.stamp(position)),
        heartbeat_ms: stream.heartbeat.as_millis() as u64,
    };
    if tx.send(message(Body::Ready(ready))).await.is_err() {
        return;
    }
    let mut seq = 0u64;
    let mut ticks = tokio::time::interval(stream.heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        let first = tokio::select! {
            received = applied.recv() => received,
            _ = ticks.tick() => {
                if !stream.l1.is_live() || stream.l1.generation() != generation {
                    let _ = tx.send(Err(flushed())).await;
                    return;
                }
                let heartbeat = Heartbeat { generation, seq, position: Some(freshness.stamp(position)) };
                if tx.send(message(Body::Heartbeat(heartbeat))).await.is_err() {
                    return;
                }
                continue;
            }
            _ = tx.closed() => return,
        };
        let mut batch = Vec::new();
        let mut fresher = false;
        let mut next = Some(first.map_err(Missed::from));
        let end = loop {
            let Some(item) = next.take() else { break None };
            match item {
                Ok(Applied::Event(event)) => {
                    position.commit_lsn = position.commit_lsn.max(event.commit_lsn);
                    position.events += 1;
                    if matches(&event, &stream.watched, &stream.tables, &stream.tags) {
                        batch.push((*event).clone());
                    }
                }
                Ok(Applied::Watermark { pg_time_us, .. }) => {
                    fresher |= freshness.advance(pg_time_us);
                }
                // A flush that happened before this stream read its
                // generation is already accounted for.
                Ok(Applied::Flushed { generation: g }) if g <= generation => {}
                Ok(Applied::Flushed { .. }) => break Some(flushed()),
                Err(Missed::Lagged(n)) => {
                    break Some(Status::data_loss(format!(
                        "watcher fell {n} events behind: drop everything and watch again"
                    )));
                }
                Err(Missed::Closed) => break Some(Status::unavailable("this node is shutting down")),
                Err(Missed::Empty) => break None,
            }
            if batch.len() < MAX_BATCH {
                next = Some(applied.try_recv().map_err(Missed::from));
            }
        };
        if !batch.is_empty() {
            seq += 1;
            if tx.send(message(Body::Events(Events { seq, events: batch }))).await.is_err() {
                return;
            }
        }
        if let Some(status) = end {
            let _ = tx.send(Err(status)).await;
            return;
        }
        if fresher {
            // After the events the watermark covers: tell the client at once.
            let heartbeat = Heartbeat { generation, seq, position: Some(freshness.stamp(position)) };
            if tx.send(message(Body::Heartbeat(heartbeat))).await.is_err() {
                return;
            }
        }
    }
}

/// The newest freshness watermark this stream has passed on (every event
/// before it was sent), and what a position sent now says about it.
#[derive(Debug, Clone, Copy)]
struct Freshness {
    /// Postgres time of the watermark, microseconds (0: none yet).
    watermark_time_us: i64,
    clock_skew_ms: u64,
}

impl Freshness {
    /// True when `pg_time_us` is newer than the watermark held.
    fn advance(&mut self, pg_time_us: i64) -> bool {
        let newer = pg_time_us > self.watermark_time_us;
        self.watermark_time_us = self.watermark_time_us.max(pg_time_us);
        newer
    }

    /// `position` with the staleness as of now.
    fn stamp(&self, position: WatchPosition) -> WatchPosition {
        let staleness_ms = (self.watermark_time_us > 0).then(|| {
            let age_ms = (herald_core::time::now_us() - self.watermark_time_us).max(0) as u64 / 1000;
            age_ms + self.clock_skew_ms
        });
        WatchPosition { staleness_ms, ..position }
    }
}

/// Why the next applied item is not there.
enum Missed {
    Lagged(u64),
    Closed,
    Empty,
}

impl From<RecvError> for Missed {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Lagged(n) => Missed::Lagged(n),
            RecvError::Closed => Missed::Closed,
        }
    }
}

impl From<TryRecvError> for Missed {
    fn from(e: TryRecvError) -> Self {
        match e {
            TryRecvError::Lagged(n) => Missed::Lagged(n),
            TryRecvError::Closed => Missed::Closed,
            TryRecvError::Empty => Missed::Empty,
        }
    }
}

/// Shared by both watch RPCs: the node's and tenants' watch-stream limits.
pub fn shares(
    quota: &crate::quota::TenantQuota,
    node: &Arc<tokio::sync::Semaphore>,
    watched: &Watched,
) -> Result<(Vec<crate::quota::QuotaPermit>, tokio::sync::OwnedSemaphorePermit), Status> {
    let mut held = Vec::new();
    if let Watched::Only(tenants) = watched {
        for tenant in tenants {
            held.push(quota.try_acquire(tenant).ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "tenant {tenant} has {} watch streams on this node (cache.max_watchers_per_tenant)",
                    quota.per_tenant()
                ))
            })?);
        }
    }
    let permit = node
        .clone()
        .try_acquire_owned()
        .map_err(|_| Status::resource_exhausted("too many invalidation watchers on this node (cache.max_watchers)"))?;
    Ok((held, permit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(tenants: &[&str]) -> Watched {
        Watched::Only(tenants.iter().map(|t| TenantId::new(t).unwrap()).collect())
    }

    #[test]
    fn a_position_vouches_only_for_a_watermark_passed_on_plus_the_skew() {
        let mut freshness = Freshness { watermark_time_us: 0, clock_skew_ms: 30 };
        assert_eq!(freshness.stamp(WatchPosition::default()).staleness_ms, None, "no watermark: no bound");
        let two_seconds_ago = herald_core::time::now_us() - 2_000_000;
        assert!(freshness.advance(two_seconds_ago));
        assert!(!freshness.advance(two_seconds_ago - 1), "an older watermark changes nothing");
        let staleness = freshness.stamp(WatchPosition::default()).staleness_ms.unwrap();
        assert!(staleness >= 2_030, "its age plus the skew, got {staleness}");
    }

    #[test]
    fn watch_filter_keeps_tenants_apart() {
        let event = InvalidationEvent {
            tenant: "acme".into(),
            table: "res_users".into(),
            tags: vec!["res_users.id=1".into()],
            ..Default::default()
        };
        let (acme, globex) = (only(&["acme"]), only(&["globex"]));
        assert!(matches(&event, &acme, &[], &[]));
        assert!(!matches(&event, &globex, &[], &[]));
        assert!(matches(&event, &only(&["globex", "acme"]), &[], &[]));
        assert!(matches(&event, &Watched::All, &[], &[]));
        assert!(matches(&event, &acme, &["res_users".into()], &["res_users.id=1".into()]));
        assert!(!matches(&event, &acme, &["other".into()], &[]));
        assert!(!matches(&event, &acme, &[], &["res_users.id=2".into()]));
        let api = InvalidationEvent { table: String::new(), ..event.clone() };
        assert!(matches(&api, &acme, &["res_users".into()], &[]));
        assert!(!matches(&api, &globex, &["res_users".into()], &[]));
        let global = InvalidationEvent { tenant: String::new(), ..event.clone() };
        assert!(matches(&global, &globex, &["res_users".into()], &[]));
        let truncate = InvalidationEvent { all_tenants: true, ..event };
        assert!(matches(&truncate, &globex, &[], &[]));
    }
}
