//! The near cache's protocol state: what it believes about its Watch stream,
//! and the fill rule (docs/near-cache.md). No I/O and no clock of its own
//! (callers pass `now`), so the shared vectors (`clients/vectors/`) and unit
//! tests drive it directly.
//!
//! Entries live in a [`herald_l1::L1Cache`], which already refuses fills
//! raced by an invalidation or a flush. On top of it this adds the stream:
//! live only between a `Ready` and the first doubt (an end, a seq gap, a
//! heartbeat of another generation or seq, silence), and a stream number in
//! every ticket, so a ticket taken before the current stream's `Ready` — when
//! the client could not see the events — is refused.
//!
//! With a freshness bound ([`Coherence::with_max_staleness`]) RAM answers
//! only while the stream vouches for it: the staleness the node last
//! reported (`WatchPosition.staleness_ms`, a duration, so no shared clock)
//! plus the time since that message arrived must be within the bound.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_l1::scope::{Scope, TagKey, TenantId};
use herald_l1::{FillTicket, L1Cache, L1Config};
use herald_proto::v1::InvalidationEvent;

/// Why the client stopped trusting its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doubt {
    Ended(String),
    SeqGap { expected: u64, got: u64 },
    Generation { ready: u64, got: u64 },
    HeartbeatSeq { last: u64, got: u64 },
    Silence,
}

impl std::fmt::Display for Doubt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Doubt::Ended(why) => write!(f, "watch stream ended: {why}"),
            Doubt::SeqGap { expected, got } => write!(f, "events seq {got}, expected {expected}"),
            Doubt::Generation { ready, got } => write!(f, "heartbeat of generation {got}, ready was {ready}"),
            Doubt::HeartbeatSeq { last, got } => write!(f, "heartbeat names seq {got}, last was {last}"),
            Doubt::Silence => write!(f, "no message within the heartbeat timeout"),
        }
    }
}

/// The stream the client is live on.
#[derive(Debug, Clone)]
struct Live {
    node_id: String,
    generation: u64,
    seq: u64,
    commit_lsn: u64,
    deadline: Instant,
    /// The staleness the node last reported and when it arrived (None: the
    /// node has reported none on this stream).
    fresh: Option<(Duration, Instant)>,
}

/// Why a live near cache does not answer from RAM: it cannot vouch that
/// every change committed longer ago than its `max_staleness_ms` reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleCause {
    /// The node has reported no staleness on this stream (no freshness
    /// watermark yet: capture or broadcast never delivered one).
    NoWatermark,
    /// The last reported staleness plus the time since is past the bound
    /// (the pipeline is down or behind, or the node went quiet).
    WatermarkBehind,
}

impl StaleCause {
    /// The `cause` label, as cache-api's `herald_cache_bypassed_total`.
    pub fn label(self) -> &'static str {
        match self {
            StaleCause::NoWatermark => "no_watermark",
            StaleCause::WatermarkBehind => "watermark_behind",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

/// Reads not answered from RAM because of the freshness bound, by cause
/// (`herald_near_bypassed_total{cause}`).
#[derive(Clone, Default)]
pub struct StaleMetrics {
    bypassed: prometheus_client::metrics::family::Family<CauseLabel, prometheus_client::metrics::counter::Counter>,
}

impl StaleMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "herald_near_bypassed",
            "near-cache reads sent to cache-api because the cache could not vouch for its freshness bound, by cause",
            self.bypassed.clone(),
        );
    }

    /// Reads bypassed for `cause` so far.
    pub fn bypassed(&self, cause: StaleCause) -> u64 {
        self.bypassed.get_or_create(&CauseLabel { cause: cause.label() }).get()
    }

    fn count(&self, cause: StaleCause) {
        self.bypassed.get_or_create(&CauseLabel { cause: cause.label() }).inc();
    }
}

#[derive(Debug, Default)]
struct Stream {
    live: Option<Live>,
    /// Bumped by every `Ready` and every doubt.
    number: u64,
}

/// A fill ticket: take it before sending the request whose answer it fills.
#[must_use = "a ticket is spent by Coherence::fill"]
pub struct Ticket {
    fill: FillTicket,
    stream: u64,
}

/// An answer to store, as `GetResponse` carries it.
#[derive(Debug, Clone)]
pub struct Answer<'a> {
    pub tenant: &'a str,
    pub global: bool,
    pub value: Bytes,
    pub tags: &'a [String],
    /// Milliseconds since the Unix epoch; 0: none.
    pub expires_at_ms: i64,
    pub node_id: &'a str,
    pub generation: u64,
}

/// The protocol state plus the entries. Cheap to clone.
#[derive(Clone)]
pub struct Coherence {
    l1: L1Cache,
    stream: Arc<Mutex<Stream>>,
    timeout: Duration,
    /// `max_staleness_ms` (None: no bound).
    bound: Option<Duration>,
    stale: StaleMetrics,
}

/// Every entry of a scope holds this tag, so an event with key prefixes
/// (which a near cache cannot map onto its own keys) drops its whole scope.
/// Tags from Herald never contain a NUL.
const SCOPE_TAG: &str = "\0scope";

fn key_tag(key: &str) -> TagKey {
    TagKey::new(Scope::Global, format!("\0key:{key}"))
}

impl Coherence {
    pub fn new(max_bytes: u64, max_ttl: Duration, heartbeat_timeout: Duration) -> Self {
        let config = L1Config {
            max_bytes,
            max_ttl_ms: max_ttl.as_millis() as u64,
            heartbeat_timeout_ms: heartbeat_timeout.as_millis() as u64,
        };
        Self {
            l1: L1Cache::new(&config),
            stream: Arc::default(),
            timeout: heartbeat_timeout,
            bound: None,
            stale: StaleMetrics::default(),
        }
    }

    /// Answers from RAM only while the stream vouches that every change
    /// committed more than `bound` ago has reached this cache.
    pub fn with_max_staleness(mut self, bound: Option<Duration>) -> Self {
        self.bound = bound;
        self
    }

    /// Reads bypassed because of the freshness bound.
    pub fn stale_metrics(&self) -> &StaleMetrics {
        &self.stale
    }

    fn stream(&self) -> MutexGuard<'_, Stream> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entries (and their `herald_l1_*` metrics).
    pub fn l1(&self) -> &L1Cache {
        &self.l1
    }

    pub fn is_live(&self) -> bool {
        self.stream().live.is_some()
    }

    /// The highest commit LSN the stream's node had applied when it last
    /// said so (0 while not live).
    pub fn applied_lsn(&self) -> u64 {
        self.stream().live.as_ref().map_or(0, |l| l.commit_lsn)
    }

    /// A stream's `Ready`: live from now on.
    pub fn ready(&self, node_id: &str, generation: u64, commit_lsn: u64, now: Instant) {
        let mut stream = self.stream();
        if stream.live.is_some() {
            // A Ready without an end in between: the old stream is over.
            self.l1.set_live(false);
        }
        stream.number += 1;
        stream.live = Some(Live {
            node_id: node_id.into(),
            generation,
            seq: 0,
            commit_lsn,
            deadline: now + self.timeout,
            fresh: None,
        });
        self.l1.set_live(true);
    }

    /// An `Events` message.
    pub fn events(&self, seq: u64, events: &[InvalidationEvent], now: Instant) -> Result<(), Doubt> {
        let mut stream = self.stream();
        let Some(live) = stream.live.as_mut() else { return Ok(()) };
        if seq != live.seq + 1 {
            let doubt = Doubt::SeqGap { expected: live.seq + 1, got: seq };
            self.lose(&mut stream);
            return Err(doubt);
        }
        live.seq = seq;
        live.deadline = now + self.timeout;
        for event in events {
            live.commit_lsn = live.commit_lsn.max(event.commit_lsn);
            self.apply(event);
        }
        Ok(())
    }

    /// A `Heartbeat`.
    pub fn heartbeat(&self, generation: u64, seq: u64, commit_lsn: u64, now: Instant) -> Result<(), Doubt> {
        let mut stream = self.stream();
        let Some(live) = stream.live.as_mut() else { return Ok(()) };
        let doubt = if generation != live.generation {
            Some(Doubt::Generation { ready: live.generation, got: generation })
        } else if seq != live.seq {
            Some(Doubt::HeartbeatSeq { last: live.seq, got: seq })
        } else {
            None
        };
        if let Some(doubt) = doubt {
            self.lose(&mut stream);
            return Err(doubt);
        }
        live.deadline = now + self.timeout;
        live.commit_lsn = live.commit_lsn.max(commit_lsn);
        Ok(())
    }

    /// The staleness a `Ready` or `Heartbeat` just applied reported
    /// (`WatchPosition.staleness_ms`), received at `now`. Call it after
    /// [`Coherence::ready`] or a successful [`Coherence::heartbeat`].
    pub fn freshness(&self, staleness_ms: Option<u64>, now: Instant) {
        let mut stream = self.stream();
        if let Some(live) = stream.live.as_mut() {
            live.fresh = staleness_ms.map(|ms| (Duration::from_millis(ms), now));
        }
    }

    /// Why RAM may not answer at `now` though the stream is live (see
    /// [`StaleCause`]); None when it may, or when there is no bound.
    pub fn stale_cause(&self, now: Instant) -> Option<StaleCause> {
        let bound = self.bound?;
        let stream = self.stream();
        let live = stream.live.as_ref()?;
        match live.fresh {
            None => Some(StaleCause::NoWatermark),
            Some((staleness, at)) if staleness + now.saturating_duration_since(at) > bound => {
                Some(StaleCause::WatermarkBehind)
            }
            Some(_) => None,
        }
    }

    /// The value under `key` if RAM may answer at `now`: [`Coherence::get`]
    /// within the freshness bound; a read the bound sends to the node is
    /// counted by cause.
    pub fn lookup(&self, key: &str, now: Instant) -> Option<Bytes> {
        if let Some(cause) = self.stale_cause(now) {
            self.stale.count(cause);
            return None;
        }
        self.get(key)
    }

    /// The stream ended (any status, any transport error), or the caller
    /// has another reason to doubt it.
    pub fn doubt(&self) {
        let mut stream = self.stream();
        self.lose(&mut stream);
    }

    /// Flushes when no message arrived within the heartbeat timeout; true
    /// when it did.
    pub fn check_silence(&self, now: Instant) -> bool {
        let mut stream = self.stream();
        if stream.live.as_ref().is_some_and(|l| now >= l.deadline) {
            self.lose(&mut stream);
            return true;
        }
        false
    }

    fn lose(&self, stream: &mut Stream) {
        stream.number += 1;
        stream.live = None;
        self.l1.set_live(false);
    }

    fn apply(&self, event: &InvalidationEvent) {
        if event.key_prefixes.is_empty() {
            self.l1.apply(event);
            return;
        }
        match Scope::from_event_tenant(&event.tenant) {
            Ok(scope) => {
                self.l1.invalidate(&[TagKey::new(scope, SCOPE_TAG)]);
                let rest = InvalidationEvent { key_prefixes: Vec::new(), ..event.clone() };
                self.l1.apply(&rest);
            }
            Err(_) => self.l1.flush(),
        }
    }

    /// Takes a fill ticket.
    pub fn ticket(&self) -> Ticket {
        // The stream number first: a Ready between the two makes the ticket
        // older than the stream, never newer.
        let stream = self.stream().number;
        Ticket { fill: self.l1.begin_fill(), stream }
    }

    /// Stores `answer` under `key` if the fill rule allows; true when stored.
    pub fn fill(&self, ticket: Ticket, key: &str, answer: Answer<'_>) -> bool {
        let stream = self.stream();
        let same_stream = stream.live.as_ref().is_some_and(|l| {
            ticket.stream == stream.number && l.node_id == answer.node_id && l.generation == answer.generation
        });
        drop(stream);
        if !same_stream || answer.tags.is_empty() {
            return false;
        }
        let scope = if answer.global {
            Scope::Global
        } else {
            match TenantId::new(answer.tenant) {
                Ok(t) => Scope::Tenant(t),
                Err(_) => return false,
            }
        };
        let ttl = match answer.expires_at_ms {
            0 => None,
            at => match u64::try_from(at - unix_ms()) {
                Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
                _ => return false,
            },
        };
        let mut tags: Vec<TagKey> = answer.tags.iter().map(|t| TagKey::new(scope.clone(), t.as_str())).collect();
        tags.push(TagKey::new(scope, SCOPE_TAG));
        tags.push(key_tag(key));
        self.l1.insert(ticket.fill, key, answer.value, tags, ttl)
    }

    /// The value under `key`: `Some` on a hit, `None` on a miss or while not
    /// live (see [`Coherence::is_live`]).
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.l1.get(key)
    }

    /// Drops `key` here at once, and refuses fills of it in flight.
    pub fn drop_key(&self, key: &str) {
        self.l1.invalidate(&[key_tag(key)]);
    }

    /// Drops the entries of `tenant` holding any of `tags`, at once.
    pub fn drop_tags(&self, tenant: &str, tags: &[String]) {
        if let Ok(t) = TenantId::new(tenant) {
            let scope = Scope::Tenant(t);
            let tags: Vec<TagKey> = tags.iter().map(|t| TagKey::new(scope.clone(), t.as_str())).collect();
            self.l1.invalidate(&tags);
        }
    }
}

fn unix_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}
