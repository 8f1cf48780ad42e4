//! [`NearCache`]: reads served from RAM while the Watch stream vouches for
//! them, read-through to cache-api otherwise; writes pass through and drop
//! the local copy at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use herald_l1::L1Metrics;
use herald_l1::flight::SingleFlight;
use herald_proto::v1::cache_client::CacheClient;
use herald_proto::v1::{
    DeleteRequest, GetItem, GetManyRequest, GetRequest, GetResponse, InvalidateTagsRequest, ResourceRef, SetRequest,
    WatchRequest, delete_request, get_item, get_request,
};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::config::NearConfig;
use crate::error::{Error, Result};
use crate::feed::{self, FeedOptions, Messages, Source};
use crate::state::{Answer, Coherence, StaleMetrics};

/// What to read: a configured resource by its parameters, or an explicit key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Resource { name: String, params: Vec<String> },
    Key(String),
}

impl Target {
    pub fn resource(name: &str, params: &[&str]) -> Self {
        Target::Resource { name: name.into(), params: params.iter().map(|p| p.to_string()).collect() }
    }

    /// The local key: one per (tenant, target); NUL never occurs in a
    /// tenant id or resource name.
    fn local_key(&self, tenant: &str) -> String {
        match self {
            Target::Resource { name, params } => format!("r\0{tenant}\0{name}\0{}", params.join("\0")),
            Target::Key(key) => format!("k\0{tenant}\0{key}"),
        }
    }
}

/// One connection per endpoint; the feed and the reads use the same one, so
/// `Get` and `Watch` are answered by the same node (docs/near-cache.md).
struct Connections {
    channels: Vec<Channel>,
    current: AtomicUsize,
    auth: MetadataValue<tonic::metadata::Ascii>,
    timeout: Duration,
}

impl Connections {
    fn client(&self) -> CacheClient<Channel> {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len();
        CacheClient::new(self.channels[i].clone())
    }

    fn request<T>(&self, body: T) -> Request<T> {
        let mut request = Request::new(body);
        request.metadata_mut().insert("authorization", self.auth.clone());
        request.set_timeout(self.timeout);
        request
    }
}

struct WatchSource {
    connections: Arc<Connections>,
    tenants: Vec<String>,
}

impl Source for WatchSource {
    fn open(&self, rotate: bool) -> futures::future::BoxFuture<'static, Result<Messages, Status>> {
        if rotate {
            self.connections.current.fetch_add(1, Ordering::Relaxed);
        }
        let mut client = self.connections.client();
        let mut request = Request::new(WatchRequest { tenants: self.tenants.clone(), ..Default::default() });
        request.metadata_mut().insert("authorization", self.connections.auth.clone());
        async move {
            let stream = client.watch(request).await?.into_inner();
            Ok(futures::StreamExt::boxed(stream))
        }
        .boxed()
    }
}

/// A fill's outcome, shared with the calls that joined it.
type Filled = std::result::Result<(Bytes, bool), Status>;

/// An in-process cache of cache-api answers, coherent through `Watch`.
/// Cheap to clone; clones share the cache. Dropping the last clone does not
/// stop the feed: call [`NearCache::close`].
#[derive(Clone)]
pub struct NearCache {
    inner: Arc<Inner>,
}

struct Inner {
    state: Coherence,
    connections: Arc<Connections>,
    flights: SingleFlight<Filled>,
    fills: Semaphore,
    shutdown: CancellationToken,
}

fn local_value(found: bool, value: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(value.len() + 1);
    b.put_u8(u8::from(found));
    b.extend_from_slice(value);
    b.freeze()
}

/// `None` for "not found" (a negative entry or an uncached key).
fn from_local(bytes: &Bytes) -> Option<Bytes> {
    (bytes.first() == Some(&1)).then(|| bytes.slice(1..))
}

impl NearCache {
    /// Connects (lazily) to `config.endpoints` and starts following the
    /// Watch stream. Until it is live every read goes to cache-api.
    pub fn connect(config: NearConfig) -> Result<Self> {
        config.check()?;
        let keepalive = config.heartbeat_timeout / 2;
        let channels = config
            .endpoints
            .iter()
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|e| Error::Config(format!("endpoint {url:?}: {e}")))?
                    .connect_timeout(config.heartbeat_timeout)
                    .http2_keep_alive_interval(keepalive)
                    .keep_alive_timeout(keepalive)
                    .keep_alive_while_idle(true);
                Ok(endpoint.connect_lazy())
            })
            .collect::<Result<Vec<_>>>()?;
        let auth = format!("Bearer {}", config.token)
            .parse()
            .map_err(|_| Error::Config("the token is not a valid header value".into()))?;
        let connections =
            Arc::new(Connections { channels, current: AtomicUsize::new(0), auth, timeout: config.request_timeout });
        let state = Coherence::new(config.max_bytes, config.max_ttl, config.heartbeat_timeout)
            .with_max_staleness(config.max_staleness);
        let shutdown = CancellationToken::new();
        let source = WatchSource { connections: connections.clone(), tenants: config.tenants.clone() };
        let options = FeedOptions { heartbeat_timeout: config.heartbeat_timeout, backoff: config.backoff };
        tokio::spawn(feed::run(state.clone(), source, options, shutdown.clone()));
        let inner = Inner {
            state,
            connections,
            flights: SingleFlight::default(),
            fills: Semaphore::new(config.max_concurrent_fills),
            shutdown,
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Stops following the stream; reads go to cache-api from now on.
    pub fn close(&self) {
        self.inner.shutdown.cancel();
    }

    /// Whether reads are being served from RAM.
    pub fn is_live(&self) -> bool {
        self.inner.state.is_live()
    }

    /// Waits until live, at most `timeout`; true when live.
    pub async fn wait_live(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_live() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// The `herald_l1_*` metrics (hits, misses, bypassed, rejected stale
    /// fills, flushes, live, entries, bytes).
    pub fn metrics(&self) -> &L1Metrics {
        self.inner.state.l1().metrics()
    }

    /// Reads sent to cache-api because of `max_staleness`, by cause
    /// (`herald_near_bypassed_total{cause}`).
    pub fn stale_metrics(&self) -> &StaleMetrics {
        self.inner.state.stale_metrics()
    }

    /// Entries held.
    pub fn entry_count(&self) -> u64 {
        self.inner.state.l1().entry_count()
    }

    /// A configured resource, decoded from its JSON value; `None` when it
    /// found no row.
    pub async fn get_resource<T: DeserializeOwned>(
        &self,
        tenant: &str,
        resource: &str,
        params: &[&str],
    ) -> Result<Option<T>> {
        match self.get(tenant, &Target::resource(resource, params)).await? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// An explicit key's value; `None` when it is not cached anywhere.
    pub async fn get_key(&self, tenant: &str, key: &str) -> Result<Option<Bytes>> {
        self.get(tenant, &Target::Key(key.into())).await
    }

    /// One value: from RAM while live (and within `max_staleness`), else
    /// (and on a miss) from cache-api, one request per key at a time.
    pub async fn get(&self, tenant: &str, target: &Target) -> Result<Option<Bytes>> {
        let key = target.local_key(tenant);
        if let Some(bytes) = self.inner.state.lookup(&key, Instant::now()) {
            return Ok(from_local(&bytes));
        }
        let mut joined_once = false;
        loop {
            let (filled, ran) = self.inner.flights.run(&key, || self.fill(tenant, &key, target)).await;
            let (bytes, stored) = filled?;
            // A call that joined a fill started before it cannot tell whether
            // an invalidation it already saw passed that fill: unless the
            // fill was stored (which proves it did not), fill again once.
            if ran || stored || joined_once || !self.is_live() {
                return Ok(from_local(&bytes));
            }
            joined_once = true;
        }
    }

    async fn fill(&self, tenant: &str, key: &str, target: &Target) -> Filled {
        let _permit = self.inner.fills.acquire().await.map_err(|_| Status::unavailable("near cache closed"))?;
        let ticket = self.inner.state.ticket();
        let request = GetRequest {
            tenant: tenant.into(),
            target: Some(match target {
                Target::Resource { name, params } => {
                    get_request::Target::Resource(ResourceRef { resource: name.clone(), params: params.clone() })
                }
                Target::Key(k) => get_request::Target::Key(k.clone()),
            }),
            min_commit_lsn: 0,
        };
        let connections = &self.inner.connections;
        let response = connections.client().get(connections.request(request)).await?.into_inner();
        let bytes = local_value(response.found, &response.value);
        let stored = self.inner.state.fill(ticket, key, answer(tenant, &response, bytes.clone()));
        Ok((bytes, stored))
    }

    /// Several values of one tenant: hits from RAM, the rest in one
    /// `GetMany`. Per-item errors come back per item.
    pub async fn get_many(&self, tenant: &str, targets: &[Target]) -> Result<Vec<Result<Option<Bytes>>>> {
        let mut out: Vec<Option<Result<Option<Bytes>>>> = Vec::with_capacity(targets.len());
        let mut missing = Vec::new();
        let now = Instant::now();
        for (i, target) in targets.iter().enumerate() {
            match self.inner.state.lookup(&target.local_key(tenant), now) {
                Some(bytes) => out.push(Some(Ok(from_local(&bytes)))),
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if missing.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let ticket_for = |_: &usize| self.inner.state.ticket();
        let tickets: Vec<_> = missing.iter().map(ticket_for).collect();
        let items = missing
            .iter()
            .map(|&i| GetItem {
                target: Some(match &targets[i] {
                    Target::Resource { name, params } => {
                        get_item::Target::Resource(ResourceRef { resource: name.clone(), params: params.clone() })
                    }
                    Target::Key(k) => get_item::Target::Key(k.clone()),
                }),
            })
            .collect();
        let connections = &self.inner.connections;
        let request = GetManyRequest { tenant: tenant.into(), items, min_commit_lsn: 0 };
        let response = connections.client().get_many(connections.request(request)).await?.into_inner();
        for ((i, ticket), result) in missing.into_iter().zip(tickets).zip(response.results) {
            out[i] = Some(match result.response {
                Some(r) if result.code == 0 => {
                    let bytes = local_value(r.found, &r.value);
                    let key = targets[i].local_key(tenant);
                    self.inner.state.fill(ticket, &key, answer(tenant, &r, bytes.clone()));
                    Ok(from_local(&bytes))
                }
                _ => Err(Error::Status(Status::new(result.code.into(), result.error))),
            });
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| Error::Status(Status::internal("GetMany answered fewer items than asked"))))
            .collect()
    }

    /// Stores an explicit key through cache-api (every node drops its copy);
    /// the local copy is dropped at once.
    pub async fn set(&self, tenant: &str, key: &str, value: Bytes, ttl: Duration, tags: &[&str]) -> Result<bool> {
        let local = Target::Key(key.into()).local_key(tenant);
        self.inner.state.drop_key(&local);
        let request = SetRequest {
            tenant: tenant.into(),
            key: key.into(),
            value,
            ttl_ms: ttl.as_millis() as u64,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            fill_token: String::new(),
        };
        let connections = &self.inner.connections;
        let stored = connections.client().set(connections.request(request)).await;
        self.inner.state.drop_key(&local);
        Ok(stored?.into_inner().stored)
    }

    /// Drops one resource entry or explicit key on every node, and here at
    /// once.
    pub async fn delete(&self, tenant: &str, target: &Target) -> Result<u64> {
        let local = target.local_key(tenant);
        self.inner.state.drop_key(&local);
        let request = DeleteRequest {
            tenant: tenant.into(),
            target: Some(match target {
                Target::Resource { name, params } => {
                    delete_request::Target::Resource(ResourceRef { resource: name.clone(), params: params.clone() })
                }
                Target::Key(k) => delete_request::Target::Key(k.clone()),
            }),
        };
        let connections = &self.inner.connections;
        let deleted = connections.client().delete(connections.request(request)).await;
        self.inner.state.drop_key(&local);
        Ok(deleted?.into_inner().deleted)
    }

    /// Drops every entry of the tenant holding any of `tags`, on every node
    /// and here at once.
    pub async fn invalidate_tags(&self, tenant: &str, tags: &[&str]) -> Result<u64> {
        let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        self.inner.state.drop_tags(tenant, &tags);
        let request = InvalidateTagsRequest { tenant: tenant.into(), tags: tags.clone() };
        let connections = &self.inner.connections;
        let deleted = connections.client().invalidate_tags(connections.request(request)).await;
        self.inner.state.drop_tags(tenant, &tags);
        Ok(deleted?.into_inner().deleted)
    }
}

fn answer<'a>(tenant: &'a str, response: &'a GetResponse, value: Bytes) -> Answer<'a> {
    Answer {
        tenant,
        global: response.global,
        value,
        tags: &response.tags,
        expires_at_ms: response.expires_at_ms,
        node_id: &response.node_id,
        generation: response.generation,
    }
}
