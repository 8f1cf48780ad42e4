//! The hub: which local connections want which channels, fan-out of
//! publications to their bounded queues, and the gap check of the live path.
//!
//! The node holds one Redis subscription per channel that at least one of
//! its sockets wants ([`crate::subscriber`] keeps the two sets equal, in
//! batches). Every publication carries its channel's offset and epoch; the
//! hub remembers the last one it delivered per channel, and when an offset
//! jumps it reads the missing publications from the channel's history and
//! delivers them first. When history cannot fill the gap, every subscriber of
//! the channel is told to resubscribe with recovery — a loss is never silent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use fred::prelude::Pool;
use herald_core::channel::{self, Channel, ChannelKeys, HistoryOptions, Publication};
use herald_core::keys::{KeySpace, TenantId};
use tokio::sync::{Notify, watch};

use crate::metrics::{Metrics, ResultLabel};
use crate::protocol::publication_frame;

/// A connection's id, unique within the node.
pub type ConnId = u64;

/// What the hub queues for a connection.
#[derive(Debug)]
pub enum Out {
    /// A publication; `offset` 0 means delivered locally while Redis was
    /// down (no position).
    Pub { channel: Arc<str>, offset: u64, epoch: Arc<str>, frame: Utf8Bytes },
    /// The server ended this subscription: a gap it could not fill.
    Resync { channel: Arc<str> },
}

impl Out {
    fn len(&self) -> usize {
        match self {
            Out::Pub { frame, .. } => frame.len(),
            Out::Resync { channel } => 64 + channel.len(),
        }
    }
}

/// A connection's outgoing queue, bounded in bytes (queued plus being
/// written). When a push would pass the bound the connection is marked slow:
/// the queue is dropped and the connection closes with the slow code.
pub struct Outbox {
    state: Mutex<OutState>,
    /// Something was queued.
    pub ready: Notify,
    /// The connection became slow.
    pub slow: Notify,
    max_bytes: usize,
}

#[derive(Default)]
struct OutState {
    queue: VecDeque<Out>,
    bytes: usize,
    slow: bool,
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Self {
        Self { state: Mutex::default(), ready: Notify::new(), slow: Notify::new(), max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `out`; false when the connection is (now) slow.
    pub fn push(&self, out: Out) -> bool {
        let len = out.len();
        let mut s = self.lock();
        if s.slow {
            return false;
        }
        if s.bytes + len > self.max_bytes {
            s.slow = true;
            s.queue = VecDeque::new();
            drop(s);
            self.slow.notify_one();
            self.ready.notify_one();
            return false;
        }
        s.bytes += len;
        s.queue.push_back(out);
        let first = s.queue.len() == 1;
        drop(s);
        if first {
            self.ready.notify_one();
        }
        true
    }

    /// Moves everything queued into `into` and returns its size; `None`
    /// when slow. The bytes stay counted until [`Outbox::written`].
    pub fn take(&self, into: &mut VecDeque<Out>) -> Option<usize> {
        let mut s = self.lock();
        if s.slow {
            return None;
        }
        let mut n = 0;
        while let Some(out) = s.queue.pop_front() {
            n += out.len();
            into.push_back(out);
        }
        Some(n)
    }

    pub fn written(&self, bytes: usize) {
        let mut s = self.lock();
        s.bytes = s.bytes.saturating_sub(bytes);
    }

    pub fn is_slow(&self) -> bool {
        self.lock().slow
    }
}

struct Entry {
    tenant: TenantId,
    channel: Channel,
    name: Arc<str>,
    history: HistoryOptions,
    subs: HashMap<ConnId, Arc<Outbox>>,
    /// The Redis subscription is confirmed.
    active: bool,
    /// Where the channel was when this node last knew.
    last: Last,
}

/// A channel's position as the hub knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Last {
    /// Not read yet (the Redis subscription is not confirmed).
    Unknown,
    /// The channel had no state when the subscription was confirmed: its
    /// next publication starts an epoch at offset 1.
    Empty,
    /// Epoch and offset of the last publication delivered (or read).
    At(Arc<str>, u64),
}

/// What to do with a publication from Redis.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Deliver,
    Duplicate,
    /// Publications after `since` (of the publication's epoch) are missing.
    Gap {
        since: u64,
    },
}

fn classify(last: &Last, p: &Publication) -> Step {
    match last {
        Last::Unknown => Step::Deliver,
        Last::Empty if p.offset == 1 => Step::Deliver,
        Last::Empty => Step::Gap { since: 0 },
        Last::At(epoch, offset) if **epoch == *p.epoch => {
            if p.offset <= *offset {
                Step::Duplicate
            } else if p.offset == offset + 1 {
                Step::Deliver
            } else {
                Step::Gap { since: *offset }
            }
        }
        // A new epoch starts at 1; anything later means we missed its start.
        Last::At(..) if p.offset == 1 => Step::Deliver,
        Last::At(..) => Step::Gap { since: 0 },
    }
}

pub struct Hub {
    channels: Mutex<HashMap<String, Entry>>,
    /// The set of wanted channels changed.
    pub dirty: Notify,
    active_gen: watch::Sender<u64>,
    redis_up: Arc<AtomicBool>,
    /// Redis has been up at least once (before that, a subscribe waits for
    /// it rather than answering degraded at once).
    redis_seen: AtomicBool,
    keys: KeySpace,
    metrics: Metrics,
}

impl Hub {
    pub fn new(keys: KeySpace, metrics: Metrics) -> Self {
        Self {
            channels: Mutex::default(),
            dirty: Notify::new(),
            active_gen: watch::Sender::new(0),
            redis_up: Arc::new(AtomicBool::new(false)),
            redis_seen: AtomicBool::new(false),
            keys,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// Adds connection `conn` to `channel` of `tenant`; returns the channel's
    /// pub/sub name (the hub's key for it).
    pub fn join(
        &self,
        conn: ConnId,
        outbox: Arc<Outbox>,
        tenant: &TenantId,
        channel: &Channel,
        history: HistoryOptions,
    ) -> String {
        let pubsub = ChannelKeys::new(&self.keys, tenant, channel).pubsub;
        let mut channels = self.lock();
        let created = !channels.contains_key(&pubsub);
        let entry = channels.entry(pubsub.clone()).or_insert_with(|| Entry {
            tenant: tenant.clone(),
            channel: channel.clone(),
            name: channel.as_str().into(),
            history,
            subs: HashMap::new(),
            active: false,
            last: Last::Unknown,
        });
        if entry.subs.insert(conn, outbox).is_none() {
            self.metrics.subscriptions.inc();
        }
        drop(channels);
        if created {
            self.dirty.notify_one();
        }
        pubsub
    }

    /// Removes `conn` from the channel; the last one out releases the Redis
    /// subscription.
    pub fn leave(&self, conn: ConnId, pubsub: &str) {
        let mut channels = self.lock();
        let Some(entry) = channels.get_mut(pubsub) else { return };
        if entry.subs.remove(&conn).is_some() {
            self.metrics.subscriptions.dec();
        }
        if entry.subs.is_empty() {
            channels.remove(pubsub);
            drop(channels);
            self.dirty.notify_one();
        }
    }

    /// Waits until the node's Redis subscription of the channel is
    /// confirmed; false when Redis is down (after having been up) or
    /// `timeout` passes.
    pub async fn wait_active(&self, pubsub: &str, timeout: Duration) -> bool {
        let mut generation = self.active_gen.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.lock().get(pubsub) {
                Some(entry) if entry.active => return true,
                Some(_) => {}
                None => return false,
            }
            if !self.redis_up() && self.redis_seen.load(Ordering::Relaxed) {
                // An outage: answer degraded at once.
                return false;
            }
            if tokio::time::timeout_at(deadline, generation.changed()).await.is_err() {
                return false;
            }
        }
    }

    /// The flag behind [`Hub::redis_up`], for components that skip Redis
    /// while it is down.
    pub fn redis_flag(&self) -> Arc<AtomicBool> {
        self.redis_up.clone()
    }

    /// Redis was up and is down now (an outage, not the start).
    pub fn redis_outage(&self) -> bool {
        !self.redis_up() && self.redis_seen.load(Ordering::Relaxed)
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed)
    }

    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.store(up, Ordering::Relaxed);
        if up {
            self.redis_seen.store(true, Ordering::Relaxed);
        } else {
            for entry in self.lock().values_mut() {
                entry.active = false;
            }
        }
        self.active_gen.send_modify(|g| *g += 1);
    }

    /// The channels some local connection wants.
    pub fn wanted(&self) -> HashSet<String> {
        self.lock().keys().cloned().collect()
    }

    /// The channels (of `names`) whose position is not known yet, with
    /// what is needed to read it.
    pub fn unknown_positions(&self, names: &[String]) -> Vec<(String, TenantId, Channel)> {
        let channels = self.lock();
        names
            .iter()
            .filter_map(|n| {
                let e = channels.get(n)?;
                (e.last == Last::Unknown).then(|| (n.clone(), e.tenant.clone(), e.channel.clone()))
            })
            .collect()
    }

    /// Sets a channel's position read right after its Redis subscription
    /// was confirmed (unless a publication set it meanwhile).
    pub fn set_position(&self, pubsub: &str, last: Last) {
        if let Some(entry) = self.lock().get_mut(pubsub)
            && entry.last == Last::Unknown
        {
            entry.last = last;
        }
    }

    /// Marks the channels in `subscribed` as having a live Redis subscription.
    pub fn mark_active(&self, subscribed: &HashSet<String>) {
        let mut changed = false;
        for (name, entry) in self.lock().iter_mut() {
            if !entry.active && subscribed.contains(name) {
                entry.active = true;
                changed = true;
            }
        }
        if changed {
            self.active_gen.send_modify(|g| *g += 1);
        }
    }

    /// Queues `p` for every subscriber of the channel and remembers its
    /// position. Returns how many sockets it was queued for.
    fn fan_out(&self, pubsub: &str, p: &Publication) -> usize {
        let mut channels = self.lock();
        let Some(entry) = channels.get_mut(pubsub) else { return 0 };
        let Ok(data) = std::str::from_utf8(&p.data) else {
            self.metrics.malformed_messages.inc();
            return 0;
        };
        if p.offset > 0 {
            entry.last = Last::At(p.epoch.clone(), p.offset);
        }
        let frame = publication_frame(&entry.name, p.offset, &p.epoch, data);
        let mut delivered = 0;
        for outbox in entry.subs.values() {
            let out = Out::Pub {
                channel: entry.name.clone(),
                offset: p.offset,
                epoch: p.epoch.clone(),
                frame: frame.clone(),
            };
            if outbox.push(out) {
                delivered += 1;
            } else {
                self.metrics.drops.inc();
            }
        }
        self.metrics.deliveries.inc_by(delivered as u64);
        delivered
    }

    /// Delivers a publication that came from Redis, filling a gap before it
    /// from history when its offset jumps.
    pub async fn on_publication(&self, redis: &Pool, pubsub: &str, p: Publication) {
        let (step, tenant, channel) = {
            let channels = self.lock();
            let Some(entry) = channels.get(pubsub) else { return };
            (classify(&entry.last, &p), entry.tenant.clone(), entry.channel.clone())
        };
        match step {
            Step::Duplicate => {}
            Step::Deliver => {
                self.fan_out(pubsub, &p);
            }
            Step::Gap { since } => {
                let missing = p.offset - since - 1;
                let filled = match channel::history_since(redis, &self.keys, &tenant, &channel, since, missing).await {
                    Ok(h) if h.epoch.as_deref() == Some(&*p.epoch) => {
                        let wanted: Vec<_> = h.publications.into_iter().filter(|x| x.offset < p.offset).collect();
                        let contiguous = wanted.len() as u64 == missing
                            && wanted.iter().zip(since + 1..).all(|(x, expected)| x.offset == expected);
                        if contiguous {
                            for x in &wanted {
                                self.fan_out(pubsub, x);
                            }
                        }
                        contiguous
                    }
                    Ok(_) => false,
                    Err(error) => {
                        tracing::warn!(%error, channel = %channel, "history read for a gap failed");
                        false
                    }
                };
                tracing::info!(channel = %channel, tenant = %tenant, since, offset = p.offset, filled, "gap on the live path");
                if filled {
                    self.metrics.gaps.get_or_create(&ResultLabel { result: "filled" }).inc();
                } else {
                    self.metrics.gaps.get_or_create(&ResultLabel { result: "resync" }).inc();
                    self.resync(pubsub);
                }
                self.fan_out(pubsub, &p);
            }
        }
    }

    /// Tells every subscriber of the channel to resubscribe with recovery.
    fn resync(&self, pubsub: &str) {
        let channels = self.lock();
        let Some(entry) = channels.get(pubsub) else { return };
        for outbox in entry.subs.values() {
            outbox.push(Out::Resync { channel: entry.name.clone() });
        }
    }

    /// After the subscription connection was lost (or lagged): reads what
    /// every channel missed from history and delivers it.
    pub async fn catch_up_all(&self, redis: &Pool) {
        let known: Vec<(String, TenantId, Channel, HistoryOptions, Last)> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.last != Last::Unknown)
            .map(|(name, e)| (name.clone(), e.tenant.clone(), e.channel.clone(), e.history, e.last.clone()))
            .collect();
        for (pubsub, tenant, channel, history, last) in known {
            let limit = history.size.max(1);
            let (epoch, since) = match &last {
                Last::At(epoch, offset) => (Some(epoch.clone()), *offset),
                _ => (None, 0),
            };
            match read_with_retries(redis, &self.keys, &tenant, &channel, since, limit).await {
                // Nothing was published meanwhile (or the state expired).
                Ok(h) if h.epoch.is_none() => {}
                Ok(h) if h.epoch.as_deref() == epoch.as_deref() && h.complete_after(since) => {
                    for p in &h.publications {
                        self.on_publication(redis, &pubsub, p.clone()).await;
                    }
                }
                // A new epoch (or the first one): everything of it is needed.
                Ok(h) if h.epoch.as_deref() != epoch.as_deref() && h.complete_after(0) => {
                    for p in &h.publications {
                        self.on_publication(redis, &pubsub, p.clone()).await;
                    }
                }
                Ok(_) => {
                    self.metrics.gaps.get_or_create(&ResultLabel { result: "resync" }).inc();
                    self.resync(&pubsub);
                }
                Err(error) => {
                    tracing::warn!(%error, channel = %channel, "catch-up read failed; subscribers resync");
                    self.resync(&pubsub);
                }
            }
        }
    }

    /// Delivers to this node's sockets only (Redis is down): offset 0, no
    /// history.
    pub fn deliver_local(&self, tenant: &TenantId, channel: &Channel, data: &[u8]) -> usize {
        let pubsub = ChannelKeys::new(&self.keys, tenant, channel).pubsub;
        let p = Publication { offset: 0, epoch: "".into(), data: bytes::Bytes::copy_from_slice(data) };
        self.fan_out(&pubsub, &p)
    }
}

/// Reads history, retrying for a few seconds: right after the subscription
/// connection is back, the command pool may still be reconnecting, and a
/// failed read would needlessly make every subscriber resubscribe.
async fn read_with_retries(
    redis: &Pool,
    keys: &KeySpace,
    tenant: &TenantId,
    channel: &Channel,
    since: u64,
    limit: u64,
) -> herald_core::Result<channel::HistorySince> {
    let mut delay = Duration::from_millis(50);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match channel::history_since(redis, keys, tenant, channel, since, limit).await {
            Ok(h) => return Ok(h),
            Err(error) if tokio::time::Instant::now() + delay > deadline => return Err(error),
            Err(error) => {
                tracing::debug!(%error, %channel, "history read failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(offset: u64, epoch: &str) -> Publication {
        Publication { offset, epoch: epoch.into(), data: bytes::Bytes::new() }
    }

    #[test]
    fn classify_orders_and_gaps() {
        let last = Last::At("e".into(), 5);
        assert_eq!(classify(&Last::Unknown, &p(9, "e")), Step::Deliver);
        assert_eq!(classify(&Last::Empty, &p(1, "e")), Step::Deliver);
        assert_eq!(classify(&Last::Empty, &p(2, "e")), Step::Gap { since: 0 });
        assert_eq!(classify(&last, &p(6, "e")), Step::Deliver);
        assert_eq!(classify(&last, &p(5, "e")), Step::Duplicate);
        assert_eq!(classify(&last, &p(8, "e")), Step::Gap { since: 5 });
        assert_eq!(classify(&last, &p(1, "f")), Step::Deliver);
        assert_eq!(classify(&last, &p(3, "f")), Step::Gap { since: 0 });
    }

    #[test]
    fn outbox_overflow_marks_slow_and_drops_the_queue() {
        let o = Outbox::new(100);
        let out =
            || Out::Pub { channel: "c".into(), offset: 1, epoch: "e".into(), frame: Utf8Bytes::from("x".repeat(40)) };
        assert!(o.push(out()) && o.push(out()));
        assert!(!o.push(out()));
        assert!(o.is_slow());
        let mut q = VecDeque::new();
        assert!(o.take(&mut q).is_none());
        let o = Outbox::new(100);
        assert!(o.push(out()));
        assert_eq!(o.take(&mut q), Some(40));
        assert!(o.push(out()));
        assert!(!o.push(out()), "bytes being written still count until written()");
        let o = Outbox::new(100);
        o.push(out());
        o.take(&mut q).unwrap();
        o.written(40);
        assert!(o.push(out()) && o.push(out()));
    }
}
