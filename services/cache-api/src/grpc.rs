//! `herald.v1.Cache` over gRPC: authentication from `authorization: Bearer`
//! metadata, then the same [`Cache`] operations as HTTP.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use herald_core::l1::Applied;
use herald_proto::Message as _;
use herald_proto::v1::cache_server::Cache as CacheService;
use herald_proto::v1::{
    AddRequest, AddResponse, DeleteRequest, DeleteResponse, GetManyRequest, GetManyResponse, GetRequest, GetResponse,
    GetResult, IncrRequest, IncrResponse, InvalidatePrefixRequest, InvalidateResponse, InvalidateTagsRequest,
    InvalidationEvent, SetRequest, SetResponse, WatchMessage, WatchRequest, WriteRequest, WriteResponse,
    delete_request, get_item, get_request,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::{self, Target};
use crate::auth::{Auth, Caller, bearer};
use crate::cache::{Answer, Cache};
use crate::error::Error;
use crate::quota::TenantQuota;
use crate::watch::{self, Watched};
use crate::write::Writer;

/// The gRPC service.
#[derive(Clone)]
pub struct Grpc {
    cache: Arc<Cache>,
    auth: Arc<Auth>,
    writer: Arc<Writer>,
    watchers: Arc<Semaphore>,
    tenant_watchers: TenantQuota,
}

impl Grpc {
    /// Watch streams are limited by `cache.max_watchers` and
    /// `cache.max_watchers_per_tenant`.
    pub fn new(cache: Arc<Cache>, auth: Arc<Auth>, writer: Arc<Writer>) -> Self {
        let watchers = Arc::new(Semaphore::new(cache.config().max_watchers));
        let tenant_watchers = TenantQuota::new(cache.config().max_watchers_per_tenant);
        Self { cache, auth, writer, watchers, tenant_watchers }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        Ok(self.auth.authenticate(bearer(header))?)
    }
}

/// An answer on the wire, with what a near cache needs to store it
/// (docs/near-cache.md).
fn answer(cache: &Cache, a: Answer) -> GetResponse {
    let (tags, expires_at_ms, generation, global) = match a.vouched {
        Some(v) => (v.tags, v.expires_at_ms, v.generation, v.global),
        None => (Vec::new(), 0, cache.l1().generation(), false),
    };
    GetResponse {
        found: a.found,
        value: a.value,
        layer: a.layer as i32,
        fill_token: a.fill_token,
        tags,
        expires_at_ms,
        node_id: cache.node().to_string(),
        generation,
        global,
        pending: a.pending,
    }
}

fn missing_target() -> Status {
    Status::invalid_argument("name a resource or a key")
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<InvalidationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CacheService for Grpc {
    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant))]
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let target = match req.target.ok_or_else(missing_target)? {
            get_request::Target::Resource(r) => Target::Resource { name: r.resource, params: r.params },
            get_request::Target::Key(k) => Target::Key(k),
        };
        Ok(Response::new(answer(&self.cache, api::lookup(&self.cache, &tenant, target, req.min_commit_lsn).await?)))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant, items = request.get_ref().items.len()))]
    async fn get_many(&self, request: Request<GetManyRequest>) -> Result<Response<GetManyResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let items = req
            .items
            .into_iter()
            .map(|item| match item.target {
                Some(get_item::Target::Resource(r)) => Ok(Target::Resource { name: r.resource, params: r.params }),
                Some(get_item::Target::Key(k)) => Ok(Target::Key(k)),
                None => Err(Error::InvalidArgument("item names neither a resource nor a key".into())),
            })
            .collect();
        let render = |r: Result<Answer, Error>| match r {
            Ok(a) => GetResult { response: Some(answer(&self.cache, a)), code: 0, error: String::new() },
            Err(e) => GetResult { response: None, code: e.grpc_code() as i32, error: e.to_string() },
        };
        // The item's bytes in the answer, with its field tag and length.
        let size = |r: &GetResult| r.encoded_len() + 8;
        let results = api::get_many(&self.cache, &tenant, items, req.min_commit_lsn, render, size).await?;
        Ok(Response::new(GetManyResponse { results }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant, bytes = request.get_ref().value.len()))]
    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let stored = self.cache.set_key(&tenant, &req.key, req.value, req.ttl_ms, req.tags, &req.fill_token).await?;
        Ok(Response::new(SetResponse { stored }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant))]
    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let deleted = match req.target.ok_or_else(missing_target)? {
            delete_request::Target::Resource(r) => {
                self.cache.delete_resource(&tenant, &r.resource, &r.params, caller.trusted()).await?
            }
            delete_request::Target::Key(k) => self.cache.delete_key(&tenant, &k).await?,
        };
        Ok(Response::new(DeleteResponse { deleted }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant, tags = request.get_ref().tags.len()))]
    async fn invalidate_tags(
        &self,
        request: Request<InvalidateTagsRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let deleted = self.cache.invalidate_tags(&tenant, req.tags).await?;
        Ok(Response::new(InvalidateResponse { deleted }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant))]
    async fn invalidate_prefix(
        &self,
        request: Request<InvalidatePrefixRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let target = api::prefix_target(&req.resource, &req.key_prefix, req.all)?;
        let deleted = self.cache.invalidate_prefix(&tenant, target, caller.trusted()).await?;
        Ok(Response::new(InvalidateResponse { deleted }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant, bytes = request.get_ref().value.len()))]
    async fn add(&self, request: Request<AddRequest>) -> Result<Response<AddResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let stored = self.cache.add_key(&tenant, &req.key, req.value, req.ttl_ms, req.tags).await?;
        Ok(Response::new(AddResponse { stored }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant))]
    async fn incr(&self, request: Request<IncrRequest>) -> Result<Response<IncrResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let value = self.cache.incr_key(&tenant, &req.key, req.delta).await?;
        Ok(Response::new(IncrResponse { found: value.is_some(), value: value.unwrap_or(0) }))
    }

    type WatchInvalidationsStream = WatchStream;

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant))]
    async fn watch_invalidations(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchInvalidationsStream>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let watched = Watched::Only([tenant].into());
        let permit = watch::shares(&self.tenant_watchers, &self.watchers, &watched)?;
        let l1 = self.cache.l1();
        // Subscribed before the liveness check: any flush after it (the feed
        // dropping, however briefly, or an undecodable message) arrives in
        // order with the events and ends the stream.
        let mut applied = l1.watch();
        if !l1.is_live() {
            return Err(Status::unavailable("this node's invalidation feed is down; retry"));
        }
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let received = tokio::select! {
                    received = applied.recv() => received,
                    _ = tx.closed() => return,
                };
                let event = match received {
                    Ok(Applied::Event(event)) => event,
                    Ok(Applied::Watermark { .. }) => continue,
                    Ok(Applied::Flushed { .. }) => {
                        let msg = "this node dropped its cache (its invalidation feed was interrupted): \
                                   drop everything and watch again";
                        let _ = tx.send(Err(Status::unavailable(msg))).await;
                        return;
                    }
                    Err(RecvError::Lagged(n)) => {
                        let msg = format!("watcher fell {n} events behind: drop everything and watch again");
                        let _ = tx.send(Err(Status::data_loss(msg))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                };
                if watch::matches(&event, &watched, &req.tables, &req.tags)
                    && tx.send(Ok((*event).clone())).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant, command = %request.get_ref().command))]
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let w = self.writer.write(&tenant, &req.command, &req.params).await?;
        Ok(Response::new(WriteResponse {
            rows_affected: w.rows_affected,
            commit_lsn: w.commit_lsn,
            wait_reached: w.wait_reached,
            command_id: w.command_id,
            pending: w.pending,
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchMessage, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(tenants = ?request.get_ref().tenants))]
    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let watched = Watched::of(&caller, &req)?;
        let permits = watch::shares(&self.tenant_watchers, &self.watchers, &watched)?;
        let rx = watch::start(watch::Stream {
            l1: self.cache.l1().clone(),
            node: self.cache.node().to_string(),
            heartbeat: Duration::from_millis(self.cache.config().watch_heartbeat_ms),
            clock_skew_ms: self.cache.config().clock_skew_ms,
            watched,
            tables: req.tables,
            tags: req.tags,
            permits,
        })?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
