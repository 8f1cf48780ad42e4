//! The WebSocket gateway: authenticated clients subscribe to channels such
//! as `team:42` of their tenant and receive publications with offsets, can
//! recover what they missed after a reconnect, see presence, and are held to
//! limits. App servers publish through HTTP or gRPC; broadcast publishes row
//! changes of tables with a team column. Fan-out across gateway nodes goes
//! through one Redis subscription per channel per node.
//!
//! The protocol is documented in `docs/gateway-protocol.md`.

pub mod auth;
pub mod conn;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod publish;
pub mod recovery;
pub mod socket;
pub mod stats;
pub mod subscriber;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fred::prelude::*;
use herald_core::config::{Config, GatewayConfig};
use herald_core::keys::KeySpace;
use herald_core::ops_channel::OpsChannel;
use herald_proto::v1::publisher_server::PublisherServer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ServiceAuth, Verifier};
use crate::hub::Hub;
use crate::limits::{Bucket, TenantBucket, TenantLimiter};
use crate::metrics::{Metrics, ResultLabel};
use crate::presence::Presence;
use crate::publish::Publisher;

/// The sockets a gateway serves on.
pub struct Listeners {
    /// WebSocket `/v1/ws` and `POST /v1/publish`.
    pub http: TcpListener,
    /// gRPC `herald.v1.Publisher`; `None` serves no gRPC.
    pub grpc: Option<TcpListener>,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub ops: TcpListener,
}

/// What every connection and handler shares.
pub struct Ctx {
    pub gateway: GatewayConfig,
    pub hub: Arc<Hub>,
    pub verifier: Verifier,
    /// WebSocket clients' connects and subscribes.
    pub tenant_limiter: TenantLimiter,
    /// The publish API's calls.
    pub publish_limiter: TenantLimiter,
    pub presence: Arc<Presence>,
    /// The ops channel, when configured: its namespace is the ops tenant's alone.
    pub ops: Option<OpsChannel>,
    pub metrics: Metrics,
    pub redis: Pool,
    pub shutdown: CancellationToken,
    /// This node's name, the prefix of its client ids.
    pub node: String,
    next_conn: AtomicU64,
    connection_rate: Mutex<Bucket>,
    connection_slots: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl Ctx {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Runs the gateway until `shutdown` fires, then stops accepting, tells every
/// socket to reconnect elsewhere (with jittered advice) and returns once they
/// are closed or `gateway.shutdown_grace_ms` has passed.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> anyhow::Result<()> {
    let env = |name: &str| std::env::var(name).ok();
    let verifier = Verifier::new(&config.gateway, env)?;
    let service_auth = ServiceAuth::new(&config.gateway, env)?;
    let metrics = Metrics::default();
    let (readiness, ops_task) =
        herald_core::ops::start(listeners.ops, |r| metrics.register(r), &config.http, shutdown.clone());
    let ready = readiness.flag("redis");

    let keys = KeySpace::new(&config.env)?;
    let redis = herald_core::redis::build_pool(&config.redis)?;
    let _connections = redis.connect();
    let hub = Arc::new(Hub::new(keys.clone(), metrics.clone()));
    let gateway = config.gateway.clone();
    let limits = &gateway.limits;
    let rate = limits.connections_per_s as f64;
    let ctx = Arc::new(Ctx {
        hub: hub.clone(),
        verifier,
        tenant_limiter: TenantLimiter::new(
            TenantBucket::Clients,
            redis.clone(),
            keys.clone(),
            limits.tenant_ops_per_s,
            metrics.clone(),
            hub.redis_flag(),
        ),
        publish_limiter: TenantLimiter::new(
            TenantBucket::Publish,
            redis.clone(),
            keys.clone(),
            limits.publish_ops_per_s,
            metrics.clone(),
            hub.redis_flag(),
        ),
        presence: Arc::new(Presence::new(redis.clone(), gateway.presence_ttl_ms, hub.redis_flag())),
        ops: OpsChannel::from_config(&gateway),
        metrics: metrics.clone(),
        redis: redis.clone(),
        shutdown: shutdown.clone(),
        node: format!("{:08x}", rand::random::<u32>()),
        next_conn: AtomicU64::new(1),
        connection_rate: Mutex::new(Bucket::new(rate, rate)),
        connection_slots: Arc::new(Semaphore::new(limits.max_connections)),
        tracker: TaskTracker::new(),
        gateway,
    });

    let background = TaskTracker::new();
    background.spawn(subscriber::run(
        hub.clone(),
        config.redis.clone(),
        redis.clone(),
        ready,
        metrics.clone(),
        shutdown.clone(),
    ));
    background.spawn(ctx.presence.clone().heartbeat(shutdown.clone()));
    if let Some(ops) = ctx.ops.clone() {
        let mut stats = stats::StatsMessage::new(ctx.node.clone(), metrics.clone());
        background.spawn(
            ops.publish_every(redis.clone(), keys.clone(), shutdown.clone(), move |elapsed| stats.next(elapsed)),
        );
    }

    let publisher = Publisher::new(ctx.clone(), service_auth);
    let app = router(ctx.clone(), publisher.clone());
    let http_addr = listeners.http.local_addr()?;
    let http = {
        let (shutdown, http_config) = (shutdown.clone(), config.http.clone());
        tokio::spawn(async move { herald_core::serve::serve(listeners.http, app, &http_config, shutdown).await })
    };
    // A publication's data travels as bytes: twice the limit leaves room
    // for the request's other fields, and anything larger is refused from
    // its length prefix, before it is read.
    let decode_limit = ctx.gateway.limits.max_publication_bytes * 2 + 4096;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<PublisherServer<Publisher>>().await;
    // Reflection (v1, and v1alpha for older clients) describes what this port serves.
    let descriptors = herald_proto::service_descriptor_set("herald.v1.Publisher");
    let (reflection_v1, reflection_v1alpha) = herald_core::grpc::reflection(&descriptors)
        .map_err(|e| anyhow::anyhow!("failed to build gRPC reflection: {e}"))?;
    let grpc = listeners.grpc.map(|listener| {
        let shutdown = shutdown.clone();
        tokio::spawn(
            config
                .grpc
                .server()
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(PublisherServer::new(publisher).max_decoding_message_size(decode_limit))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown.cancelled_owned(),
                ),
        )
    });
    tracing::info!(%http_addr, node = %ctx.node, "gateway started");

    shutdown.cancelled().await;
    health_reporter.set_not_serving::<PublisherServer<Publisher>>().await;
    tracing::info!(sockets = ctx.metrics.sockets.get(), "gateway stopping; telling sockets to reconnect");
    ctx.tracker.close();
    let grace = Duration::from_millis(ctx.gateway.shutdown_grace_ms);
    if tokio::time::timeout(grace, ctx.tracker.wait()).await.is_err() {
        tracing::warn!(left = ctx.tracker.len(), "grace period over with sockets still open");
    }
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), background.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    if let Some(grpc) = grpc {
        let _ = tokio::time::timeout(Duration::from_secs(5), grpc).await;
    }
    let _ = redis.quit().await;
    let _ = ops_task.await;
    Ok(())
}

/// `/v1/ws` and `POST /v1/publish`.
pub fn router(ctx: Arc<Ctx>, publisher: Publisher) -> Router {
    let body_limit = ctx.gateway.limits.max_publication_bytes * 2 + 4096;
    Router::new().route("/v1/ws", get(ws_upgrade).with_state(ctx)).route(
        "/v1/publish",
        post(publish::http_publish).with_state(publisher).layer(DefaultBodyLimit::max(body_limit)),
    )
}

/// Accepts an upgrade within the node's limits: connection slots and the
/// rate of new connections.
async fn ws_upgrade(State(ctx): State<Arc<Ctx>>, request: Request) -> Response {
    let upgrade = match socket::Upgrade::from_request(request) {
        Ok(upgrade) => upgrade,
        Err(refused) => return refused.into_response(),
    };
    let refuse = |result: &'static str, status: StatusCode, message: &'static str| {
        ctx.metrics.refused_connections.get_or_create(&ResultLabel { result }).inc();
        (status, message).into_response()
    };
    if ctx.shutdown.is_cancelled() {
        return refuse("shutdown", StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if !ctx.connection_rate.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return refuse("rate", StatusCode::TOO_MANY_REQUESTS, "too many new connections\n");
    }
    let Ok(slot) = ctx.connection_slots.clone().try_acquire_owned() else {
        return refuse("full", StatusCode::SERVICE_UNAVAILABLE, "connection limit reached\n");
    };
    let (response, socket) = upgrade.accept();
    let task_ctx = ctx.clone();
    ctx.tracker.spawn(async move {
        match socket.await {
            Ok((tcp, read)) => conn::serve(tcp, read, task_ctx).await,
            Err(error) => tracing::debug!(%error, "websocket upgrade failed"),
        }
        drop(slot);
    });
    response
}
