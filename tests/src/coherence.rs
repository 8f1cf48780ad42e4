//! The coherence checker: writers change rows through Postgres while readers
//! read them through two cache-api processes (by id and by slug, over gRPC
//! and HTTP); every read is checked against the commit history, faults are
//! injected into real processes and connections, and after each phase the
//! system quiesces and every layer is swept for stale values.
//!
//! A read that started at `t0` and returned state `s` is **stale beyond the
//! window** when a state newer than `s` had committed (its COMMIT had
//! returned to the writer) before `t0 - window`. After quiesce, any value
//! that L1 of either node or L2 serves and that differs from Postgres is
//! **stale after quiesce**; that number must be 0.
//!
//! Used by `herald-bench coherence` (long phases, every fault) and by the
//! suite's slim run (a few seconds, steady state plus one fault). With
//! [`Settings::max_staleness`] every read is also judged against that bound
//! ([`bound`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use herald_core::config::{Config, OnStale, ResourceConfig, Shape};
use herald_core::keys::{Scope, TenantId};
use herald_core::time::now_us;
use herald_proto::Message as _;
use herald_proto::v1::cache_client::CacheClient;
use herald_proto::v1::{GetRequest, Layer, ResourceRef, StoredEntry, WatchRequest, get_request};
use rand::Rng;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use herald_client::{NearCache, NearConfig, Target};

use crate::cache_api::{ACME_TOKEN, HttpConn, authed, configure, resource};
use crate::process::ChildService;
use crate::redis_cluster::RedisCluster;
use crate::{Sandbox, Source, assert_eventually, http_get, start_redis};

pub mod bound;

const TENANT: &str = "acme";
const BY_ID: &str = "coh_by_id";
const BY_SLUG: &str = "coh_by_slug";

/// How hard to push.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rows: usize,
    pub writers: usize,
    pub readers: usize,
    /// Reads older than this behind a commit count as stale.
    pub window: Duration,
    /// Every n-th read goes over HTTP, the rest over gRPC.
    pub http_every: u64,
    /// Pause of each writer between writes.
    pub write_pause: Duration,
    /// How long a killed process or server stays down.
    pub down: Duration,
    /// Reads per second over all readers (0: as fast as they can). A steady
    /// state below saturation measures Herald, not the CPU scheduler.
    pub read_rate: u64,
    /// Readers of the near caches (herald-client, one per node, in this
    /// process).
    pub near_readers: usize,
    /// Near-cache reads per second over all near readers (0: as fast as
    /// they can).
    pub near_read_rate: u64,
    /// Capture's source.
    pub source: Source,
    /// Run on a Redis Cluster of its own (3 masters, 3 replicas, 3 log
    /// partitions), which the `redis-failover` phase needs.
    pub cluster: bool,
    /// The freshness bound: the nodes run with `cache.max_staleness_ms`
    /// (bypass) and the near caches with `max_staleness`, and every read is
    /// judged against it ([`bound`]). None: no bound, reads judged by the
    /// window alone.
    pub max_staleness: Option<Duration>,
    /// What the nodes do past the bound (`cache.resources[].on_stale`).
    pub on_stale: OnStale,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            rows: 100,
            writers: 4,
            readers: 16,
            window: Duration::from_millis(50),
            http_every: 4,
            write_pause: Duration::from_millis(5),
            down: Duration::from_secs(1),
            read_rate: 0,
            near_readers: 2,
            near_read_rate: 4_000,
            source: Source::Outbox,
            cluster: false,
            max_staleness: None,
            on_stale: OnStale::Bypass,
        }
    }
}

/// One phase of the fault schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Steady,
    Capture,
    Broadcast,
    CacheApi,
    RedisClients,
    RedisRestart,
    Postgres,
    /// `CLUSTER FAILOVER` of the masters of the tenant's slot and of its log
    /// partition (needs [`Settings::cluster`]).
    Failover,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Steady,
        Fault::Capture,
        Fault::Broadcast,
        Fault::CacheApi,
        Fault::RedisClients,
        Fault::RedisRestart,
        Fault::Postgres,
        Fault::Failover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Steady => "steady",
            Fault::Capture => "capture-killed",
            Fault::Broadcast => "broadcast-killed",
            Fault::CacheApi => "cache-api-killed",
            Fault::RedisClients => "redis-clients-killed",
            Fault::RedisRestart => "redis-restart",
            Fault::Postgres => "postgres-terminated",
            Fault::Failover => "redis-failover",
        }
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Fault::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            format!("unknown phase {s:?} (one of {})", names.join(", "))
        })
    }
}

/// What a read returned, or a row's state: `(id, version)`, or gone.
type State = Option<(i64, i64)>;

/// Each key's states with the time they committed, oldest first.
type Histories = HashMap<Key, Vec<(i64, State)>>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Id(i64),
    Slug(String),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Id(id) => write!(f, "id {id}"),
            Key::Slug(s) => write!(f, "slug {s}"),
        }
    }
}

struct Read {
    key: Key,
    started_us: i64,
    state: State,
    /// Which layer of the node answered (unspecified for near caches).
    layer: Layer,
}

/// The outcome of one phase.
#[derive(Debug, Clone, Default)]
pub struct PhaseReport {
    pub phase: String,
    pub reads: u64,
    pub read_errors: u64,
    pub writes: u64,
    pub write_errors: u64,
    pub stale_beyond_window: u64,
    pub stale_after_quiesce: u64,
    /// Commit → every node applied the invalidation, milliseconds.
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    /// Writes whose invalidation a node's watch did not see (its stream was
    /// down: the node flushed instead).
    pub lag_unobserved: u64,
    /// When stale reads beyond the window started, relative to the fault's
    /// injection, in milliseconds (first, last); None when there were none.
    pub stale_span_ms: Option<(f64, f64)>,
    /// How long the fault lasted (injection to restore), milliseconds.
    pub fault_ms: f64,
    /// Stale reads that started before the fault, between its injection and
    /// 3 s after its restore (recovery), and later.
    pub stale_before: u64,
    pub stale_during: u64,
    pub stale_after: u64,
    /// Of the stale reads, the oldest superseding commit, in milliseconds
    /// before the read started (compare with the slowest invalidation).
    pub stale_oldest_ms: f64,
    /// Where the time went: writer statement → stream append (capture) and
    /// → L1 invalidation published (broadcast), from their histograms.
    pub pipeline: String,
    /// A few stale reads, explained.
    pub examples: Vec<String>,
    /// The same for reads of the near caches (herald-client).
    pub near_reads: u64,
    pub near_read_errors: u64,
    pub near_stale_beyond_window: u64,
    pub near_stale_during: u64,
    pub near_stale_after_quiesce: u64,
    /// With [`Settings::max_staleness`]: the reads judged against it.
    pub bound: Option<bound::BoundReport>,
}

struct Node {
    config: Config,
    service: Option<ChildService>,
    grpc: SocketAddr,
    http: SocketAddr,
    ops: SocketAddr,
}

impl Node {
    async fn ready(&self) -> bool {
        let r = http_get(self.ops, "/readyz").await;
        r.contains("l1: ok") && r.contains("redis: ok")
    }
}

/// Everything the checker runs: its own Redis server, a sandbox database,
/// capture, broadcast and two cache-api nodes as processes.
pub struct World {
    pub sb: Sandbox,
    settings: Settings,
    redis_port: u16,
    redis: Option<Child>,
    /// The World's own Redis Cluster ([`Settings::cluster`]).
    cluster: Option<RedisCluster>,
    capture: Option<ChildService>,
    broadcast: Option<ChildService>,
    nodes: Vec<Node>,
    /// One near cache per node, watching it.
    near: Vec<NearCache>,
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

fn row_resource(name: &str, filter: &str, param: &str, tags: &[&str]) -> ResourceConfig {
    let sql = format!("SELECT id, website_slug, version FROM res_users WHERE tenant_id = $tenant AND {filter} = $1");
    resource(name, &sql, &[param], Shape::Row, tags)
}

fn slug_of(id: i64, renamed: bool) -> String {
    if renamed { format!("s{id}x") } else { format!("s{id}") }
}

impl World {
    /// Starts everything and seeds `settings.rows` rows.
    pub async fn start(settings: Settings) -> Self {
        let redis_port = free_addr().port();
        let redis = start_redis(redis_port);
        assert_eventually!(
            10,
            async { tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await.is_ok() },
            "redis did not start"
        );
        let cluster = settings.cluster.then(|| RedisCluster::start(3));
        let cluster_url = cluster.as_ref().map(RedisCluster::url);
        let sb = Sandbox::start_source(settings.source, |c| {
            configure(c);
            // On a cluster (`make test-cluster`, or the World's own) the
            // cluster serves; the Redis faults of the full benchmark need the
            // own server.
            if let Some(url) = cluster_url {
                crate::cluster_settings(c, url);
            } else if !crate::on_cluster() {
                c.redis.url = format!("redis://127.0.0.1:{redis_port}");
            }
            c.redis.command_timeout_ms = 1_000;
            // WAIT (on a cluster) must end before the command times out.
            c.capture.wait_timeout_ms = 500;
            c.broadcast.wait_timeout_ms = 500;
            c.broadcast.claim_idle_ms = 1_000;
            c.broadcast.heartbeat_ms = 200;
            c.l1.heartbeat_timeout_ms = 1_000;
            c.capture.ops_addr = free_addr().to_string();
            c.broadcast.ops_addr = free_addr().to_string();
            c.cache.max_staleness_ms = settings.max_staleness.map(|b| b.as_millis() as u64);
            c.cache.resources.push(row_resource(BY_ID, "id", "id", &["res_users.id=$1"]));
            c.cache.resources.push(row_resource(
                BY_SLUG,
                "website_slug",
                "slug",
                &["res_users.website_slug=$1", "res_users.id={id}"],
            ));
            for r in c.cache.resources.iter_mut().filter(|r| [BY_ID, BY_SLUG].contains(&r.name.as_str())) {
                r.on_stale = settings.on_stale;
            }
        })
        .await;
        sb.sql("CREATE SEQUENCE herald_reads").await;
        sb.sql("ALTER TABLE res_users ADD COLUMN version bigint NOT NULL DEFAULT 1").await;
        sb.sql(&format!(
            "INSERT INTO res_users (id, tenant_id, website_slug, name, version) \
             SELECT i, '{TENANT}', 's' || i, 'v1', 1 FROM generate_series(1, {}) i",
            settings.rows
        ))
        .await;
        let mut world = Self {
            sb,
            settings,
            redis_port,
            redis: Some(redis),
            cluster,
            capture: None,
            broadcast: None,
            nodes: Vec::new(),
            near: Vec::new(),
        };
        world.capture = Some(ChildService::spawn("herald-capture", &world.sb.config));
        world.broadcast = Some(ChildService::spawn("herald-broadcast", &world.sb.config));
        for _ in 0..2 {
            let mut config = world.sb.config.clone();
            let (grpc, http, ops) = (free_addr(), free_addr(), free_addr());
            config.cache.grpc_addr = grpc.to_string();
            config.cache.http_addr = http.to_string();
            config.cache.ops_addr = ops.to_string();
            let service = Some(ChildService::spawn("herald-cache-api", &config));
            world.nodes.push(Node { config, service, grpc, http, ops });
        }
        world.wait_ready().await;
        for node in &world.nodes {
            let mut config = NearConfig::new(format!("http://{}", node.grpc), ACME_TOKEN, &[TENANT]);
            config.heartbeat_timeout = Duration::from_millis(1_500);
            config.backoff = (Duration::from_millis(20), Duration::from_millis(500));
            config.max_staleness = world.settings.max_staleness;
            world.near.push(NearCache::connect(config).expect("near cache"));
        }
        world.wait_ready().await;
        world
    }

    async fn wait_ready(&mut self) {
        for i in 0..self.nodes.len() {
            assert_eventually!(
                30,
                async {
                    self.assert_running();
                    self.nodes[i].ready().await
                },
                "a cache-api node did not become ready"
            );
        }
        for near in &self.near {
            assert!(near.wait_live(Duration::from_secs(30)).await, "a near cache did not become live");
        }
    }

    /// Panics if a service process has exited: one that refused its
    /// configuration would never become ready (its stderr says why).
    fn assert_running(&mut self) {
        let nodes = self.nodes.iter_mut().filter_map(|n| n.service.as_mut());
        for service in nodes.chain(&mut self.capture).chain(&mut self.broadcast) {
            if let Some(status) = service.exited() {
                panic!("a service process exited while starting ({status}); see its stderr above");
            }
        }
    }

    /// Runs one phase for `duration` (the fault a third of the way in), then
    /// quiesces and sweeps.
    pub async fn run_phase(&mut self, fault: Fault, duration: Duration) -> PhaseReport {
        let stop = CancellationToken::new();
        let histories = Arc::new(Mutex::new(self.initial_histories().await));
        let commits = Arc::new(Mutex::new(HashMap::<i64, i64>::new()));
        let received = Arc::new(Mutex::new(vec![HashMap::<i64, i64>::new(); self.nodes.len()]));
        let stats = Arc::new(Mutex::new(PhaseReport { phase: fault.name().into(), ..Default::default() }));

        let mut watchers = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            watchers.push(tokio::spawn(watch(node.grpc, i, received.clone(), stop.clone())));
        }
        let mut writers = Vec::new();
        for w in 0..self.settings.writers {
            writers.push(tokio::spawn(write_loop(
                self.sb.pool.clone(),
                w,
                self.settings.clone(),
                histories.clone(),
                commits.clone(),
                stats.clone(),
                stop.clone(),
            )));
        }
        let reader_stop = CancellationToken::new();
        let mut readers: Vec<JoinHandle<Vec<Read>>> = Vec::new();
        let targets: Vec<(SocketAddr, SocketAddr)> = self.nodes.iter().map(|n| (n.grpc, n.http)).collect();
        for r in 0..self.settings.readers {
            readers.push(tokio::spawn(read_loop(
                targets.clone(),
                r,
                self.settings.clone(),
                stats.clone(),
                reader_stop.clone(),
            )));
        }
        let mut near_readers: Vec<JoinHandle<(Vec<Read>, u64)>> = Vec::new();
        for _ in 0..self.settings.near_readers {
            let (near, settings, stop) = (self.near.clone(), self.settings.clone(), reader_stop.clone());
            near_readers.push(tokio::spawn(near_read_loop(near, settings, stop)));
        }

        let ops: Vec<SocketAddr> = self.nodes.iter().map(|n| n.ops).collect();
        let counters_before = bound::Snapshot::take(&ops, &self.near).await;
        let capture_before =
            histogram(self.sb.config.capture.ops_addr.parse().expect("addr"), "herald_capture_lag_seconds").await;
        let broadcast_before =
            histogram(self.sb.config.broadcast.ops_addr.parse().expect("addr"), "herald_broadcast_lag_seconds").await;
        tokio::time::sleep(duration / 3).await;
        let fault_at = now_us();
        self.inject(fault).await;
        let fault_ms = (now_us() - fault_at) as f64 / 1000.0;
        let rest = duration.saturating_sub(duration / 3);
        tokio::time::sleep(rest.saturating_sub(self.settings.down)).await;

        stop.cancel();
        for w in writers {
            let _ = w.await;
        }
        reader_stop.cancel();
        let mut reads = Vec::new();
        for r in readers {
            reads.extend(r.await.unwrap_or_default());
        }
        let (mut near_reads, mut near_errors) = (Vec::new(), 0);
        for r in near_readers {
            let (reads, errors) = r.await.unwrap_or_default();
            near_reads.extend(reads);
            near_errors += errors;
        }
        let capture_after =
            histogram(self.sb.config.capture.ops_addr.parse().expect("addr"), "herald_capture_lag_seconds").await;
        let broadcast_after =
            histogram(self.sb.config.broadcast.ops_addr.parse().expect("addr"), "herald_broadcast_lag_seconds").await;
        let counters_after = bound::Snapshot::take(&ops, &self.near).await;
        self.quiesce().await;
        for w in watchers {
            let _ = w.await;
        }

        let mut report = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        {
            let histories = histories.lock().unwrap_or_else(|p| p.into_inner());
            report.fault_ms = fault_ms;
            check_reads(&reads, &histories, self.settings.window, fault_at, &mut report);
            let mut near = PhaseReport::default();
            check_reads(&near_reads, &histories, self.settings.window, fault_at, &mut near);
            report.near_reads = near_reads.len() as u64;
            report.near_read_errors = near_errors;
            report.near_stale_beyond_window = near.stale_beyond_window;
            report.near_stale_during = near.stale_during;
            report.examples.extend(near.examples.into_iter().take(3).map(|e| format!("near cache: {e}")));
            if let Some(max) = self.settings.max_staleness {
                let limit = max + self.settings.window;
                let mut judged = bound::BoundReport::default();
                let mut examples = Vec::new();
                (judged.stale_beyond_bound, judged.stale_oldest_ms) =
                    bound::beyond(&reads, &histories, limit, &mut examples);
                let (near_stale, near_oldest) = bound::beyond(&near_reads, &histories, limit, &mut examples);
                judged.near_stale_beyond_bound = near_stale;
                judged.stale_oldest_ms = judged.stale_oldest_ms.max(near_oldest);
                (judged.reads_cached, judged.reads_database) = bound::layers(&reads);
                counters_before.since(&counters_after, &mut judged);
                // The bound's breaches first: they are what the run is for.
                examples.append(&mut report.examples);
                report.examples = examples;
                report.bound = Some(judged);
            }
            let commits = commits.lock().unwrap_or_else(|p| p.into_inner());
            let received = received.lock().unwrap_or_else(|p| p.into_inner());
            lags(&commits, &received, &mut report);
        }
        report.pipeline = format!(
            "statement → appended {}; → published {} (a process restarted in the phase loses its histogram)",
            quantiles(&capture_before, &capture_after),
            quantiles(&broadcast_before, &broadcast_after)
        );
        report.stale_after_quiesce = self.sweep(&mut report.examples).await;
        report.near_stale_after_quiesce = self.sweep_near(&mut report.examples).await;
        report
    }

    /// After quiesce: every value each near cache serves (read twice: the
    /// first may fill it), compared with Postgres.
    async fn sweep_near(&self, examples: &mut Vec<String>) -> u64 {
        let truth = self.truth().await;
        let mut stale = 0;
        for id in 1..=self.settings.rows as i64 {
            let row = truth.get(&id);
            let mut keys = vec![(Key::Id(id), row.map(|(_, v)| (id, *v)))];
            for renamed in [false, true] {
                let slug = slug_of(id, renamed);
                keys.push((Key::Slug(slug.clone()), row.filter(|(s, _)| *s == slug).map(|(_, v)| (id, *v))));
            }
            for (key, expected) in keys {
                for near in &self.near {
                    for _ in 0..2 {
                        match near_read(near, &key).await {
                            Ok(state) if state == expected => {}
                            Ok(state) => {
                                stale += 1;
                                note(
                                    examples,
                                    format!(
                                        "after quiesce a near cache served {state:?} for {key}, postgres has {expected:?}"
                                    ),
                                );
                            }
                            Err(e) => note(examples, format!("after quiesce near cache {key}: read failed: {e}")),
                        }
                    }
                }
            }
        }
        stale
    }

    /// Every key's state now, as the start of its history.
    async fn initial_histories(&self) -> Histories {
        let truth = self.truth().await;
        let mut histories = HashMap::new();
        for id in 1..=self.settings.rows as i64 {
            let row = truth.get(&id);
            histories.insert(Key::Id(id), vec![(0, row.map(|(_, v)| (id, *v)))]);
            for renamed in [false, true] {
                let slug = slug_of(id, renamed);
                let state = row.filter(|(s, _)| *s == slug).map(|(_, v)| (id, *v));
                histories.insert(Key::Slug(slug), vec![(0, state)]);
            }
        }
        histories
    }

    /// id → (slug, version) in Postgres.
    async fn truth(&self) -> HashMap<i64, (String, i64)> {
        let client = self.sb.pool.get().await.expect("postgres");
        let rows = client
            .query("SELECT id, website_slug, version FROM res_users WHERE tenant_id = $1", &[&TENANT])
            .await
            .expect("truth");
        rows.iter().map(|r| (r.get::<_, i64>(0), (r.get::<_, String>(1), r.get::<_, i64>(2)))).collect()
    }

    async fn inject(&mut self, fault: Fault) {
        let down = self.settings.down;
        match fault {
            Fault::Steady => tokio::time::sleep(down).await,
            Fault::Capture => {
                if let Some(c) = self.capture.take() {
                    c.kill().await;
                }
                tokio::time::sleep(down).await;
                self.capture = Some(ChildService::spawn("herald-capture", &self.sb.config));
            }
            Fault::Broadcast => {
                if let Some(b) = self.broadcast.take() {
                    b.kill().await;
                }
                tokio::time::sleep(down).await;
                self.broadcast = Some(ChildService::spawn("herald-broadcast", &self.sb.config));
            }
            Fault::CacheApi => {
                let node = &mut self.nodes[1];
                if let Some(s) = node.service.take() {
                    s.kill().await;
                }
                tokio::time::sleep(down).await;
                node.service = Some(ChildService::spawn("herald-cache-api", &node.config));
            }
            Fault::RedisClients => {
                let admin = herald_core::redis::connect_pool(&self.sb.config.redis).await.expect("redis");
                let client = admin.next();
                for kind in ["pubsub", "normal"] {
                    // Killing "normal" ends this connection too.
                    let _: Result<Value, _> = client.custom(fred::cmd!("CLIENT"), vec!["KILL", "TYPE", kind]).await;
                }
                let _ = admin.quit().await;
                tokio::time::sleep(down).await;
            }
            Fault::RedisRestart => {
                if let Some(mut r) = self.redis.take() {
                    let _ = r.kill().await;
                }
                tokio::time::sleep(down).await;
                self.redis = Some(start_redis(self.redis_port));
            }
            Fault::Failover => {
                let cluster =
                    self.cluster.as_ref().expect("the redis-failover phase needs a cluster of the World's own");
                let tenant = Scope::Tenant(TenantId::new(TENANT).expect("tenant"));
                let entry = self.sb.keys.entry(&tenant, BY_ID, "1").expect("key");
                let partitions = self.sb.config.redis.partitions;
                let stream =
                    self.sb.keys.stream_partition(herald_core::keys::partition_of(TENANT, partitions), partitions);
                let mut masters: Vec<u16> =
                    [&entry, &stream].map(|key| cluster.master_of(herald_core::keys::slot(key))).to_vec();
                masters.dedup();
                // The cluster tools block: keep the readers and writers running.
                tokio::task::block_in_place(|| {
                    for master in masters {
                        let replica = cluster.replica_of(master);
                        cluster.failover(replica);
                        cluster.wait_master(replica);
                    }
                });
                tokio::time::sleep(down).await;
            }
            Fault::Postgres => {
                let (client, connection) =
                    tokio_postgres::connect(&self.sb.admin, tokio_postgres::NoTls).await.expect("admin");
                tokio::spawn(connection);
                client
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                        &[&self.sb.db_name],
                    )
                    .await
                    .expect("terminate");
                tokio::time::sleep(down).await;
            }
        }
    }

    /// Waits until every committed change has gone through: the outbox is
    /// empty and the slot (WAL source) has confirmed the WAL written so far,
    /// broadcast has acknowledged the whole stream, and both nodes are live
    /// again; then gives pub/sub a moment.
    async fn quiesce(&mut self) {
        let mut target = None;
        assert_eventually!(
            60,
            async {
                let Ok(c) = self.sb.pool.get().await else { return false };
                if target.is_none() {
                    target =
                        c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.ok().map(|r| r.get::<_, String>(0));
                }
                c.query_one(
                    "SELECT (SELECT count(*) FROM herald.outbox) = 0 AND coalesce((SELECT confirmed_flush_lsn >= \
                     $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2), true)",
                    &[&target.clone().unwrap_or_else(|| "0/0".into()), &self.sb.config.capture.slot],
                )
                .await
                .is_ok_and(|r| r.get::<_, bool>(0))
                    && target.is_some()
            },
            "capture never caught up"
        );
        assert_eventually!(60, async { self.sb.log_acknowledged().await }, "broadcast never caught up");
        self.wait_ready().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// After quiesce: every value L1 of each node or L2 serves, compared
    /// with Postgres. Returns how many differ.
    async fn sweep(&self, examples: &mut Vec<String>) -> u64 {
        let truth = self.truth().await;
        let mut stale = 0;
        let tenant = Scope::Tenant(TenantId::new(TENANT).expect("tenant"));
        for id in 1..=self.settings.rows as i64 {
            let row = truth.get(&id);
            let mut keys = vec![(Key::Id(id), row.map(|(_, v)| (id, *v)))];
            for renamed in [false, true] {
                let slug = slug_of(id, renamed);
                let state = row.filter(|(s, _)| *s == slug).map(|(_, v)| (id, *v));
                keys.push((Key::Slug(slug), state));
            }
            for (key, expected) in keys {
                for node in &self.nodes {
                    // Twice: the first may fill L1, the second reads it.
                    for _ in 0..2 {
                        match grpc_read(node.grpc, &key).await {
                            Ok(state) if state == expected => {}
                            Ok(state) => {
                                stale += 1;
                                note(
                                    examples,
                                    format!("after quiesce {key} served {state:?}, postgres has {expected:?}"),
                                );
                            }
                            Err(e) => note(examples, format!("after quiesce {key}: read failed: {e}")),
                        }
                    }
                }
                let (resource, part) = match &key {
                    Key::Id(id) => (BY_ID, id.to_string()),
                    Key::Slug(s) => (BY_SLUG, s.clone()),
                };
                let entry = self.sb.keys.entry(&tenant, resource, &format!("p:{part}")).expect("key");
                if let Ok(Some(bytes)) = self.sb.redis.next().get::<Option<Bytes>, _>(&entry).await {
                    let state = StoredEntry::decode(bytes).ok().map(|e| parse_state(e.found, &e.value));
                    if state != Some(expected) {
                        stale += 1;
                        note(
                            examples,
                            format!("after quiesce L2 holds {state:?} for {key}, postgres has {expected:?}"),
                        );
                    }
                }
            }
        }
        stale
    }

    /// Stops every process and removes the sandbox.
    pub async fn stop(mut self) {
        for near in &self.near {
            near.close();
        }
        for node in &mut self.nodes {
            if let Some(s) = node.service.take() {
                s.kill().await;
            }
        }
        if let Some(c) = self.capture.take() {
            c.kill().await;
        }
        if let Some(b) = self.broadcast.take() {
            b.kill().await;
        }
        self.sb.cleanup().await;
        if let Some(mut r) = self.redis.take() {
            let _ = r.kill().await;
        }
    }
}

fn note(examples: &mut Vec<String>, line: String) {
    if examples.len() < 10 {
        examples.push(line);
    }
}

fn parse_state(found: bool, value: &[u8]) -> State {
    if !found {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    Some((v["id"].as_i64()?, v["version"].as_i64()?))
}

fn request(key: &Key) -> GetRequest {
    let (resource, param) = match key {
        Key::Id(id) => (BY_ID, id.to_string()),
        Key::Slug(s) => (BY_SLUG, s.clone()),
    };
    GetRequest {
        tenant: TENANT.into(),
        target: Some(get_request::Target::Resource(ResourceRef { resource: resource.into(), params: vec![param] })),
        min_commit_lsn: 0,
    }
}

async fn client(addr: SocketAddr) -> anyhow::Result<CacheClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    Ok(CacheClient::new(channel))
}

/// What a read through a node returned, and which layer answered.
type Answered = (State, Layer);

async fn grpc_read(addr: SocketAddr, key: &Key) -> anyhow::Result<State> {
    let answer = client(addr).await?.get(authed(request(key), ACME_TOKEN)).await?.into_inner();
    Ok(parse_state(answer.found, &answer.value))
}

async fn http_read(slot: &mut Option<HttpConn>, addr: SocketAddr, key: &Key) -> anyhow::Result<Answered> {
    let path = match key {
        Key::Id(id) => format!("/v1/t/{TENANT}/r/{BY_ID}?id={id}"),
        Key::Slug(s) => format!("/v1/t/{TENANT}/r/{BY_SLUG}?slug={s}"),
    };
    if slot.is_none() {
        *slot = Some(HttpConn::connect(addr).await?);
    }
    let conn = slot.as_mut().expect("connection");
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), conn.get(&path, ACME_TOKEN)).await??;
    anyhow::ensure!(status == 200, "http {status}: {}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let value = serde_json::to_vec(&v["value"])?;
    let layer = match v["layer"].as_str() {
        Some("l1") => Layer::L1,
        Some("l2") => Layer::L2,
        Some("database") => Layer::Database,
        _ => Layer::Unspecified,
    };
    Ok((parse_state(v["found"].as_bool().unwrap_or(false), &value), layer))
}

async fn read_loop(
    targets: Vec<(SocketAddr, SocketAddr)>,
    reader: usize,
    settings: Settings,
    stats: Arc<Mutex<PhaseReport>>,
    stop: CancellationToken,
) -> Vec<Read> {
    let mut clients: Vec<Option<CacheClient<Channel>>> = vec![None; targets.len()];
    let mut https: Vec<Option<HttpConn>> = targets.iter().map(|_| None).collect();
    let mut reads = Vec::new();
    let mut errors = 0u64;
    let mut n = reader as u64;
    let mut pace = (settings.read_rate > 0).then(|| {
        let period = Duration::from_secs_f64(settings.readers as f64 / settings.read_rate as f64);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    while !stop.is_cancelled() {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        n += 1;
        let (id, node, by_slug, renamed) = {
            let mut rng = rand::rng();
            (
                rng.random_range(1..=settings.rows as i64),
                rng.random_range(0..targets.len()),
                rng.random_bool(0.5),
                rng.random_bool(0.5),
            )
        };
        let key = if by_slug { Key::Slug(slug_of(id, renamed)) } else { Key::Id(id) };
        let started_us = now_us();
        let result = if n.is_multiple_of(settings.http_every) {
            http_read(&mut https[node], targets[node].1, &key).await
        } else {
            grpc_on(&mut clients[node], targets[node].0, &key).await
        };
        match result {
            Ok((state, layer)) => reads.push(Read { key, started_us, state, layer }),
            Err(_) => {
                errors += 1;
                clients[node] = None;
                https[node] = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    s.reads += reads.len() as u64;
    s.read_errors += errors;
    reads
}

fn near_target(key: &Key) -> Target {
    match key {
        Key::Id(id) => Target::resource(BY_ID, &[&id.to_string()]),
        Key::Slug(s) => Target::resource(BY_SLUG, &[s]),
    }
}

async fn near_read(near: &NearCache, key: &Key) -> anyhow::Result<State> {
    let value = near.get(TENANT, &near_target(key)).await?;
    Ok(value.and_then(|v| parse_state(true, &v)))
}

/// Reads of the near caches at `settings.near_read_rate` (in bursts every
/// millisecond: the timer's resolution). Returns the reads and the errors.
async fn near_read_loop(near: Vec<NearCache>, settings: Settings, stop: CancellationToken) -> (Vec<Read>, u64) {
    let per_ms = (settings.near_read_rate as f64 / 1000.0 / settings.near_readers.max(1) as f64).ceil() as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut reads, mut errors) = (Vec::new(), 0u64);
    while !stop.is_cancelled() {
        if settings.near_read_rate > 0 {
            tick.tick().await;
        }
        for _ in 0..per_ms.max(1) {
            let (id, cache, by_slug, renamed) = {
                let mut rng = rand::rng();
                (
                    rng.random_range(1..=settings.rows as i64),
                    rng.random_range(0..near.len()),
                    rng.random_bool(0.5),
                    rng.random_bool(0.5),
                )
            };
            let key = if by_slug { Key::Slug(slug_of(id, renamed)) } else { Key::Id(id) };
            let started_us = now_us();
            match tokio::time::timeout(Duration::from_secs(5), near_read(&near[cache], &key)).await {
                Ok(Ok(state)) => reads.push(Read { key, started_us, state, layer: Layer::Unspecified }),
                _ => {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if settings.near_read_rate == 0 {
            tokio::task::yield_now().await;
        }
    }
    (reads, errors)
}

async fn grpc_on(slot: &mut Option<CacheClient<Channel>>, addr: SocketAddr, key: &Key) -> anyhow::Result<Answered> {
    if slot.is_none() {
        *slot = Some(client(addr).await?);
    }
    let c = slot.as_mut().expect("client");
    let answer = tokio::time::timeout(Duration::from_secs(5), c.get(authed(request(key), ACME_TOKEN))).await??;
    let answer = answer.into_inner();
    Ok((parse_state(answer.found, &answer.value), answer.layer()))
}

#[derive(Clone)]
struct RowState {
    exists: bool,
    renamed: bool,
    version: i64,
}

/// Records a row's change at `t` in the id and slug histories.
fn record(histories: &Mutex<Histories>, id: i64, before: &RowState, after: &RowState, t: i64) {
    let mut h = histories.lock().unwrap_or_else(|p| p.into_inner());
    let state = after.exists.then_some((id, after.version));
    h.entry(Key::Id(id)).or_default().push((t, state));
    if before.exists && (!after.exists || before.renamed != after.renamed) {
        h.entry(Key::Slug(slug_of(id, before.renamed))).or_default().push((t, None));
    }
    if after.exists {
        h.entry(Key::Slug(slug_of(id, after.renamed))).or_default().push((t, state));
    }
}

async fn actual(pool: &deadpool_postgres::Pool, id: i64) -> anyhow::Result<RowState> {
    let client = pool.get().await?;
    let row = client.query_opt("SELECT website_slug, version FROM res_users WHERE id = $1", &[&id]).await?;
    Ok(match row {
        Some(r) => RowState { exists: true, renamed: r.get::<_, String>(0).ends_with('x'), version: r.get(1) },
        None => RowState { exists: false, renamed: false, version: 0 },
    })
}

async fn write_loop(
    pool: deadpool_postgres::Pool,
    writer: usize,
    settings: Settings,
    histories: Arc<Mutex<Histories>>,
    commits: Arc<Mutex<HashMap<i64, i64>>>,
    stats: Arc<Mutex<PhaseReport>>,
    stop: CancellationToken,
) {
    let mine: Vec<i64> =
        (1..=settings.rows as i64).filter(|id| (*id as usize - 1) % settings.writers == writer).collect();
    if mine.is_empty() {
        return;
    }
    let mut rows: HashMap<i64, Option<RowState>> = mine.iter().map(|id| (*id, None)).collect();
    // Highest version each row had, so versions never repeat across a
    // delete and re-insert.
    let mut high: HashMap<i64, i64> = HashMap::new();
    let (mut writes, mut errors) = (0u64, 0u64);
    while !stop.is_cancelled() {
        tokio::time::sleep(settings.write_pause).await;
        let (id, dice) = {
            let mut rng = rand::rng();
            (mine[rng.random_range(0..mine.len())], rng.random_range(0..100))
        };
        // A row whose last write failed is read back first: that write may
        // have committed.
        let before = match rows[&id].clone() {
            Some(state) => state,
            None => match actual(&pool, id).await {
                Ok(state) => {
                    rows.insert(id, Some(state.clone()));
                    state
                }
                Err(_) => continue,
            },
        };
        let version = before.version.max(high.get(&id).copied().unwrap_or(0)) + 1;
        high.insert(id, version);
        let name = format!("v{version}");
        let (after, slug) = if !before.exists {
            (RowState { exists: true, renamed: false, version }, slug_of(id, false))
        } else if dice < 80 {
            (RowState { version, ..before.clone() }, slug_of(id, before.renamed))
        } else if dice < 92 {
            (RowState { exists: true, renamed: !before.renamed, version }, slug_of(id, !before.renamed))
        } else {
            (RowState { exists: false, renamed: false, version }, String::new())
        };
        let result = async {
            let client = pool.get().await?;
            let row = if !before.exists {
                client.query_one(
                    "INSERT INTO res_users (id, tenant_id, website_slug, name, version) VALUES ($1, 'acme', $2, $3, $4) \
                     RETURNING pg_current_xact_id()::text::bigint",
                    &[&id, &slug, &name, &version],
                )
                .await?
            } else if after.exists {
                client.query_one(
                    "UPDATE res_users SET website_slug = $2, name = $3, version = $4 WHERE id = $1 \
                     RETURNING pg_current_xact_id()::text::bigint",
                    &[&id, &slug, &name, &version],
                )
                .await?
            } else {
                client.query_one("DELETE FROM res_users WHERE id = $1 RETURNING pg_current_xact_id()::text::bigint", &[&id]).await?
            };
            anyhow::Ok(row.get::<_, i64>(0))
        }
        .await;
        match result {
            Ok(txid) => {
                let t = now_us();
                record(&histories, id, &before, &after, t);
                commits.lock().unwrap_or_else(|p| p.into_inner()).insert(txid, t);
                rows.insert(id, Some(after));
                writes += 1;
            }
            Err(_) => {
                errors += 1;
                // Unknown outcome: find out, and record any change now (a
                // later time than the real commit only makes the check more
                // lenient, never wrong).
                rows.insert(id, None);
                if let Ok(now) = actual(&pool, id).await {
                    if now.exists != before.exists || now.version != before.version || now.renamed != before.renamed {
                        record(&histories, id, &before, &now, now_us());
                    }
                    rows.insert(id, Some(now));
                }
            }
        }
    }
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    s.writes += writes;
    s.write_errors += errors;
}

/// Records when node `index` applied each transaction's invalidation.
async fn watch(addr: SocketAddr, index: usize, received: Arc<Mutex<Vec<HashMap<i64, i64>>>>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let stream = async {
            let mut c = client(addr).await?;
            let req = WatchRequest {
                tenant: TENANT.into(),
                tables: vec!["res_users".into()],
                tags: vec![],
                ..Default::default()
            };
            anyhow::Ok(c.watch_invalidations(authed(req, ACME_TOKEN)).await?.into_inner())
        };
        let mut stream = match stream.await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                message = stream.message() => match message {
                    Ok(Some(event)) => {
                        let t = now_us();
                        let mut r = received.lock().unwrap_or_else(|p| p.into_inner());
                        r[index].entry(event.txid as i64).or_insert(t);
                    }
                    _ => break,
                },
            }
        }
    }
}

/// Classifies every read against the histories.
fn check_reads(reads: &[Read], histories: &Histories, window: Duration, fault_at: i64, report: &mut PhaseReport) {
    let window_us = window.as_micros() as i64;
    for read in reads {
        let Some(history) = histories.get(&read.key) else { continue };
        // The newest state that had committed by `started - window`...
        let k = history.iter().rposition(|(t, _)| *t <= read.started_us - window_us).unwrap_or(0);
        // ...and the newest moment the returned state was current.
        let j = history.iter().rposition(|(_, s)| *s == read.state);
        let stale = j.is_none_or(|j| j < k);
        if stale {
            let superseded_at = j.map_or(history[0].0, |j| history[j + 1].0);
            report.stale_oldest_ms = report.stale_oldest_ms.max((read.started_us - superseded_at) as f64 / 1000.0);
            report.stale_beyond_window += 1;
            let at = (read.started_us - fault_at) as f64 / 1000.0;
            if at < 0.0 {
                report.stale_before += 1;
            } else if at <= report.fault_ms + 3_000.0 {
                report.stale_during += 1;
            } else {
                report.stale_after += 1;
            }
            report.stale_span_ms = Some(match report.stale_span_ms {
                None => (at, at),
                Some((first, last)) => (first.min(at), last.max(at)),
            });
            let (t_newer, newer) = &history[k];
            note(
                &mut report.examples,
                format!(
                    "read of {} returned {:?}; {:?} had committed {:.1} ms before the read started",
                    read.key,
                    read.state,
                    newer,
                    (read.started_us - t_newer) as f64 / 1000.0
                ),
            );
        }
    }
}

/// Commit → the last node applied it, per write that every node saw.
fn lags(commits: &HashMap<i64, i64>, received: &[HashMap<i64, i64>], report: &mut PhaseReport) {
    let mut lags: Vec<i64> = Vec::new();
    for (txid, committed) in commits {
        let seen: Vec<i64> = received.iter().filter_map(|r| r.get(txid).copied()).collect();
        if seen.len() == received.len() {
            lags.push(seen.into_iter().max().unwrap_or(*committed).saturating_sub(*committed).max(0));
        } else {
            report.lag_unobserved += 1;
        }
    }
    lags.sort_unstable();
    let q = |p: f64| {
        if lags.is_empty() { 0.0 } else { lags[((lags.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0 }
    };
    report.lag_p50_ms = q(0.50);
    report.lag_p99_ms = q(0.99);
    report.lag_max_ms = q(1.0);
}

/// A Prometheus histogram's cumulative buckets (upper bound → count).
async fn histogram(addr: SocketAddr, name: &str) -> Vec<(f64, f64)> {
    let text = http_get(addr, "/metrics").await;
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// p50/p99 (bucket upper bounds, ms) of the observations between two scrapes.
fn quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> String {
    let delta: Vec<(f64, f64)> =
        after.iter().map(|(le, n)| (*le, n - before.iter().find(|(l, _)| l == le).map_or(0.0, |(_, m)| *m))).collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return "n/a".into();
    }
    let q = |p: f64| delta.iter().find(|(_, n)| *n >= total * p).map_or(f64::INFINITY, |(le, _)| *le * 1000.0);
    format!("p50 ≤ {:.1} ms, p99 ≤ {:.1} ms (n={total})", q(0.5), q(0.99))
}
