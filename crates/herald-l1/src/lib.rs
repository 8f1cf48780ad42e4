//! Herald's L1 cache: a bounded in-RAM cache with a tag index, kept coherent
//! by invalidation events. cache-api nodes feed it from the L1 channel
//! (`herald_core::l1::subscriber`); near caches in applications feed it from
//! cache-api's `Watch` stream (`herald-client`). No Redis, HTTP server or
//! telemetry here: an application embeds it as it is.
//!
//! How a holder uses it:
//!
//! ```text
//! if let Some(v) = l1.get(&key) { return v }          // hit (only while live)
//! let ticket = l1.begin_fill();                       // before reading the source
//! let v = read_from_l2_or_postgres().await;
//! l1.insert(ticket, &key, v.clone(), tags, ttl);      // refused if raced
//! ```
//!
//! Guarantees:
//!
//! * **Version-gated fills.** [`L1Cache::insert`] refuses a value when any of
//!   its tags was invalidated, or the cache was flushed, after the ticket was
//!   taken: a fill that raced with an invalidation is never stored.
//! * **Liveness.** The cache serves and accepts values only while it is
//!   *live*: its subscription is up and broadcast's heartbeats arrive. Losing
//!   either flushes everything; the holder then reads L2/Postgres until its
//!   feed makes it live again.
//! * **Bounded.** By bytes (`l1.max_bytes`) and by age (`l1.max_ttl_ms`).

pub mod backoff;
pub mod config;
pub mod error;
pub mod flight;
pub mod scope;
pub mod tags;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_proto::v1::InvalidationEvent;
use moka::Expiry;
use moka::notification::RemovalCause;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use crate::config::L1Config;
pub use crate::error::{Error, Result};
use crate::scope::{Scope, TagKey};

/// Bookkeeping bytes charged per entry on top of its key, value and tags.
const ENTRY_OVERHEAD: u32 = 96;
/// Prune the recent-invalidation map once it holds this many tags.
const RECENT_PRUNE_AT: usize = 4096;
/// Past this many remembered tags or prefixes (a fill that never ends keeps
/// them all), every fill in flight is refused and the memory is dropped.
const RECENT_MAX: usize = 4 * RECENT_PRUNE_AT;

/// A cache entry.
#[derive(Clone)]
struct Entry {
    value: Bytes,
    tags: Arc<[TagKey]>,
    /// Unique per insert, so that index clean-up after eviction never removes
    /// a newer entry's membership.
    id: u64,
    ttl: Duration,
    /// When it expires, milliseconds since the Unix epoch (for near caches
    /// filled from this one).
    expires_at_ms: i64,
}

/// An entry found by [`L1Cache::get_entry`].
#[derive(Debug, Clone)]
pub struct Hit {
    pub value: Bytes,
    /// The tags it is indexed under (any-row tags included).
    pub tags: Arc<[TagKey]>,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
}

/// What the eviction listener reports, for the tag index to forget.
type Evicted = (Arc<str>, Arc<[TagKey]>, u64);

struct TagIndex {
    /// tag → keys holding it (with the entry id that added the membership).
    by_tag: HashMap<TagKey, HashMap<Arc<str>, u64>>,
    /// tag → sequence number of its last invalidation, kept while fills are
    /// in flight.
    recent: HashMap<TagKey, u64>,
    /// key prefix → sequence number of its last invalidation, likewise.
    recent_prefixes: Vec<(Arc<str>, u64)>,
    /// start sequence of each fill in flight → how many.
    in_flight: BTreeMap<u64, usize>,
    evicted: mpsc::Receiver<Evicted>,
}

impl TagIndex {
    /// Bounds what is remembered for fills in flight: past [`RECENT_MAX`],
    /// forgets it all and returns true; the caller must then refuse every
    /// fill that started before (as a flush does, without dropping entries).
    fn over_bound(&mut self) -> bool {
        if self.recent.len() <= RECENT_MAX && self.recent_prefixes.len() <= RECENT_MAX {
            return false;
        }
        self.recent.clear();
        self.recent_prefixes.clear();
        true
    }

    fn forget_evicted(&mut self) {
        while let Ok((key, tags, id)) = self.evicted.try_recv() {
            self.remove_membership(&key, &tags, id);
        }
    }

    fn remove_membership(&mut self, key: &Arc<str>, tags: &[TagKey], id: u64) {
        for tag in tags {
            if let Some(keys) = self.by_tag.get_mut(tag) {
                if keys.get(key) == Some(&id) {
                    keys.remove(key);
                }
                if keys.is_empty() {
                    self.by_tag.remove(tag);
                }
            }
        }
    }
}

/// The applied position of an L1 cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// Highest `commit_lsn` of an event applied since start: a maximum, not
    /// a low-water mark (an older commit's event may still be in flight).
    pub commit_lsn: u64,
    /// The freshness watermark: every invalidation of a change committed up
    /// to this WAL position has been applied here (or the cache was flushed
    /// since). This, not `commit_lsn`, is what a read-your-writes position
    /// is compared with. It survives flushes: a flush only drops more.
    pub watermark_lsn: u64,
    /// Events applied since start.
    pub events: u64,
    /// The cache's generation: changes on every flush, so a position of
    /// another generation says nothing about what this cache holds.
    pub generation: u64,
}

/// What a watcher of an L1 cache ([`L1Cache::watch`]) receives, in the
/// order it happened.
#[derive(Debug, Clone)]
pub enum Applied {
    /// An event, after it was applied.
    Event(Arc<InvalidationEvent>),
    /// Everything was dropped (a flush, or the feed going down): whoever
    /// mirrors this cache must drop everything too. `generation` is the new
    /// one.
    Flushed { generation: u64 },
    /// A freshness watermark was applied (after every event it covers):
    /// the cache's watermark is now `lsn` at Postgres time `pg_time_us`.
    /// Whoever mirrors this cache may vouch for changes committed before it
    /// once it has passed on the events before this item.
    Watermark { lsn: u64, pg_time_us: i64 },
}

/// L1 metrics, registered under `herald_l1_*`.
#[derive(Clone, Default)]
pub struct L1Metrics {
    pub hits: Counter,
    pub misses: Counter,
    pub bypassed: Counter,
    pub inserts: Counter,
    pub rejected_stale_fills: Counter,
    pub invalidated_entries: Counter,
    pub events_applied: Counter,
    pub flushes: Counter,
    pub live: Gauge,
    pub entries: Gauge,
    pub bytes: Gauge,
}

impl L1Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("herald_l1");
        r.register("hits", "L1 lookups answered from RAM", self.hits.clone());
        r.register("misses", "L1 lookups not found while live", self.misses.clone());
        r.register("bypassed", "L1 lookups skipped because L1 was not live", self.bypassed.clone());
        r.register("inserts", "values stored in L1", self.inserts.clone());
        r.register(
            "rejected_stale_fills",
            "fills refused because a tag was invalidated (or L1 flushed) during the fill",
            self.rejected_stale_fills.clone(),
        );
        r.register("invalidated_entries", "entries dropped by tag invalidations", self.invalidated_entries.clone());
        r.register("events_applied", "invalidation events applied", self.events_applied.clone());
        r.register("flushes", "full flushes (subscription lost, heartbeat missed)", self.flushes.clone());
        r.register("live", "1 while the subscription is up and heartbeats arrive", self.live.clone());
        r.register("entries", "entries held", self.entries.clone());
        r.register("bytes", "bytes held (keys, values, tags, overhead)", self.bytes.clone());
    }
}

struct Inner {
    cache: moka::sync::Cache<Arc<str>, Entry>,
    index: Mutex<TagIndex>,
    /// Bumped by every invalidation and flush.
    seq: AtomicU64,
    /// `seq` at the last flush; tickets older than it are refused.
    flushed_at: AtomicU64,
    next_id: AtomicU64,
    live: AtomicBool,
    /// Bumped by every flush (and so by every live → not-live change).
    generation: AtomicU64,
    applied_lsn: AtomicU64,
    watermark_lsn: AtomicU64,
    watermark_time_us: AtomicI64,
    applied_events: AtomicU64,
    max_ttl: Duration,
    metrics: L1Metrics,
    applied_tx: tokio::sync::broadcast::Sender<Applied>,
}

/// The L1 cache. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct L1Cache {
    inner: Arc<Inner>,
}

/// Taken before a fill reads its source; spent by [`L1Cache::insert`].
#[must_use = "a fill ticket is spent by L1Cache::insert"]
pub struct FillTicket {
    seq: u64,
    generation: u64,
    inner: Arc<Inner>,
}

impl FillTicket {
    /// The cache's generation when the ticket was taken: a fill that its
    /// cache accepts belongs to this generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for FillTicket {
    fn drop(&mut self) {
        let mut index = lock(&self.inner.index);
        if let Some(n) = index.in_flight.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                index.in_flight.remove(&self.seq);
            }
        }
        match index.in_flight.keys().next().copied() {
            None => {
                index.recent.clear();
                index.recent_prefixes.clear();
            }
            Some(oldest) if index.recent.len() > RECENT_PRUNE_AT => {
                index.recent.retain(|_, s| *s > oldest);
                index.recent_prefixes.retain(|(_, s)| *s > oldest);
            }
            Some(_) => {}
        }
    }
}

struct PerEntryTtl;

impl Expiry<Arc<str>, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &Arc<str>, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }
    fn expire_after_update(&self, _: &Arc<str>, entry: &Entry, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(entry.ttl)
    }
}

fn unix_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl L1Cache {
    /// An empty cache, not live until its subscriber sees a heartbeat.
    pub fn new(config: &L1Config) -> Self {
        let (tx, rx) = mpsc::channel::<Evicted>();
        let tx = Mutex::new(tx);
        let cache = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|key: &Arc<str>, entry: &Entry| {
                let tags: usize = entry.tags.iter().map(|t| t.tag.len() + 16).sum();
                u32::try_from(key.len() + entry.value.len() + tags).unwrap_or(u32::MAX).saturating_add(ENTRY_OVERHEAD)
            })
            .expire_after(PerEntryTtl)
            .eviction_listener(move |key: Arc<Arc<str>>, entry: Entry, _cause: RemovalCause| {
                let _ = lock(&tx).send(((*key).clone(), entry.tags, entry.id));
            })
            .build();
        let index = TagIndex {
            by_tag: HashMap::new(),
            recent: HashMap::new(),
            recent_prefixes: Vec::new(),
            in_flight: BTreeMap::new(),
            evicted: rx,
        };
        Self {
            inner: Arc::new(Inner {
                cache,
                index: Mutex::new(index),
                seq: AtomicU64::new(0),
                flushed_at: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                live: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                applied_lsn: AtomicU64::new(0),
                watermark_lsn: AtomicU64::new(0),
                watermark_time_us: AtomicI64::new(0),
                applied_events: AtomicU64::new(0),
                max_ttl: Duration::from_millis(config.max_ttl_ms),
                metrics: L1Metrics::default(),
                applied_tx: tokio::sync::broadcast::channel(4096).0,
            }),
        }
    }

    /// The cache's metrics, to register with a service's registry.
    pub fn metrics(&self) -> &L1Metrics {
        &self.inner.metrics
    }

    /// The value under `key`, if held and the cache is live.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.get_entry(key).map(|hit| hit.value)
    }

    /// The entry under `key` with its tags and expiry, if held and the cache
    /// is live.
    pub fn get_entry(&self, key: &str) -> Option<Hit> {
        let m = &self.inner.metrics;
        if !self.is_live() {
            m.bypassed.inc();
            return None;
        }
        match self.inner.cache.get(key) {
            Some(entry) => {
                m.hits.inc();
                Some(Hit { value: entry.value, tags: entry.tags, expires_at_ms: entry.expires_at_ms })
            }
            None => {
                m.misses.inc();
                None
            }
        }
    }

    /// Starts a fill. Take it before reading the value's source.
    pub fn begin_fill(&self) -> FillTicket {
        let mut index = lock(&self.inner.index);
        let seq = self.inner.seq.load(Ordering::SeqCst);
        // Read under the index lock, which every flush holds while it bumps
        // the generation.
        let generation = self.generation();
        *index.in_flight.entry(seq).or_default() += 1;
        FillTicket { seq, generation, inner: self.inner.clone() }
    }

    /// Stores `value` under `key` with `tags`, for at most `ttl` (and never
    /// longer than `l1.max_ttl_ms`). Returns false, storing nothing, when the
    /// cache is not live or when any of the tags was invalidated (or the
    /// cache flushed) since `ticket` was taken.
    pub fn insert(
        &self,
        ticket: FillTicket,
        key: &str,
        value: Bytes,
        tags: Vec<TagKey>,
        ttl: Option<Duration>,
    ) -> bool {
        let inner = &self.inner;
        let ttl = ttl.map_or(inner.max_ttl, |t| t.min(inner.max_ttl));
        let tags = tags::indexed_tags(tags);
        let mut index = lock(&inner.index);
        index.forget_evicted();
        let stale = ticket.seq < inner.flushed_at.load(Ordering::SeqCst)
            || tags.iter().any(|t| index.recent.get(t).is_some_and(|s| *s > ticket.seq))
            || index.recent_prefixes.iter().any(|(p, s)| *s > ticket.seq && key.starts_with(&**p));
        if stale || !self.is_live() || ttl.is_zero() {
            if stale {
                inner.metrics.rejected_stale_fills.inc();
            }
            drop(index);
            drop(ticket);
            return false;
        }
        let key: Arc<str> = key.into();
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        for tag in &tags {
            index.by_tag.entry(tag.clone()).or_default().insert(key.clone(), id);
        }
        // Inserted under the index lock: an invalidation either sees the key
        // in the index (and removes it after this returns) or came first and
        // made `stale` true above.
        let expires_at_ms = unix_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        inner.cache.insert(key, Entry { value, tags: tags.into(), id, ttl, expires_at_ms });
        inner.metrics.inserts.inc();
        drop(index);
        drop(ticket);
        self.update_gauges();
        true
    }

    /// Drops every entry holding any of `tags`; returns how many.
    pub fn invalidate(&self, tags: &[TagKey]) -> usize {
        let inner = &self.inner;
        let mut keys = Vec::new();
        {
            let mut index = lock(&inner.index);
            index.forget_evicted();
            let seq = inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
            let remember = !index.in_flight.is_empty();
            for tag in tags {
                if remember {
                    index.recent.insert(tag.clone(), seq);
                }
                if let Some(holders) = index.by_tag.remove(tag) {
                    keys.extend(holders.into_keys());
                }
            }
            if index.over_bound() {
                inner.flushed_at.store(seq, Ordering::SeqCst);
            }
        }
        for key in &keys {
            inner.cache.invalidate(key);
        }
        inner.metrics.invalidated_entries.inc_by(keys.len() as u64);
        self.update_gauges();
        keys.len()
    }

    /// Drops every entry whose key starts with `prefix`; returns how many.
    /// Walks the whole cache: meant for rare bulk changes.
    pub fn invalidate_prefix(&self, prefix: &str) -> usize {
        let inner = &self.inner;
        {
            let mut index = lock(&inner.index);
            let seq = inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
            if !index.in_flight.is_empty() {
                index.recent_prefixes.push((prefix.into(), seq));
            }
            if index.over_bound() {
                inner.flushed_at.store(seq, Ordering::SeqCst);
            }
        }
        // Entries inserted after the lock was released started their fill
        // after the mark or were refused by it; the ones before are here.
        let keys: Vec<Arc<str>> =
            inner.cache.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, _)| (*k).clone()).collect();
        for key in &keys {
            inner.cache.invalidate(key);
        }
        inner.metrics.invalidated_entries.inc_by(keys.len() as u64);
        self.update_gauges();
        keys.len()
    }

    /// Applies one invalidation event: drops the entries its tags (and key
    /// prefixes) name in its scope, every entry with a row tag of its table
    /// when it is table-wide, and advances the applied position.
    pub fn apply(&self, event: &InvalidationEvent) {
        if event.all_tenants {
            // A TRUNCATE of a tenant table: rare and drastic, so drop it all.
            self.flush();
            self.advance(event);
            return;
        }
        let scope = match Scope::from_event_tenant(&event.tenant) {
            Ok(scope) => scope,
            Err(error) => {
                // A tenant we cannot name cannot have entries; still be safe.
                tracing::warn!(event_id = %event.event_id, %error, "event with invalid tenant, flushing L1");
                self.flush();
                return;
            }
        };
        let tags: Vec<TagKey> = tags::event_tags(event).into_iter().map(|t| TagKey::new(scope.clone(), t)).collect();
        self.invalidate(&tags);
        for prefix in &event.key_prefixes {
            self.invalidate_prefix(prefix);
        }
        self.advance(event);
    }

    /// Notes a watermark read from the feed after every invalidation before
    /// it (see [`Position::watermark_lsn`]); `pg_time_us` is Postgres's
    /// clock when its position was taken.
    pub fn apply_watermark(&self, lsn: u64, pg_time_us: i64) {
        let lsn = self.inner.watermark_lsn.fetch_max(lsn, Ordering::SeqCst).max(lsn);
        let pg_time_us = self.inner.watermark_time_us.fetch_max(pg_time_us, Ordering::SeqCst).max(pg_time_us);
        if self.inner.applied_tx.receiver_count() > 0 {
            let _ = self.inner.applied_tx.send(Applied::Watermark { lsn, pg_time_us });
        }
    }

    /// Postgres time of the newest watermark applied (0: none yet): every
    /// change committed before it has been applied here.
    pub fn watermark_time_us(&self) -> i64 {
        self.inner.watermark_time_us.load(Ordering::SeqCst)
    }

    fn advance(&self, event: &InvalidationEvent) {
        self.inner.applied_lsn.fetch_max(event.commit_lsn, Ordering::SeqCst);
        self.inner.applied_events.fetch_add(1, Ordering::SeqCst);
        self.inner.metrics.events_applied.inc();
        if self.inner.applied_tx.receiver_count() > 0 {
            let _ = self.inner.applied_tx.send(Applied::Event(Arc::new(event.clone())));
        }
    }

    /// Everything this cache does to its entries, in order: each event after
    /// it was applied, and each flush (for near caches that mirror this
    /// cache, and for measuring). Subscribe *before* checking
    /// [`L1Cache::is_live`]: a flush after that arrives as
    /// [`Applied::Flushed`]. A receiver that falls more than 4096 items
    /// behind sees `Lagged` and must assume it missed invalidations.
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<Applied> {
        self.inner.applied_tx.subscribe()
    }

    /// Drops everything, refuses every fill that started before, and starts
    /// a new generation (which watchers are told of).
    pub fn flush(&self) {
        let inner = &self.inner;
        let generation = {
            let mut index = lock(&inner.index);
            let seq = inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
            inner.flushed_at.store(seq, Ordering::SeqCst);
            index.by_tag.clear();
            inner.cache.invalidate_all();
            let generation = inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
            if inner.applied_tx.receiver_count() > 0 {
                let _ = inner.applied_tx.send(Applied::Flushed { generation });
            }
            generation
        };
        tracing::debug!(generation, "l1 flushed");
        inner.metrics.flushes.inc();
        self.update_gauges();
    }

    /// The current generation (see [`Applied::Flushed`]).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    /// Marks the cache live or not. Going down flushes everything.
    pub fn set_live(&self, live: bool) {
        let was = self.inner.live.swap(live, Ordering::SeqCst);
        if was && !live {
            self.flush();
        }
        self.inner.metrics.live.set(i64::from(live));
    }

    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::SeqCst)
    }

    /// What the cache has applied.
    pub fn applied(&self) -> Position {
        Position {
            commit_lsn: self.inner.applied_lsn.load(Ordering::SeqCst),
            watermark_lsn: self.inner.watermark_lsn.load(Ordering::SeqCst),
            events: self.inner.applied_events.load(Ordering::SeqCst),
            generation: self.generation(),
        }
    }

    /// Entries held (after pending maintenance).
    pub fn entry_count(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.entry_count()
    }

    fn update_gauges(&self) {
        let cache = &self.inner.cache;
        self.inner.metrics.entries.set(i64::try_from(cache.entry_count()).unwrap_or(i64::MAX));
        self.inner.metrics.bytes.set(i64::try_from(cache.weighted_size()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests;
