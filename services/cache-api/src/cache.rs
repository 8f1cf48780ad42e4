//! The layered cache: L1 (this node's RAM) → L2 (Redis) → Postgres, with
//! single-flight per key on a node, a Redis lease across nodes, and
//! version-gated fills in both layers.
//!
//! How a resource miss is filled:
//!
//! 1. take an L1 [`FillTicket`](herald_core::l1::FillTicket), then read L2;
//!    an L2 hit fills L1 with the entry's tags;
//! 2. on an L2 miss take the key's lease with a [`FillToken`] (one Redis
//!    script); the holder reads Postgres, and stores with
//!    [`L2::store_gated`], which refuses when any tag was invalidated after
//!    the token; L1 refuses likewise when the invalidation reached this node
//!    after the ticket;
//! 3. nodes that did not get the lease wait for the value in L2, and read
//!    Postgres themselves only when the lease lapses or `cache.fill_wait_ms`
//!    passes.
//!
//! Redis unreachable: every answer comes from Postgres and nothing is stored
//! (L1 is not live without its subscription either). Postgres unreachable:
//! hits are served, misses fail with `Unavailable`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use fred::prelude::*;
use futures::future::BoxFuture;
use herald_core::config::{CacheConfig, OnStale};
use herald_core::keys::{KeySpace, Scope, TagKey, TenantId, partition_of};
use herald_core::l1::{FillTicket, L1Cache};
use herald_core::l2::{FillToken, L2, Lease};
use herald_core::ops::ReadyFlag;
use herald_core::time::now_us;
use herald_proto::Message as _;
use herald_proto::v1::{InvalidationEvent, Layer, StoredEntry};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, Result};
use crate::flight::SingleFlight;
use crate::metrics::Metrics;
use crate::overlay;
use crate::quota::{QuotaPermit, TenantQuota};
use crate::resource::{Fetched, Resource};

mod atomic;

/// The resource name of explicit keys, in keys and metrics.
pub const KV: &str = "kv";
/// Longest wait for one Redis operation before the request degrades to
/// Postgres.
const REDIS_OP_TIMEOUT: Duration = Duration::from_millis(1_000);
/// How often a waiting node looks for another node's fill.
const LEASE_POLL: Duration = Duration::from_millis(5);

/// Called between a fill's database read and its store (tests use it to
/// force the fill race).
pub type FillHook = Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>;

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub found: bool,
    pub value: Bytes,
    pub layer: Layer,
    /// On an explicit-key miss: the token that gates the caller's Set.
    pub fill_token: String,
    /// Set when this node's L1 vouches for the answer, so a near cache may
    /// store it (docs/near-cache.md, "The fill rule").
    pub vouched: Option<Vouched>,
    /// Write-behind patches are merged in (never stored, never vouched).
    pub pending: bool,
}

/// What a near cache needs to store an answer: given only to an L1 hit or to
/// a value this node's L1 accepted (no invalidation of its tags and no flush
/// between the fill's ticket and its store).
#[derive(Debug, Clone)]
pub struct Vouched {
    /// The tags the entry is indexed under, self tag included.
    pub tags: Vec<String>,
    /// Milliseconds since the Unix epoch (0: none).
    pub expires_at_ms: i64,
    /// This node's L1 generation the answer belongs to.
    pub generation: u64,
    /// The entry is in the global scope.
    pub global: bool,
}

impl Answer {
    fn new(found: bool, value: Bytes, layer: Layer) -> Self {
        Self { found, value, layer, fill_token: String::new(), vouched: None, pending: false }
    }

    fn vouched_by(mut self, vouched: Option<Vouched>) -> Self {
        self.vouched = vouched;
        self
    }
}

fn vouch(scope: &Scope, tags: &[TagKey], expires_at_ms: i64, generation: u64) -> Vouched {
    Vouched {
        tags: tags.iter().map(|t| t.tag.to_string()).collect(),
        expires_at_ms,
        generation,
        global: *scope == Scope::Global,
    }
}

/// A finished fill, shared with the requests that joined it.
#[derive(Clone)]
struct Filled {
    answer: Answer,
    /// An invalidation passed the fill: requests that joined it may have
    /// started after the invalidation and must not use its value.
    raced: bool,
}

/// One resource read: what, in which scope, for which caller.
#[derive(Clone, Copy)]
struct Read<'a> {
    res: &'a Resource,
    scope: &'a Scope,
    params: &'a [String],
    /// The caller's tenant (the scope is global for global resources): its
    /// share of the node's database reads is what the read uses.
    tenant: &'a TenantId,
}

/// What InvalidatePrefix drops.
#[derive(Debug, Clone)]
pub enum PrefixTarget {
    Resource(String),
    KeyPrefix(String),
    All,
}

/// The cache of one node.
pub struct Cache {
    keys: KeySpace,
    l1: L1Cache,
    l2: L2,
    redis: Pool,
    db: deadpool_postgres::Pool,
    resources: HashMap<String, Arc<Resource>>,
    flights: SingleFlight<Result<Filled>>,
    fills: Semaphore,
    tenant_fills: TenantQuota,
    config: CacheConfig,
    metrics: Metrics,
    redis_up: ReadyFlag,
    hook: Option<FillHook>,
    node: String,
    seq: AtomicU64,
    /// `redis.partitions`: which L1 channel carries a scope's invalidations.
    partitions: u16,
    /// Resources some write-behind command overlays: their reads check the
    /// overlay first (one more Redis round trip; other resources never pay).
    overlaid: HashSet<String>,
}

/// Everything a [`Cache`] is built from.
pub struct Parts {
    pub keys: KeySpace,
    pub l1: L1Cache,
    pub redis: Pool,
    pub db: deadpool_postgres::Pool,
    pub resources: Vec<Resource>,
    pub config: CacheConfig,
    pub metrics: Metrics,
    pub redis_up: ReadyFlag,
    pub hook: Option<FillHook>,
    pub node: String,
    /// `redis.partitions`.
    pub partitions: u16,
    /// Resources named by a write-behind command's overlay.
    pub overlaid: Vec<String>,
}

fn l1_value(found: bool, value: &Bytes) -> Bytes {
    let mut b = BytesMut::with_capacity(value.len() + 1);
    b.put_u8(u8::from(found));
    b.extend_from_slice(value);
    b.freeze()
}

fn from_l1(bytes: Bytes) -> Answer {
    let found = bytes.first() == Some(&1);
    Answer::new(found, bytes.slice(1.min(bytes.len())..), Layer::L1)
}

/// An L1 hit, vouched for: the entry was there at `generation` (read before
/// the lookup, so a flush in between gives an older generation, which near
/// caches refuse).
fn from_l1_hit(scope: &Scope, hit: herald_core::l1::Hit, generation: u64) -> Answer {
    let vouched = vouch(scope, &hit.tags, hit.expires_at_ms, generation);
    from_l1(hit.value).vouched_by(Some(vouched))
}

impl Cache {
    pub fn new(parts: Parts) -> Self {
        let resources = parts.resources.into_iter().map(|r| (r.name.clone(), Arc::new(r))).collect();
        Self {
            l2: L2::new(parts.redis.clone(), parts.keys.clone()),
            keys: parts.keys,
            l1: parts.l1,
            redis: parts.redis,
            db: parts.db,
            resources,
            flights: SingleFlight::default(),
            fills: Semaphore::new(parts.config.max_concurrent_fills),
            tenant_fills: TenantQuota::new(parts.config.max_fills_per_tenant),
            config: parts.config,
            metrics: parts.metrics,
            redis_up: parts.redis_up,
            hook: parts.hook,
            node: parts.node,
            seq: AtomicU64::new(0),
            partitions: parts.partitions,
            overlaid: parts.overlaid.into_iter().collect(),
        }
    }

    pub fn l1(&self) -> &L1Cache {
        &self.l1
    }

    /// This node's name (in leases, events, and answers to near caches).
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn resource(&self, name: &str) -> Result<Arc<Resource>> {
        self.resources.get(name).cloned().ok_or_else(|| Error::UnknownResource(name.into()))
    }

    /// Names of the configured resources.
    pub fn resource_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.resources.keys().cloned().collect();
        names.sort();
        names
    }

    fn scope(res: &Resource, tenant: &TenantId) -> Scope {
        if res.global { Scope::Global } else { Scope::Tenant(tenant.clone()) }
    }

    /// Whether this node has applied every invalidation of changes committed
    /// up to `min_lsn`: broadcast's forwarded watermark, a low-water mark.
    /// (The highest applied `commit_lsn` is not: with several broadcast
    /// consumers an older commit's invalidation may still be in flight.)
    fn fresh_enough(&self, min_lsn: u64) -> bool {
        min_lsn == 0 || self.l1.applied().watermark_lsn >= min_lsn
    }

    /// Milliseconds since the Postgres time of the newest watermark this
    /// node applied, plus the tolerated clock skew: every answer from its
    /// cache reflects every change committed longer ago. None before the
    /// first watermark.
    pub fn staleness_ms(&self) -> Option<u64> {
        let at = self.l1.watermark_time_us();
        (at > 0).then(|| (now_us() - at).max(0) as u64 / 1000 + self.config.clock_skew_ms)
    }

    /// Shows [`Cache::staleness_ms`] in `herald_cache_staleness_ms` (-1:
    /// no watermark yet); the health loop calls it, not every read.
    pub fn report_staleness(&self) -> Option<u64> {
        let staleness = self.staleness_ms();
        self.metrics.staleness_ms.set(staleness.map_or(-1, |ms| i64::try_from(ms).unwrap_or(i64::MAX)));
        staleness
    }

    /// Why the cache cannot vouch that it reflects every change committed
    /// more than `res`'s freshness bound ago; None when it can (or the
    /// resource has no bound).
    fn stale_cause(&self, res: &Resource) -> Option<&'static str> {
        let bound = res.max_staleness_ms.or(self.config.max_staleness_ms)?;
        match self.staleness_ms() {
            Some(ms) if ms <= bound => None,
            None => Some("no_watermark"),
            Some(_) if !self.l1.is_live() => Some("feed_down"),
            Some(_) => Some("watermark_behind"),
        }
    }

    fn redis_usable(&self) -> bool {
        self.redis_up.get()
    }

    /// Notes a failed Redis operation: answers come from Postgres until the
    /// health check sees Redis again.
    fn redis_failed(&self, error: &dyn std::fmt::Display) {
        if self.redis_up.get() {
            tracing::warn!(%error, "redis operation failed, degrading to postgres");
        }
        self.redis_up.set(false);
        self.metrics.degraded.set(1);
    }

    /// Marks Redis reachable or not (the health check).
    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.set(up);
        self.metrics.degraded.set(i64::from(!up));
    }

    async fn redis_op<T>(&self, op: impl Future<Output = herald_core::Result<T>>) -> Result<T> {
        match tokio::time::timeout(REDIS_OP_TIMEOUT, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.redis_failed(&e);
                Err(Error::Unavailable(format!("redis: {e}")))
            }
            Err(_) => {
                self.redis_failed(&"timed out");
                Err(Error::Unavailable("redis: timed out".into()))
            }
        }
    }

    /// A resource by its parameters.
    pub async fn get_resource(&self, tenant: &TenantId, name: &str, params: &[String], min_lsn: u64) -> Result<Answer> {
        let res = self.resource(name)?;
        let params = &res.canonical_params(params)?;
        let scope = Self::scope(&res, tenant);
        let entry_key = res.key(params)?;
        let key = self.keys.entry(&scope, &res.name, &entry_key)?;
        let read = Read { res: &res, scope: &scope, params, tenant };
        // The overlay, then this node's watermark, then the value: a patch
        // retired (or judged visible in the cache) before the value is read
        // is in what the value read sees.
        let patches = if self.overlaid.contains(&res.name) {
            self.read_overlay(tenant, &res.name, &entry_key).await
        } else {
            Vec::new()
        };
        let watermark = self.l1.applied().watermark_lsn;
        let result = self.lookup_resource(read, &key, min_lsn).await;
        if let Err(e) = &result {
            self.metrics.error(&res.name, e.kind());
        }
        let patches = overlay::visible(patches, watermark);
        if patches.is_empty() {
            return result;
        }
        let base = result?;
        let value = overlay::merge(base.found.then_some(&base.value[..]), &patches);
        // A pending answer: never stored, never given to a near cache.
        Ok(Answer { found: true, value, layer: base.layer, fill_token: String::new(), vouched: None, pending: true })
    }

    /// The write-behind patches of a resource entry. Redis unreachable: none
    /// (the reader sees what Postgres has; documented in the README).
    async fn read_overlay(&self, tenant: &TenantId, resource: &str, entry_key: &str) -> Vec<overlay::Patch> {
        if !self.redis_usable() {
            return Vec::new();
        }
        let Ok(key) = self.keys.overlay(tenant, resource, entry_key) else { return Vec::new() };
        let read = async { self.redis.next().hgetall::<HashMap<String, String>, _>(&key).await.map_err(Into::into) };
        match self.redis_op(read).await {
            Ok(pairs) => overlay::decode(pairs.into_iter().collect()),
            Err(error) => {
                tracing::warn!(%resource, %error, "cannot read the write-behind overlay");
                Vec::new()
            }
        }
    }

    async fn lookup_resource(&self, read: Read<'_>, key: &str, min_lsn: u64) -> Result<Answer> {
        let res = read.res;
        if !self.fresh_enough(min_lsn) {
            // This node has not applied the caller's write yet: only the
            // database is sure to reflect it.
            self.metrics.cause(&self.metrics.bypassed, &res.name, "read_your_writes");
            return self.read_direct(read).await;
        }
        if let Some(cause) = self.stale_cause(res) {
            // The pipeline is down or behind: what the cache holds may miss
            // invalidations older than the bound.
            match res.on_stale {
                OnStale::Bypass => {
                    self.metrics.cause(&self.metrics.bypassed, &res.name, cause);
                    return self.read_direct(read).await;
                }
                OnStale::Serve => self.metrics.cause(&self.metrics.served_stale, &res.name, cause),
            }
        }
        let generation = self.l1.generation();
        if let Some(hit) = self.l1.get_entry(key) {
            self.metrics.hit(&res.name, "l1");
            return Ok(from_l1_hit(read.scope, hit, generation));
        }
        self.metrics.miss(&res.name, "l1");
        let mut attempt = 0;
        loop {
            let (filled, ran) = self.flights.run(key, || self.fill_resource(read, key)).await;
            if !ran {
                self.metrics.resource(&self.metrics.single_flight_merges, &res.name);
            }
            let filled = filled?;
            if ran || !filled.raced || attempt > 0 {
                return Ok(filled.answer);
            }
            attempt += 1;
        }
    }

    async fn fill_resource(&self, read: Read<'_>, key: &str) -> Result<Filled> {
        let Read { res, scope, .. } = read;
        let ticket = self.l1.begin_fill();
        if !self.redis_usable() {
            return self.fill_direct(read).await;
        }
        match self.redis_op(self.l2.get(key)).await {
            Ok(Some(bytes)) => {
                if let Some(answer) = self.answer_from_l2(ticket, scope, key, bytes) {
                    self.metrics.hit(&res.name, "l2");
                    return Ok(Filled { answer, raced: false });
                }
                return self.fill_unleased(read, key).await;
            }
            Ok(None) => self.metrics.miss(&res.name, "l2"),
            Err(_) => return self.fill_direct(read).await,
        }
        let owner = format!("{}:{}", self.node, self.seq.fetch_add(1, Ordering::Relaxed));
        let lease_key = self.keys.lease(key);
        let deadline = Instant::now() + Duration::from_millis(self.config.fill_wait_ms);
        let mut ticket = Some(ticket);
        loop {
            let lease =
                Lease { entry: key, key: &lease_key, owner: &owner, ttl: Duration::from_millis(self.config.lease_ms) };
            let begun = match self.redis_op(self.l2.begin_fill(scope, Some(&lease))).await {
                Ok(begun) => begun,
                Err(_) => {
                    return self.fill_direct(read).await;
                }
            };
            if let Some(bytes) = begun.entry {
                // Another node stored it between our L2 read and now.
                let ticket = ticket.take().unwrap_or_else(|| self.l1.begin_fill());
                if let Some(answer) = self.answer_from_l2(ticket, scope, key, bytes) {
                    self.metrics.hit(&res.name, "l2");
                    return Ok(Filled { answer, raced: false });
                }
                return self.fill_unleased(read, key).await;
            }
            if begun.acquired {
                let ticket = ticket.take().unwrap_or_else(|| self.l1.begin_fill());
                let token = begun.token;
                return self.fill_from_db(read, key, ticket, &token, Some((&lease_key, &owner))).await;
            }
            self.metrics.resource(&self.metrics.lease_waits, &res.name);
            // Another node is reading: wait for its value.
            loop {
                if Instant::now() >= deadline {
                    return self.fill_unleased(read, key).await;
                }
                tokio::time::sleep(LEASE_POLL).await;
                let fresh = self.l1.begin_fill();
                match self.redis_op(self.l2.get(key)).await {
                    Ok(Some(bytes)) => {
                        if let Some(answer) = self.answer_from_l2(fresh, scope, key, bytes) {
                            self.metrics.hit(&res.name, "l2");
                            return Ok(Filled { answer, raced: false });
                        }
                    }
                    Ok(None) => {}
                    Err(_) => {
                        return self.fill_direct(read).await;
                    }
                }
                // The holder gave up (failed, or its store was refused): try
                // to take the lease ourselves.
                if !self.redis_op(self.l2.lease_held(&lease_key)).await.unwrap_or(true) {
                    break;
                }
            }
        }
    }

    /// A fill without the lease (waited too long, or a corrupt L2 entry).
    async fn fill_unleased(&self, read: Read<'_>, key: &str) -> Result<Filled> {
        let ticket = self.l1.begin_fill();
        match self.redis_op(self.l2.begin_fill(read.scope, None)).await {
            Ok(begun) => self.fill_from_db(read, key, ticket, &begun.token, None).await,
            Err(_) => self.fill_direct(read).await,
        }
    }

    async fn fill_from_db(
        &self,
        read: Read<'_>,
        key: &str,
        ticket: FillTicket,
        token: &FillToken,
        lease: Option<(&str, &str)>,
    ) -> Result<Filled> {
        let Read { res, scope, .. } = read;
        let fetched = match self.query(read).await {
            Ok(f) => f,
            Err(e) => {
                if let Some((lease_key, owner)) = lease {
                    let _ = self.redis_op(self.l2.release_lease(lease_key, owner)).await;
                }
                return Err(e);
            }
        };
        if let Some(hook) = &self.hook {
            hook(key.to_string()).await;
        }
        let answer = Answer::new(fetched.found, fetched.value.clone(), Layer::Database);
        let ttl = res.ttl_for(fetched.found);
        let oversize = fetched.value.len() > self.config.max_value_bytes;
        if oversize {
            tracing::warn!(resource = %res.name, bytes = fetched.value.len(), "value over cache.max_value_bytes, not cached");
        }
        if ttl == Some(Duration::ZERO) || oversize {
            if let Some((lease_key, owner)) = lease {
                let _ = self.redis_op(self.l2.release_lease(lease_key, owner)).await;
            }
            return Ok(Filled { answer, raced: false });
        }
        let (tags, names) = self.entry_tags(scope, key, fetched.tags);
        let entry = StoredEntry {
            value: fetched.value.clone(),
            tags: names,
            found: fetched.found,
            expires_at_ms: ttl.map_or(0, |t| now_us() / 1000 + t.as_millis() as i64),
        };
        let owner = lease.map(|(_, o)| o);
        let stored = self
            .redis_op(self.l2.store_gated(scope, key, entry.encode_to_vec().into(), &tags, ttl, token, owner))
            .await;
        match stored {
            Ok(true) => {
                let generation = ticket.generation();
                let vouched = vouch(scope, &tags, entry.expires_at_ms, generation);
                let kept = self.l1.insert(ticket, key, l1_value(fetched.found, &fetched.value), tags, ttl);
                Ok(Filled { answer: answer.vouched_by(kept.then_some(vouched)), raced: false })
            }
            Ok(false) => {
                self.metrics.rejected(&res.name, "l2");
                Ok(Filled { answer, raced: true })
            }
            // Not stored in L2 and Redis is failing: L1 stays out of it too.
            Err(_) => Ok(Filled { answer, raced: false }),
        }
    }

    /// An L2 entry as an answer, filling L1 on the way (refused if raced).
    fn answer_from_l2(&self, ticket: FillTicket, scope: &Scope, key: &str, bytes: Bytes) -> Option<Answer> {
        let Ok(entry) = StoredEntry::decode(bytes) else {
            tracing::warn!(key, "undecodable L2 entry, filling again");
            return None;
        };
        let ttl = match entry.expires_at_ms {
            0 => None,
            at => Some(Duration::from_millis(u64::try_from(at - now_us() / 1000).ok().filter(|ms| *ms > 0)?)),
        };
        let tags: Vec<TagKey> = entry.tags.iter().map(|t| TagKey::new(scope.clone(), t.as_str())).collect();
        let vouched = vouch(scope, &tags, entry.expires_at_ms, ticket.generation());
        let kept = self.l1.insert(ticket, key, l1_value(entry.found, &entry.value), tags, ttl);
        Some(Answer::new(entry.found, entry.value, Layer::L2).vouched_by(kept.then_some(vouched)))
    }

    /// An entry's tags: its row tags plus its own `@<resource>:<key>`, which
    /// Delete and Set invalidate.
    fn entry_tags(&self, scope: &Scope, key: &str, mut names: Vec<String>) -> (Vec<TagKey>, Vec<String>) {
        names.push(self.self_tag(scope, key));
        let tags = names.iter().map(|t| TagKey::new(scope.clone(), t.as_str())).collect();
        (tags, names)
    }

    fn self_tag(&self, scope: &Scope, key: &str) -> String {
        let root = self.keys.scope_root(scope);
        format!("@{}", key.strip_prefix(&root).unwrap_or(key))
    }

    /// A fill that reads Postgres and stores nothing (Redis is failing).
    async fn fill_direct(&self, read: Read<'_>) -> Result<Filled> {
        self.read_direct(read).await.map(|answer| Filled { answer, raced: false })
    }

    /// Reads Postgres and stores nothing.
    async fn read_direct(&self, read: Read<'_>) -> Result<Answer> {
        let fetched = self.query(read).await?;
        Ok(Answer::new(fetched.found, fetched.value, Layer::Database))
    }

    async fn query(&self, read: Read<'_>) -> Result<Fetched> {
        let Read { res, scope, params, .. } = read;
        let _permits = self.read_permits(read.tenant).await?;
        let started = Instant::now();
        self.metrics.resource(&self.metrics.db_queries, &res.name);
        let db = self.db.get().await.map_err(|e| Error::Unavailable(format!("postgres: {e}")))?;
        let fetched = match res.fetch(&db, scope, params).await {
            // A pooled connection that died (terminated, server restarted)
            // fails once; a fresh one answers if Postgres does.
            Err(Error::Unavailable(_)) if db.is_closed() => {
                drop(db);
                let db = self.db.get().await.map_err(|e| Error::Unavailable(format!("postgres: {e}")))?;
                res.fetch(&db, scope, params).await?
            }
            result => result?,
        };
        self.metrics
            .fill_seconds
            .get_or_create(&crate::metrics::ResourceLabel { resource: res.name.clone() })
            .observe(started.elapsed().as_secs_f64());
        self.metrics.hit(&res.name, "database");
        Ok(fetched)
    }

    /// The caller's share of the node's database reads, then one of the
    /// node's; each waited for at most `cache.fill_permit_timeout_ms`.
    async fn read_permits(&self, tenant: &TenantId) -> Result<(QuotaPermit, SemaphorePermit<'_>)> {
        let wait = Duration::from_millis(self.config.fill_permit_timeout_ms);
        let Some(share) = self.tenant_fills.acquire(tenant, wait).await else {
            return Err(Error::Unavailable(format!(
                "tenant {tenant} has {} database reads in flight on this node (cache.max_fills_per_tenant) \
                 and none ended within {} ms (cache.fill_permit_timeout_ms); retry",
                self.tenant_fills.per_tenant(),
                wait.as_millis()
            )));
        };
        match tokio::time::timeout(wait, self.fills.acquire()).await {
            Ok(Ok(permit)) => Ok((share, permit)),
            Ok(Err(_)) => Err(Error::Unavailable("shutting down".into())),
            Err(_) => Err(Error::Unavailable(format!(
                "this node has {} database reads in flight (cache.max_concurrent_fills) and none ended within \
                 {} ms (cache.fill_permit_timeout_ms); retry",
                self.config.max_concurrent_fills,
                wait.as_millis()
            ))),
        }
    }

    /// An explicit key. A miss carries a fill token for the caller's Set.
    pub async fn get_key(&self, tenant: &TenantId, key: &str, min_lsn: u64) -> Result<Answer> {
        let scope = Scope::Tenant(tenant.clone());
        let entry_key = self.keys.entry(&scope, KV, key)?;
        if self.fresh_enough(min_lsn) {
            let generation = self.l1.generation();
            if let Some(hit) = self.l1.get_entry(&entry_key) {
                self.metrics.hit(KV, "l1");
                return Ok(from_l1_hit(&scope, hit, generation));
            }
            self.metrics.miss(KV, "l1");
        }
        let none = Answer::new(false, Bytes::new(), Layer::None);
        if !self.redis_usable() {
            return Ok(none);
        }
        let ticket = self.l1.begin_fill();
        let Ok(found) = self.redis_op(self.l2.get(&entry_key)).await else { return Ok(none) };
        if let Some(answer) = found.and_then(|bytes| self.answer_from_l2(ticket, &scope, &entry_key, bytes)) {
            self.metrics.hit(KV, "l2");
            return Ok(answer);
        }
        self.metrics.miss(KV, "l2");
        let token =
            self.redis_op(self.l2.begin_fill(&scope, None)).await.map(|b| b.token.to_string()).unwrap_or_default();
        Ok(Answer { fill_token: token, ..none })
    }

    /// Stores an explicit key. With a fill token the store is version-gated
    /// (false: an invalidation passed it); without one the value replaces
    /// whatever any node holds.
    pub async fn set_key(
        &self,
        tenant: &TenantId,
        key: &str,
        value: Bytes,
        ttl_ms: u64,
        tags: Vec<String>,
        fill_token: &str,
    ) -> Result<bool> {
        let scope = Scope::Tenant(tenant.clone());
        let entry_key = self.keys.entry(&scope, KV, key)?;
        let ttl_ms = self.check_explicit(&value, ttl_ms, &tags)?;
        let token: Option<FillToken> = if fill_token.is_empty() {
            None
        } else {
            Some(fill_token.parse().map_err(|e: herald_core::Error| Error::InvalidArgument(e.to_string()))?)
        };
        if !self.redis_usable() {
            return Err(Error::Unavailable("redis is unreachable; explicit keys cannot be stored".into()));
        }
        let ttl = Duration::from_millis(ttl_ms);
        let self_tag = self.self_tag(&scope, &entry_key);
        let (tag_keys, names) = self.entry_tags(&scope, &entry_key, tags);
        let entry = StoredEntry { value, tags: names, found: true, expires_at_ms: now_us() / 1000 + ttl_ms as i64 };
        let bytes: Bytes = entry.encode_to_vec().into();
        let stored = match token {
            Some(token) => {
                self.redis_op(self.l2.store_gated(&scope, &entry_key, bytes, &tag_keys, Some(ttl), &token, None))
                    .await?
            }
            None => {
                // Stamps the key as it stores, so a gated fill that started
                // earlier cannot overwrite this value; one script, so no Get
                // finds the key missing in between.
                let self_key = TagKey::new(scope.clone(), self_tag.as_str());
                self.redis_op(self.l2.replace(&entry_key, bytes, &self_key, &tag_keys, Some(ttl))).await?;
                true
            }
        };
        if stored {
            self.publish(&scope, vec![self_tag], Vec::new()).await?;
        } else {
            self.metrics.rejected(KV, "l2");
        }
        Ok(stored)
    }

    /// Checks an explicit key's value, TTL (0: `cache.key_ttl_ms`) and tags
    /// against the limits; the TTL to use.
    fn check_explicit(&self, value: &[u8], ttl_ms: u64, tags: &[String]) -> Result<u64> {
        if value.len() > self.config.max_value_bytes {
            return Err(Error::InvalidArgument(format!(
                "value of {} bytes is over the limit of {} (cache.max_value_bytes)",
                value.len(),
                self.config.max_value_bytes
            )));
        }
        let ttl_ms = if ttl_ms == 0 { self.config.key_ttl_ms } else { ttl_ms };
        if ttl_ms > self.config.max_key_ttl_ms {
            return Err(Error::InvalidArgument(format!(
                "ttl_ms {ttl_ms} is over the limit of {} (cache.max_key_ttl_ms)",
                self.config.max_key_ttl_ms
            )));
        }
        self.check_tags(tags)?;
        Ok(ttl_ms)
    }

    /// Drops one explicit key on every node.
    pub async fn delete_key(&self, tenant: &TenantId, key: &str) -> Result<u64> {
        let scope = Scope::Tenant(tenant.clone());
        let entry_key = self.keys.entry(&scope, KV, key)?;
        let tag = self.self_tag(&scope, &entry_key);
        self.invalidate_scope(&scope, vec![tag]).await
    }

    /// Drops one resource entry on every node. A global resource's entries
    /// are shared by every tenant, so only a caller trusted with every
    /// tenant (`trusted`) may drop them.
    pub async fn delete_resource(
        &self,
        tenant: &TenantId,
        name: &str,
        params: &[String],
        trusted: bool,
    ) -> Result<u64> {
        let res = self.resource(name)?;
        let params = &res.canonical_params(params)?;
        self.check_global(&res, trusted)?;
        let scope = Self::scope(&res, tenant);
        let key = self.keys.entry(&scope, &res.name, &res.key(params)?)?;
        let tag = self.self_tag(&scope, &key);
        self.invalidate_scope(&scope, vec![tag]).await
    }

    /// Caller-supplied tags: at most `cache.max_tags_per_request`, each 1 to
    /// `cache.max_tag_bytes` bytes without control characters.
    pub(crate) fn check_tags(&self, tags: &[String]) -> Result<()> {
        let (max_tags, max_bytes) = (self.config.max_tags_per_request, self.config.max_tag_bytes);
        if tags.len() > max_tags {
            return Err(Error::InvalidArgument(format!(
                "{} tags is over the limit of {max_tags} per request (cache.max_tags_per_request)",
                tags.len()
            )));
        }
        for tag in tags {
            if tag.len() > max_bytes {
                return Err(Error::InvalidArgument(format!(
                    "a tag of {} bytes is over the limit of {max_bytes} (cache.max_tag_bytes)",
                    tag.len()
                )));
            }
            if tag.is_empty() || tag.chars().any(char::is_control) {
                return Err(Error::InvalidArgument(format!(
                    "invalid tag {tag:?}: must not be empty or hold control characters"
                )));
            }
        }
        Ok(())
    }

    fn check_global(&self, res: &Resource, trusted: bool) -> Result<()> {
        if res.global && !trusted {
            return Err(Error::PermissionDenied {
                token: "(tenant-bound)".into(),
                tenant: format!("global resource {:?}", res.name),
            });
        }
        Ok(())
    }

    /// Drops every entry of the tenant holding any of `tags`, on every node.
    pub async fn invalidate_tags(&self, tenant: &TenantId, tags: Vec<String>) -> Result<u64> {
        if tags.is_empty() {
            return Err(Error::InvalidArgument("no tags given".into()));
        }
        self.check_tags(&tags)?;
        self.invalidate_scope(&Scope::Tenant(tenant.clone()), tags).await
    }

    async fn invalidate_scope(&self, scope: &Scope, tags: Vec<String>) -> Result<u64> {
        let deleted = self.redis_op(self.l2.invalidate(scope, &tags)).await?;
        self.publish(scope, tags, Vec::new()).await?;
        Ok(deleted)
    }

    /// Tenant-wide bulk change.
    pub async fn invalidate_prefix(&self, tenant: &TenantId, target: PrefixTarget, trusted: bool) -> Result<u64> {
        let (scope, prefix) = match &target {
            PrefixTarget::Resource(name) => {
                let res = self.resource(name)?;
                self.check_global(&res, trusted)?;
                let scope = Self::scope(&res, tenant);
                let prefix = format!("{}{}:", self.keys.scope_root(&scope), res.name);
                (scope, prefix)
            }
            PrefixTarget::KeyPrefix(p) => {
                if p.is_empty() {
                    return Err(Error::InvalidArgument("key_prefix is empty; use all to drop everything".into()));
                }
                let scope = Scope::Tenant(tenant.clone());
                // Validated as a key part: the prefix of valid keys.
                let entry = self.keys.entry(&scope, KV, p)?;
                (scope, entry)
            }
            PrefixTarget::All => {
                let scope = Scope::Tenant(tenant.clone());
                let root = self.keys.scope_root(&scope);
                (scope, root)
            }
        };
        let deleted = self.redis_op(self.l2.invalidate_prefix(&scope, &prefix)).await?;
        self.publish(&scope, Vec::new(), vec![prefix]).await?;
        Ok(deleted)
    }

    /// Tells every node's L1 (this one's at once) to drop `tags` and keys
    /// under `prefixes` in `scope`.
    async fn publish(&self, scope: &Scope, tags: Vec<String>, prefixes: Vec<String>) -> Result<()> {
        // This node's L1 first, so the caller's next read here sees its own
        // write. Only the entries: watchers get the event once, when the
        // published copy comes back and is applied (deletes are idempotent).
        let tag_keys: Vec<TagKey> = tags.iter().map(|t| TagKey::new(scope.clone(), t.as_str())).collect();
        self.l1.invalidate(&tag_keys);
        for prefix in &prefixes {
            self.l1.invalidate_prefix(prefix);
        }
        let event = InvalidationEvent {
            event_id: format!("api:{}:{}", self.node, self.seq.fetch_add(1, Ordering::Relaxed)),
            tenant: match scope {
                Scope::Tenant(t) => t.to_string(),
                Scope::Global => String::new(),
            },
            tags,
            key_prefixes: prefixes,
            commit_time_us: now_us(),
            captured_time_us: now_us(),
            ..Default::default()
        };
        // The partition of the scope's events: its L1 holders hear it in
        // order with broadcast's invalidations of that tenant.
        let channel = self.keys.l1_partition_channel(partition_of(&event.tenant, self.partitions), self.partitions);
        self.redis_op(herald_core::l1::wire::publish_invalidations(&self.redis, &channel, &[event])).await
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }
}
