//! The publish API for app servers: `POST /v1/publish` and gRPC
//! `herald.v1.Publisher/Publish`, both authenticated with a service token,
//! both through [`herald_core::channel::publish`] (the same function
//! broadcast uses for team events).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::channel::{self, Channel, HistoryOptions};
use herald_core::keys::TenantId;
use herald_proto::v1::publisher_server::Publisher as PublisherRpc;
use herald_proto::v1::{PublishRequest, PublishResponse};
use serde::Deserialize;

use crate::Ctx;
use crate::auth::{ServiceAuth, ServiceAuthError, bearer};
use crate::metrics::ResultLabel;
use crate::protocol::check_data;

/// Idempotency keys are remembered this long (per channel).
pub const IDEMPOTENCY_TTL_S: u64 = 3_600;

/// Idempotency keys starting with this are broadcast's own
/// (`ev:{event_id}:team:{team}`, `services/broadcast/src/apply.rs`): a
/// service that could use one would suppress a row change's publication.
pub const RESERVED_IDEMPOTENCY_PREFIX: &str = "ev:";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooBig(String),
    #[error("missing or unknown service token")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("tenant rate limit")]
    RateLimited,
}

impl PublishError {
    fn label(&self) -> &'static str {
        match self {
            PublishError::Invalid(_) | PublishError::TooBig(_) => "invalid",
            PublishError::Unauthenticated => "unauthenticated",
            PublishError::Forbidden(_) => "forbidden",
            PublishError::NotFound(_) => "not_found",
            PublishError::RateLimited => "rate_limited",
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            PublishError::Invalid(_) => StatusCode::BAD_REQUEST,
            PublishError::TooBig(_) => StatusCode::PAYLOAD_TOO_LARGE,
            PublishError::Unauthenticated => StatusCode::UNAUTHORIZED,
            PublishError::Forbidden(_) => StatusCode::FORBIDDEN,
            PublishError::NotFound(_) => StatusCode::NOT_FOUND,
            PublishError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl From<PublishError> for tonic::Status {
    fn from(e: PublishError) -> Self {
        let message = e.to_string();
        match e {
            PublishError::Invalid(_) | PublishError::TooBig(_) => tonic::Status::invalid_argument(message),
            PublishError::Unauthenticated => tonic::Status::unauthenticated(message),
            PublishError::Forbidden(_) => tonic::Status::permission_denied(message),
            PublishError::NotFound(_) => tonic::Status::not_found(message),
            PublishError::RateLimited => tonic::Status::resource_exhausted(message),
        }
    }
}

/// What a publication did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub offset: u64,
    pub epoch: String,
    pub duplicate: bool,
    /// Redis was down: delivered to this node's sockets only.
    pub local_only: bool,
}

/// The publish API's state, shared by HTTP and gRPC.
#[derive(Clone)]
pub struct Publisher {
    ctx: Arc<Ctx>,
    auth: Arc<ServiceAuth>,
}

impl Publisher {
    pub fn new(ctx: Arc<Ctx>, auth: ServiceAuth) -> Self {
        Self { ctx, auth: Arc::new(auth) }
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, channel = %channel))]
    pub async fn publish(
        &self,
        token: Option<&str>,
        tenant: &str,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Outcome, PublishError> {
        let result = self.publish_inner(token, tenant, channel, data, idempotency_key).await;
        let label = match &result {
            Ok(o) if o.local_only => "local_only",
            Ok(o) if o.duplicate => "duplicate",
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        self.ctx.metrics.publications.get_or_create(&ResultLabel { result: label }).inc();
        result
    }

    async fn publish_inner(
        &self,
        token: Option<&str>,
        tenant: &str,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Outcome, PublishError> {
        let tenant = TenantId::new(tenant).map_err(|e| PublishError::Invalid(e.to_string()))?;
        self.auth.check(token, &tenant).map_err(|e| match e {
            ServiceAuthError::Unauthenticated => PublishError::Unauthenticated,
            forbidden @ ServiceAuthError::Forbidden(..) => PublishError::Forbidden(forbidden.to_string()),
        })?;
        let channel = Channel::parse(channel).map_err(|e| PublishError::Invalid(e.to_string()))?;
        let ns = self
            .ctx
            .gateway
            .namespace(channel.namespace())
            .ok_or_else(|| PublishError::NotFound(format!("unknown namespace {}", channel.namespace())))?;
        let max = self.ctx.gateway.limits.max_publication_bytes;
        if data.len() > max {
            return Err(PublishError::TooBig(format!("data is {} bytes, the limit is {max}", data.len())));
        }
        check_data(data, max).map_err(PublishError::Invalid)?;
        let idempotency = match idempotency_key.filter(|k| !k.is_empty()) {
            Some(key) => {
                channel::validate_idempotency_key(key).map_err(|e| PublishError::Invalid(e.to_string()))?;
                if key.starts_with(RESERVED_IDEMPOTENCY_PREFIX) {
                    return Err(PublishError::Invalid(format!(
                        "idempotency key uses the reserved prefix {RESERVED_IDEMPOTENCY_PREFIX:?}"
                    )));
                }
                Some((key, IDEMPOTENCY_TTL_S))
            }
            None => None,
        };
        if !self.ctx.publish_limiter.take(&tenant).await {
            self.ctx.metrics.rate_limited.inc();
            return Err(PublishError::RateLimited);
        }
        let history = HistoryOptions { size: ns.history_size, ttl_s: ns.history_ttl_s };
        if self.ctx.hub.redis_outage() {
            // Known down: do not wait for a command timeout.
            return Ok(self.publish_local(&tenant, &channel, data, "redis is down").await);
        }
        match channel::publish(&self.ctx.redis, self.ctx.hub.keys(), &tenant, &channel, history, data, idempotency)
            .await
        {
            Ok(p) => Ok(Outcome { offset: p.offset, epoch: p.epoch, duplicate: p.duplicate, local_only: false }),
            Err(herald_core::Error::InvalidArgument { what, reason }) => {
                Err(PublishError::Invalid(format!("invalid {what}: {reason}")))
            }
            Err(error) => Ok(self.publish_local(&tenant, &channel, data, &error.to_string()).await),
        }
    }

    /// Graceful degradation: this node's sockets still get the publication
    /// (offset 0, not in history).
    async fn publish_local(&self, tenant: &TenantId, channel: &Channel, data: &[u8], error: &str) -> Outcome {
        self.ctx.metrics.publish_errors.inc();
        tracing::warn!(%error, "publish to redis failed; delivering locally only");
        self.ctx.hub.deliver_local(tenant, channel, data).await;
        Outcome { offset: 0, epoch: String::new(), duplicate: false, local_only: true }
    }
}

/// The HTTP body of `POST /v1/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    tenant: String,
    channel: String,
    data: serde_json::Value,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// `POST /v1/publish`: `Authorization: Bearer <service token>`, body
/// `{"tenant","channel","data","idempotency_key"?}` (or an
/// `Idempotency-Key` header).
pub async fn http_publish(State(publisher): State<Publisher>, headers: HeaderMap, body: Bytes) -> Response {
    let token = bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    let body: PublishBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            // An unauthenticated caller learns nothing about the body.
            if token.is_none() {
                return error_response(PublishError::Unauthenticated);
            }
            return error_response(PublishError::Invalid(format!("malformed body: {e}")));
        }
    };
    let header_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let key = body.idempotency_key.as_deref().or(header_key);
    let data = body.data.to_string();
    match publisher.publish(token, &body.tenant, &body.channel, data.as_bytes(), key).await {
        Ok(outcome) if outcome.local_only => (StatusCode::ACCEPTED, Json(outcome)).into_response(),
        Ok(outcome) => (StatusCode::OK, Json(outcome)).into_response(),
        Err(e) => error_response(e),
    }
}

fn error_response(e: PublishError) -> Response {
    (e.http_status(), Json(serde_json::json!({"error": e.to_string()}))).into_response()
}

#[tonic::async_trait]
impl PublisherRpc for Publisher {
    async fn publish(
        &self,
        request: tonic::Request<PublishRequest>,
    ) -> Result<tonic::Response<PublishResponse>, tonic::Status> {
        let token = bearer(request.metadata().get("authorization").and_then(|v| v.to_str().ok())).map(String::from);
        let r = request.into_inner();
        let outcome =
            Publisher::publish(self, token.as_deref(), &r.tenant, &r.channel, &r.data, Some(&r.idempotency_key))
                .await?;
        Ok(tonic::Response::new(PublishResponse {
            offset: outcome.offset,
            epoch: outcome.epoch,
            duplicate: outcome.duplicate,
            local_only: outcome.local_only,
        }))
    }
}
