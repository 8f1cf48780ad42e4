//! `herald.v1.Cache` over gRPC: authentication from `authorization: Bearer`
//! metadata, then the same [`Cache`] operations as HTTP.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use herald_core::keys::TenantId;
use herald_core::l1::Applied;
use herald_proto::v1::cache_server::Cache as CacheService;
use herald_proto::v1::{
    DeleteRequest, DeleteResponse, GetManyRequest, GetManyResponse, GetRequest, GetResponse, GetResult,
    InvalidatePrefixRequest, InvalidateResponse, InvalidateTagsRequest, InvalidationEvent, SetRequest, SetResponse,
    WatchRequest, delete_request, get_item, get_request,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{Auth, Caller, bearer};
use crate::cache::{Answer, Cache, PrefixTarget};
use crate::error::Error;

/// Most items in one GetMany.
pub const MAX_GET_MANY: usize = 256;

/// The gRPC service.
#[derive(Clone)]
pub struct Grpc {
    cache: Arc<Cache>,
    auth: Arc<Auth>,
    watchers: Arc<Semaphore>,
}

impl Grpc {
    pub fn new(cache: Arc<Cache>, auth: Arc<Auth>, max_watchers: usize) -> Self {
        Self { cache, auth, watchers: Arc::new(Semaphore::new(max_watchers)) }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        Ok(self.auth.authenticate(bearer(header))?)
    }
}

fn answer(a: Answer) -> GetResponse {
    GetResponse { found: a.found, value: a.value, layer: a.layer as i32, fill_token: a.fill_token }
}

/// A resource or key lookup, shared by Get and GetMany.
async fn lookup(cache: &Cache, tenant: &TenantId, target: Target, min_lsn: u64) -> Result<Answer, Error> {
    match target {
        Target::Resource(r) => cache.get_resource(tenant, &r.resource, &r.params, min_lsn).await,
        Target::Key(k) => cache.get_key(tenant, &k, min_lsn).await,
    }
}

enum Target {
    Resource(herald_proto::v1::ResourceRef),
    Key(String),
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
            get_request::Target::Resource(r) => Target::Resource(r),
            get_request::Target::Key(k) => Target::Key(k),
        };
        Ok(Response::new(answer(lookup(&self.cache, &tenant, target, req.min_commit_lsn).await?)))
    }

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant, items = request.get_ref().items.len()))]
    async fn get_many(&self, request: Request<GetManyRequest>) -> Result<Response<GetManyResponse>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        if req.items.len() > MAX_GET_MANY {
            return Err(Status::invalid_argument(format!("at most {MAX_GET_MANY} items per GetMany")));
        }
        let lookups = req.items.into_iter().map(|item| {
            let cache = &self.cache;
            let tenant = &tenant;
            async move {
                let target = match item.target {
                    Some(get_item::Target::Resource(r)) => Target::Resource(r),
                    Some(get_item::Target::Key(k)) => Target::Key(k),
                    None => return Err(Error::InvalidArgument("item names neither a resource nor a key".into())),
                };
                lookup(cache, tenant, target, req.min_commit_lsn).await
            }
        });
        let results = futures::future::join_all(lookups)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(a) => GetResult { response: Some(answer(a)), code: 0, error: String::new() },
                Err(e) => GetResult { response: None, code: e.grpc_code() as i32, error: e.to_string() },
            })
            .collect();
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
        let target = prefix_target(&req.resource, &req.key_prefix, req.all)?;
        let deleted = self.cache.invalidate_prefix(&tenant, target, caller.trusted()).await?;
        Ok(Response::new(InvalidateResponse { deleted }))
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
        let permit = self
            .watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many invalidation watchers on this node"))?;
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
                if matches_watch(&event, tenant.as_str(), &req.tables, &req.tags)
                    && tx.send(Ok((*event).clone())).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Whether a watcher of `tenant` filtering by `tables` and `tags` gets
/// `event`. Events of other tenants never pass; tenant-wide events (a
/// TRUNCATE of a tenant table) and global-scope events (tables without a
/// tenant column, whose entries every tenant may read) reach every tenant's
/// watchers. The cache API's own invalidations (Delete, Set, InvalidateTags,
/// InvalidatePrefix) name no table, so a table filter cannot exclude them.
pub fn matches_watch(event: &InvalidationEvent, tenant: &str, tables: &[String], tags: &[String]) -> bool {
    let ours = event.tenant == tenant || event.all_tenants || event.tenant.is_empty();
    let table_ok = tables.is_empty() || event.table.is_empty() || tables.contains(&event.table);
    let tags_ok = tags.is_empty()
        || herald_core::tags::is_table_wide(event)
        || !event.key_prefixes.is_empty()
        || event.tags.iter().any(|t| tags.iter().any(|w| w == t));
    ours && table_ok && tags_ok
}

/// InvalidatePrefix's target: exactly one of the three.
pub fn prefix_target(resource: &str, key_prefix: &str, all: bool) -> Result<PrefixTarget, Error> {
    match (resource.is_empty(), key_prefix.is_empty(), all) {
        (false, true, false) => Ok(PrefixTarget::Resource(resource.into())),
        (true, false, false) => Ok(PrefixTarget::KeyPrefix(key_prefix.into())),
        (true, true, true) => Ok(PrefixTarget::All),
        _ => Err(Error::InvalidArgument("give exactly one of resource, key_prefix and all".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_filter_keeps_tenants_apart() {
        let event = InvalidationEvent {
            tenant: "acme".into(),
            table: "res_users".into(),
            tags: vec!["res_users.id=1".into()],
            ..Default::default()
        };
        assert!(matches_watch(&event, "acme", &[], &[]));
        assert!(!matches_watch(&event, "globex", &[], &[]));
        assert!(matches_watch(&event, "acme", &["res_users".into()], &["res_users.id=1".into()]));
        assert!(!matches_watch(&event, "acme", &["other".into()], &[]));
        assert!(!matches_watch(&event, "acme", &[], &["res_users.id=2".into()]));
        let api = InvalidationEvent { table: String::new(), ..event.clone() };
        assert!(matches_watch(&api, "acme", &["res_users".into()], &[]));
        assert!(!matches_watch(&api, "globex", &["res_users".into()], &[]));
        let global = InvalidationEvent { tenant: String::new(), ..event.clone() };
        assert!(matches_watch(&global, "globex", &["res_users".into()], &[]));
        let truncate = InvalidationEvent { all_tenants: true, ..event };
        assert!(matches_watch(&truncate, "globex", &[], &[]));
    }
}
