//! Herald's tenant-aware cache over gRPC and HTTP: L1 in RAM, L2 in Redis,
//! coherent read-through to Postgres.

pub mod api;
pub mod applier;
pub mod auth;
pub mod cache;
pub mod commands;
pub mod enqueue;
pub mod error;
/// Single-flight per key (shared with near caches: herald-l1).
pub use herald_l1::flight;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod overlay;
pub mod progress;
pub mod quota;
pub mod resource;
pub mod watch;
pub mod write;
pub mod write_metrics;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fred::prelude::*;
use herald_core::backoff::Backoff;
use herald_core::config::Config;
use herald_core::keys::KeySpace;
use herald_core::l1::L1Cache;
use herald_core::l1::subscriber::{self, SubscriberOptions};
use herald_core::ops::{self, Readiness, ReadyFlag};
use herald_proto::v1::cache_server::CacheServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::cache::{Cache, FillHook, Parts};
use crate::metrics::Metrics;
use crate::resource::Resource;

/// How long in-flight requests may take to finish after shutdown.
const GRACE: Duration = Duration::from_secs(10);

/// The three listeners of a cache-api node.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    pub ops: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let bind = |key: &'static str, addr: String| async move {
            TcpListener::bind(&addr).await.with_context(|| format!("failed to bind {key} {addr}"))
        };
        Ok(Self {
            grpc: bind("cache.grpc_addr", config.cache.grpc_addr.clone()).await?,
            http: bind("cache.http_addr", config.cache.http_addr.clone()).await?,
            ops: bind("cache.ops_addr", config.cache.ops_addr.clone()).await?,
        })
    }
}

/// What tests (and embedders) may change.
#[derive(Default, Clone)]
pub struct Options {
    /// Called between each fill's database read and its store.
    pub fill_hook: Option<FillHook>,
    /// This node's name in leases, events and the L1 subscription's client
    /// name; random when unset.
    pub node: Option<String>,
}

/// A node name: `HOSTNAME` (the pod name on Kubernetes) plus a random suffix.
pub fn node_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "cache".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Runs a cache-api node until `shutdown` fires.
pub async fn run(
    config: Config,
    listeners: Listeners,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let keys = KeySpace::new(&config.env)?;
    let node = options.node.clone().unwrap_or_else(node_name);
    let auth = Arc::new(Auth::new(&config.cache.tokens, |v| std::env::var(v).ok())?);
    if config.cache.tokens.is_empty() {
        tracing::warn!("no cache.tokens configured: every request will be refused");
    }
    let metrics = Metrics::default();
    let write_metrics = write_metrics::WriteMetrics::default();
    let l1 = L1Cache::new(&config.l1);
    let (readiness, ops_task) = ops::start(
        listeners.ops,
        |registry| {
            metrics.register(registry);
            write_metrics.register(registry);
            l1.metrics().register(registry);
        },
        &config.http,
        shutdown.clone(),
    );
    let resources_ready = readiness.flag("resources");
    // Bounds every query of this node, resource reads above all.
    let statement_timeout = config.cache.query_timeout_ms.to_string();
    let db = herald_core::pg::pool_with_settings(&config.postgres, &[("statement_timeout", &statement_timeout)])?;
    let Some((resources, commands)) = compile_resources(&config, &db, &shutdown).await? else { return Ok(()) };
    let overlaid = commands.iter().filter_map(|c| c.overlay.as_ref().map(|o| o.resource.clone())).collect();
    resources_ready.set(true);

    let redis = herald_core::redis::build_pool(&config.redis)?;
    let _connections = redis.connect();
    let mut subscription = SubscriberOptions::new(&config.redis, &config.l1, keys.l1_channels(config.redis.partitions));
    subscription.ready = readiness.soft_flag("l1");
    subscription.client_name = format!("herald-cache-api-{node}");
    let subscriber = subscriber::spawn(l1.clone(), subscription, shutdown.clone());

    let cache = Arc::new(Cache::new(Parts {
        keys: keys.clone(),
        l1,
        redis: redis.clone(),
        db: db.clone(),
        resources,
        config: config.cache.clone(),
        metrics,
        redis_up: readiness.soft_flag("redis"),
        hook: options.fill_hook,
        node: node.clone(),
        partitions: config.redis.partitions,
        overlaid,
    }));
    // Until Redis was probed once the cache would take it for down (answer
    // explicit keys "not cached", refuse Sets): serve only after the probe.
    let postgres_up = readiness.soft_flag("postgres");
    probe(&cache, &redis, &db, &postgres_up).await;
    let writer = Arc::new(write::Writer::new(
        commands,
        cache.clone(),
        db.clone(),
        redis.clone(),
        write_metrics,
        config.capture.clone(),
    ));
    let applier = (config.cache.write_behind_writer && writer.has_write_behind()).then(|| {
        let applier = applier::Applier::new(keys.clone(), redis.clone(), db.clone(), writer.clone(), node.clone());
        tokio::spawn(Arc::new(applier).run(shutdown.clone()))
    });
    let progress = tokio::spawn(progress::run(
        cache.l1().clone(),
        redis.clone(),
        keys.node_watermarks(),
        node.clone(),
        shutdown.clone(),
    ));
    let health = tokio::spawn(health_loop(cache.clone(), redis, db, postgres_up, readiness.clone(), shutdown.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CacheServer<grpc::Grpc>>().await;
    // Reflection (v1, and v1alpha for older clients) describes what this port serves.
    let descriptors = herald_proto::service_descriptor_set("herald.v1.Cache");
    let (reflection_v1, reflection_v1alpha) =
        herald_core::grpc::reflection(&descriptors).context("failed to build gRPC reflection")?;
    let limit = config.cache.max_value_bytes + 64 * 1024;
    let service = CacheServer::new(grpc::Grpc::new(cache.clone(), auth.clone(), writer.clone()))
        .max_decoding_message_size(limit)
        // Above the largest answer: one value, or a GetMany at its size limit.
        .max_encoding_message_size(limit.max(config.cache.max_get_many_bytes) + 256 * 1024);
    let grpc_addr = listeners.grpc.local_addr()?;
    let grpc_shutdown = shutdown.clone();
    let grpc_task = tokio::spawn(
        config
            .grpc
            .server()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service)
            .serve_with_incoming_shutdown(
                // Small replies must not wait for Nagle's algorithm.
                tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
                grpc_shutdown.cancelled_owned(),
            ),
    );
    let http_addr = listeners.http.local_addr()?;
    let router = http::router(http::HttpState { cache: cache.clone(), auth, writer }, config.cache.max_value_bytes);
    let http_shutdown = shutdown.clone();
    let http_config = config.http.clone();
    let http_task =
        tokio::spawn(
            async move { herald_core::serve::serve(listeners.http, router, &http_config, http_shutdown).await },
        );
    tracing::info!(%node, %grpc_addr, %http_addr, resources = ?cache.resource_names(), "cache-api started");

    shutdown.cancelled().await;
    health_reporter.set_not_serving::<CacheServer<grpc::Grpc>>().await;
    tracing::info!("cache-api stopping");
    let drained = tokio::time::timeout(GRACE, async {
        let grpc = grpc_task.await;
        let http = http_task.await;
        (grpc, http)
    })
    .await;
    match drained {
        Ok((grpc, http)) => {
            grpc?.context("grpc server failed")?;
            http?.context("http server failed")?;
        }
        Err(_) => tracing::warn!(grace = ?GRACE, "requests still in flight after the grace period"),
    }
    let _ = health.await;
    if let Some(applier) = applier {
        let _ = applier.await;
    }
    let _ = progress.await;
    let _ = subscriber.await;
    let _ = ops_task.await;
    Ok(())
}

/// Checks every resource and command against Postgres, waiting (with backoff) while
/// Postgres is unreachable. A resource that does not check out is a fatal
/// configuration error. `None` when shutdown came first.
async fn compile_resources(
    config: &Config,
    db: &deadpool_postgres::Pool,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(Vec<Resource>, Vec<commands::Command>)>> {
    let mut backoff = Backoff::reconnect();
    loop {
        match db.get().await {
            Ok(client) => {
                let mut resources = Vec::with_capacity(config.cache.resources.len());
                for r in &config.cache.resources {
                    resources.push(Resource::compile(r, &client).await?);
                }
                let mut commands = Vec::with_capacity(config.cache.commands.len());
                for c in &config.cache.commands {
                    commands.push(commands::Command::compile(c, &config.cache.resources, &client).await?);
                }
                return Ok(Some((resources, commands)));
            }
            Err(error) => {
                tracing::warn!(%error, "postgres unreachable, cannot check resources yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Probes Redis and Postgres twice a second; Redis's state switches the
/// cache between normal and degraded operation.
async fn health_loop(
    cache: Arc<Cache>,
    redis: Pool,
    db: deadpool_postgres::Pool,
    postgres: ReadyFlag,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        probe(&cache, &redis, &db, &postgres).await;
        let staleness =
            cache.report_staleness().map_or_else(|| "unknown (no watermark yet)".to_string(), |ms| ms.to_string());
        readiness.set_note("staleness_ms", staleness);
    }
}

/// One health check: Redis switches the cache between normal and degraded
/// operation; Postgres shows in `/readyz`.
async fn probe(cache: &Cache, redis: &Pool, db: &deadpool_postgres::Pool, postgres: &ReadyFlag) {
    let probe = Duration::from_millis(500);
    let redis_ok = matches!(tokio::time::timeout(probe, redis.next().ping::<String>(None)).await, Ok(Ok(_)));
    cache.set_redis_up(redis_ok);
    let pg_ok = matches!(
        tokio::time::timeout(probe, async {
            let client = db.get().await.map_err(|e| e.to_string())?;
            client.simple_query("SELECT 1").await.map_err(|e| e.to_string())
        })
        .await,
        Ok(Ok(_))
    );
    postgres.set(pg_ok);
}
