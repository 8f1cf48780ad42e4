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

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fred::prelude::Pool;
use herald_core::channel::{self, Channel, ChannelKeys, HistoryOptions, Publication};
use herald_core::keys::{KeySpace, TenantId};
use tokio::sync::{Notify, watch};

use crate::metrics::{Metrics, ResultLabel};
use crate::protocol::publication_frame;
use crate::socket::{self, Writer};

/// A connection's id, unique within the node.
pub type ConnId = u64;

/// Publications of one channel, in order, their frames encoded once for
/// every subscriber and laid end to end, so that a socket takes a run of
/// them in one write.
pub struct Batch {
    pubs: Vec<(u64, Arc<str>, Range<usize>)>,
    frames: Bytes,
}

impl Batch {
    /// Frames for `pubs` (whose data is JSON text) on channel `name`.
    fn new<'a>(name: &str, pubs: impl IntoIterator<Item = (u64, &'a Arc<str>, &'a str)>) -> Self {
        let mut frames = BytesMut::new();
        let pubs = pubs
            .into_iter()
            .map(|(offset, epoch, data)| {
                let start = frames.len();
                socket::put_text(&mut frames, &publication_frame(name, offset, epoch, data));
                (offset, epoch.clone(), start..frames.len())
            })
            .collect();
        Self { pubs, frames: frames.freeze() }
    }

    pub fn len(&self) -> usize {
        self.pubs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pubs.is_empty()
    }
}

/// Where one connection's subscription to one channel stands.
enum Phase {
    /// The subscribe is being answered: publications wait in `held` so
    /// that none reaches the client before its `subscribed` reply.
    Joining,
    /// Publications go to the socket, in order, without duplicates.
    Live,
    /// Subscribed while Redis was down: local deliveries (offset 0) pass;
    /// the first one with a position (Redis is back) ends the subscription
    /// with a resubscribe, so the client recovers what it missed.
    Degraded,
    /// Ended by the connection or by a gap; nothing more is written.
    Ended,
}

struct SubState {
    phase: Phase,
    /// Epoch and offset of the last publication sent (or of the position
    /// at subscribe time); `None` until known.
    position: Option<(Arc<str>, u64)>,
    held: Vec<(u64, Arc<str>, Bytes)>,
    held_bytes: usize,
}

/// One connection's subscription to one channel, shared by the connection
/// (which answers the subscribe and ends it) and the hub (which writes
/// publications to it).
pub struct SubLink {
    writer: Arc<Writer>,
    /// The channel's name as the client knows it.
    channel: Arc<str>,
    state: Mutex<SubState>,
    max_held_bytes: usize,
}

/// What a subscription does with a publication.
#[derive(Debug, PartialEq, Eq)]
enum Accept {
    Send,
    Skip,
    Gap,
}

impl SubLink {
    pub fn new(writer: Arc<Writer>, channel: Arc<str>, max_held_bytes: usize) -> Self {
        let state = SubState { phase: Phase::Joining, position: None, held: Vec::new(), held_bytes: 0 };
        Self { writer, channel, state: Mutex::new(state), max_held_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `batch` (or holds it while joining); returns how many
    /// publications were delivered, and false when the connection was slow.
    fn deliver(&self, batch: &Batch) -> (usize, bool) {
        let mut st = self.lock();
        match st.phase {
            Phase::Ended => (0, true),
            Phase::Joining => {
                for (offset, epoch, range) in &batch.pubs {
                    st.held_bytes += range.len();
                    st.held.push((*offset, epoch.clone(), batch.frames.slice(range.clone())));
                }
                if st.held_bytes > self.max_held_bytes {
                    st.phase = Phase::Ended;
                    st.held = Vec::new();
                    self.writer.make_slow();
                    return (0, false);
                }
                (batch.pubs.len(), true)
            }
            Phase::Live | Phase::Degraded => {
                // Runs of consecutive sends go out as one slice of the batch.
                let (mut run, mut sent, mut ok) = (None::<Range<usize>>, 0, true);
                for (offset, epoch, range) in &batch.pubs {
                    match accept(&mut st, *offset, epoch) {
                        Accept::Send => {
                            sent += 1;
                            run = Some(run.map_or(range.clone(), |r| r.start..range.end));
                        }
                        Accept::Skip => {
                            if let Some(r) = run.take() {
                                ok &= self.writer.send(batch.frames.slice(r));
                            }
                        }
                        Accept::Gap => {
                            self.end_for_resync(&mut st);
                            break;
                        }
                    }
                }
                if let Some(r) = run {
                    ok &= self.writer.send(batch.frames.slice(r));
                }
                (if ok { sent } else { 0 }, ok)
            }
        }
    }

    fn end_for_resync(&self, st: &mut SubState) {
        if !matches!(st.phase, Phase::Ended) {
            st.phase = Phase::Ended;
            st.held = Vec::new();
            self.writer.resync(self.channel.clone());
        }
    }

    /// Ends the subscription and asks the connection to tell its client to
    /// resubscribe (a gap the hub could not fill).
    fn resync(&self) {
        let mut st = self.lock();
        self.end_for_resync(&mut st);
    }

    /// Answers the subscribe: writes `replies` (the `subscribed` frame and
    /// any recovered publications), then what arrived meanwhile that is
    /// newer than `position`, and goes live. False when the connection is
    /// slow.
    pub fn go_live(&self, position: Option<(Arc<str>, u64)>, degraded: bool, replies: Bytes) -> bool {
        let mut st = self.lock();
        if !matches!(st.phase, Phase::Joining) {
            return self.writer.send(replies);
        }
        st.position = position;
        st.phase = if degraded { Phase::Degraded } else { Phase::Live };
        let mut ok = self.writer.send(replies);
        for (offset, epoch, frame) in std::mem::take(&mut st.held) {
            match accept(&mut st, offset, &epoch) {
                Accept::Send => ok &= self.writer.send(frame),
                Accept::Skip => {}
                Accept::Gap => {
                    self.end_for_resync(&mut st);
                    break;
                }
            }
        }
        st.held_bytes = 0;
        ok
    }

    /// The connection ended the subscription: nothing more is written.
    pub fn end(&self) {
        let mut st = self.lock();
        st.phase = Phase::Ended;
        st.held = Vec::new();
    }
}

/// Whether a publication is the next one of a subscription (and moves its
/// position), an old one, or one after a gap.
fn accept(st: &mut SubState, offset: u64, epoch: &Arc<str>) -> Accept {
    if offset == 0 {
        return Accept::Send;
    }
    if matches!(st.phase, Phase::Degraded) {
        return Accept::Gap;
    }
    match &st.position {
        None => {}
        Some((e, last)) if *e == *epoch => {
            if offset <= *last {
                return Accept::Skip;
            }
            if offset > last + 1 {
                return Accept::Gap;
            }
        }
        Some(_) if offset != 1 => return Accept::Gap,
        Some(_) => {}
    }
    st.position = Some((epoch.clone(), offset));
    Accept::Send
}

struct Entry {
    tenant: TenantId,
    channel: Channel,
    name: Arc<str>,
    history: HistoryOptions,
    subs: HashMap<ConnId, Arc<SubLink>>,
    /// `subs` as a list, rebuilt after they change: a fan-out walks it
    /// without holding the hub's lock.
    snapshot: Option<Arc<[Arc<SubLink>]>>,
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
        link: Arc<SubLink>,
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
            snapshot: None,
            active: false,
            last: Last::Unknown,
        });
        if entry.subs.insert(conn, link).is_none() {
            self.metrics.subscriptions.inc();
        }
        entry.snapshot = None;
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
            entry.snapshot = None;
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

    /// Writes publications (of one channel, in order) to every subscriber
    /// and remembers the channel's position; returns once every socket has
    /// them (or has them queued), so the next publication cannot overtake.
    /// A channel with many subscribers is split into shards written on the
    /// runtime's workers side by side. Returns how many sockets the
    /// publications reached.
    async fn fan_out(&self, pubsub: &str, pubs: &[Publication]) -> usize {
        let (links, batch) = {
            let mut channels = self.lock();
            let Some(entry) = channels.get_mut(pubsub) else { return 0 };
            let mut texts = Vec::with_capacity(pubs.len());
            for p in pubs {
                match std::str::from_utf8(&p.data) {
                    Ok(data) => texts.push((p.offset, &p.epoch, data)),
                    Err(_) => {
                        self.metrics.malformed_messages.inc();
                    }
                }
            }
            if let Some(p) = pubs.iter().rev().find(|p| p.offset > 0) {
                entry.last = Last::At(p.epoch.clone(), p.offset);
            }
            let batch = Batch::new(&entry.name, texts);
            let links = entry.snapshot.get_or_insert_with(|| entry.subs.values().cloned().collect()).clone();
            (links, batch)
        };
        if batch.is_empty() {
            return 0;
        }
        let shards = shards(links.len());
        let total = if shards == 1 {
            deliver_all(&links, &batch)
        } else {
            let batch = Arc::new(batch);
            let size = links.len().div_ceil(shards);
            let mut writing = tokio::task::JoinSet::new();
            for start in (0..links.len()).step_by(size) {
                let (links, batch) = (links.clone(), batch.clone());
                writing.spawn(async move { deliver_all(&links[start..(start + size).min(links.len())], &batch) });
            }
            let mut total = Delivered::default();
            while let Some(part) = writing.join_next().await {
                match part {
                    Ok(part) => total.add(part),
                    Err(error) => tracing::error!(%error, "a fan-out shard failed"),
                }
            }
            total
        };
        self.metrics.drops.inc_by(total.slow as u64);
        self.metrics.deliveries.inc_by(total.publications as u64);
        total.sockets
    }

    /// Delivers publications of one channel that came from Redis, in order:
    /// duplicates dropped, a gap before one filled from history first.
    pub async fn on_publications(&self, redis: &Pool, pubsub: &str, pubs: Vec<Publication>) {
        let (mut last, tenant, channel) = {
            let channels = self.lock();
            let Some(entry) = channels.get(pubsub) else { return };
            (entry.last.clone(), entry.tenant.clone(), entry.channel.clone())
        };
        let mut run: Vec<Publication> = Vec::with_capacity(pubs.len());
        for p in pubs {
            match classify(&last, &p) {
                Step::Duplicate => continue,
                Step::Deliver => {}
                Step::Gap { since } => {
                    self.fan_out(pubsub, &std::mem::take(&mut run)).await;
                    self.fill_gap(redis, pubsub, &tenant, &channel, since, &p).await;
                }
            }
            last = Last::At(p.epoch.clone(), p.offset);
            run.push(p);
        }
        self.fan_out(pubsub, &run).await;
    }

    /// Delivers what is missing between `since` and `p` from history, or
    /// tells every subscriber to resubscribe with recovery when history
    /// cannot fill it.
    async fn fill_gap(
        &self,
        redis: &Pool,
        pubsub: &str,
        tenant: &TenantId,
        channel: &Channel,
        since: u64,
        p: &Publication,
    ) {
        let missing = p.offset - since - 1;
        let filled = match channel::history_since(redis, &self.keys, tenant, channel, since, missing).await {
            Ok(h) if h.epoch.as_deref() == Some(&*p.epoch) => {
                let wanted: Vec<_> = h.publications.into_iter().filter(|x| x.offset < p.offset).collect();
                let contiguous = wanted.len() as u64 == missing
                    && wanted.iter().zip(since + 1..).all(|(x, expected)| x.offset == expected);
                if contiguous {
                    self.fan_out(pubsub, &wanted).await;
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
    }

    /// Tells every subscriber of the channel to resubscribe with recovery.
    fn resync(&self, pubsub: &str) {
        let links: Vec<Arc<SubLink>> = match self.lock().get(pubsub) {
            Some(entry) => entry.subs.values().cloned().collect(),
            None => return,
        };
        for link in links {
            link.resync();
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
                    self.on_publications(redis, &pubsub, h.publications).await;
                }
                // A new epoch (or the first one): everything of it is needed.
                Ok(h) if h.epoch.as_deref() != epoch.as_deref() && h.complete_after(0) => {
                    self.on_publications(redis, &pubsub, h.publications).await;
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
    pub async fn deliver_local(&self, tenant: &TenantId, channel: &Channel, data: &[u8]) -> usize {
        let pubsub = ChannelKeys::new(&self.keys, tenant, channel).pubsub;
        let p = Publication { offset: 0, epoch: "".into(), data: Bytes::copy_from_slice(data) };
        self.fan_out(&pubsub, &[p]).await
    }
}

/// Subscribers one fan-out task writes to at least: below this, spreading
/// the writes over workers costs more than it saves.
const SHARD_SOCKETS: usize = 1024;

/// How many tasks write a publication to `sockets` sockets: one per
/// runtime worker at most.
fn shards(sockets: usize) -> usize {
    let workers = tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers());
    (sockets / SHARD_SOCKETS).clamp(1, workers.max(1))
}

/// What a fan-out did.
#[derive(Default)]
struct Delivered {
    /// Publications written or queued, over all sockets.
    publications: usize,
    /// Sockets that took every publication.
    sockets: usize,
    /// Sockets that refused them (slow).
    slow: usize,
}

impl Delivered {
    fn add(&mut self, other: Delivered) {
        self.publications += other.publications;
        self.sockets += other.sockets;
        self.slow += other.slow;
    }
}

fn deliver_all(links: &[Arc<SubLink>], batch: &Batch) -> Delivered {
    let mut d = Delivered::default();
    for link in links {
        let (sent, ok) = link.deliver(batch);
        d.publications += sent;
        d.sockets += usize::from(sent == batch.len());
        d.slow += usize::from(!ok);
    }
    d
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

    /// A writer on a real socket, and the client end to read it from.
    async fn socket_pair() -> (Arc<Writer>, tokio::net::tcp::OwnedReadHalf, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, write) = server.into_split();
        (Arc::new(Writer::new(write, 1 << 20)), read, client)
    }

    /// The text frames written so far (server frames: unmasked).
    async fn read_texts(client: &mut tokio::net::TcpStream) -> Vec<String> {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0; 1 << 16];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.unwrap().unwrap();
        let mut at = 0;
        let mut texts = Vec::new();
        while at < n {
            let len = usize::from(buf[at + 1] & 0x7F);
            assert!(len < 126, "short frames only here");
            texts.push(String::from_utf8(buf[at + 2..at + 2 + len].to_vec()).unwrap());
            at += 2 + len;
        }
        texts
    }

    fn batch(offsets: &[u64], epoch: &Arc<str>) -> Batch {
        let data: Vec<String> = offsets.iter().map(|o| format!("{o}")).collect();
        Batch::new("team:1", offsets.iter().zip(&data).map(|(o, d)| (*o, epoch, d.as_str())))
    }

    #[tokio::test]
    async fn a_subscription_answers_first_then_sends_in_order_without_duplicates() {
        let (writer, _read, mut client) = socket_pair().await;
        let link = SubLink::new(writer, "team:1".into(), 1 << 20);
        let e: Arc<str> = "e".into();
        // Publications 4..=6 arrive while the subscribe is answered; the
        // position read says 5: only 6 follows the reply.
        assert_eq!(link.deliver(&batch(&[4, 5, 6], &e)), (3, true));
        assert!(link.go_live(Some((e.clone(), 5)), false, socket::text("subscribed")));
        assert_eq!(link.deliver(&batch(&[6, 7, 8], &e)), (2, true));
        let texts = read_texts(&mut client).await;
        let offsets: Vec<&str> =
            texts.iter().map(|t| t.split(r#""offset":"#).nth(1).map_or(&t[..], |r| &r[..1])).collect();
        assert_eq!(offsets, ["subscribed", "6", "7", "8"]);
    }

    #[tokio::test]
    async fn a_gap_ends_the_subscription_and_asks_for_a_resubscribe() {
        let (writer, _read, mut client) = socket_pair().await;
        let link = SubLink::new(writer.clone(), "team:1".into(), 1 << 20);
        let e: Arc<str> = "e".into();
        assert!(link.go_live(Some((e.clone(), 1)), false, socket::text("subscribed")));
        assert_eq!(link.deliver(&batch(&[2, 4], &e)), (1, true));
        assert_eq!(writer.take_resync(), [Arc::<str>::from("team:1")]);
        assert_eq!(link.deliver(&batch(&[5], &e)), (0, true), "nothing after the gap");
        assert_eq!(read_texts(&mut client).await.len(), 2);
    }

    #[tokio::test]
    async fn publications_held_past_the_bound_make_the_connection_slow() {
        let (writer, _read, _client) = socket_pair().await;
        let link = SubLink::new(writer.clone(), "team:1".into(), 100);
        let e: Arc<str> = "e".into();
        let (_, ok) = link.deliver(&batch(&[1, 2, 3, 4], &e));
        assert!(!ok && writer.is_slow());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sharded_fan_out_reaches_every_socket_in_order() {
        let hub = Hub::new(KeySpace::new("test").unwrap(), Metrics::default());
        let (tenant, channel) = (TenantId::new("acme").unwrap(), Channel::parse("team:1").unwrap());
        let history = HistoryOptions { size: 10, ttl_s: 60 };
        let sockets = SHARD_SOCKETS * 2 + 7;
        assert_eq!(shards(sockets), 2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut clients, mut halves) = (Vec::new(), Vec::new());
        let mut pubsub = String::new();
        for conn in 0..sockets {
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let (read, write) = server.into_split();
            let link = Arc::new(SubLink::new(Arc::new(Writer::new(write, 1 << 20)), "team:1".into(), 1 << 20));
            pubsub = hub.join(conn as ConnId, link.clone(), &tenant, &channel, history);
            assert!(link.go_live(None, false, socket::text("subscribed")));
            clients.push(client);
            halves.push(read);
        }
        let e: Arc<str> = "e".into();
        for offset in 1..=3 {
            let p = Publication { offset, epoch: e.clone(), data: Bytes::from(offset.to_string()) };
            assert_eq!(hub.fan_out(&pubsub, &[p]).await, sockets);
        }
        for client in &mut clients {
            let mut texts = Vec::new();
            while texts.len() < 4 {
                texts.extend(read_texts(client).await);
            }
            let offsets: Vec<&str> =
                texts[1..].iter().map(|t| t.split(r#""offset":"#).nth(1).map_or("?", |r| &r[..1])).collect();
            assert_eq!(offsets, ["1", "2", "3"]);
        }
    }
}
