//! `herald.v1.Cache` over gRPC: authentication from `authorization: Bearer`
//! metadata, then the same [`Cache`] operations as HTTP.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use herald_core::l1::Applied;
use herald_proto::Message as _;
use herald_proto::v1::cache_server::Cache as CacheService;
use herald_proto::v1::{
    DeleteRequest, DeleteResponse, GetManyRequest, GetManyResponse, GetRequest, GetResponse, GetResult,
    InvalidatePrefixRequest, InvalidateResponse, InvalidateTagsRequest, InvalidationEvent, SetRequest, SetResponse,
    WatchRequest, WriteRequest, WriteResponse, delete_request, get_item, get_request,
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

fn answer(a: Answer) -> GetResponse {
    GetResponse { found: a.found, value: a.value, layer: a.layer as i32, fill_token: a.fill_token }
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
        Ok(Response::new(answer(api::lookup(&self.cache, &tenant, target, req.min_commit_lsn).await?)))
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
            Ok(a) => GetResult { response: Some(answer(a)), code: 0, error: String::new() },
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

    type WatchInvalidationsStream = WatchStream;

    #[tracing::instrument(skip_all, fields(tenant = %request.get_ref().tenant))]
    async fn watch_invalidations(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchInvalidationsStream>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let tenant = caller.tenant(&req.tenant)?;
        let share = self.tenant_watchers.try_acquire(&tenant).ok_or_else(|| {
            let max = self.tenant_watchers.per_tenant();
            Status::resource_exhausted(format!(
                "tenant has {max} watch streams on this node (cache.max_watchers_per_tenant)"
            ))
        })?;
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("too many invalidation watchers on this node (cache.max_watchers)")
        })?;
        let permit = (share, permit);
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
        }))
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
