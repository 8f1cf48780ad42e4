//! Test support: a [`Sandbox`] gives each test its own Postgres database,
//! its own Redis key namespace (`herald:{env}:…`), the demo table with
//! Herald's triggers installed, and the services wired together — all real,
//! nothing mocked. [`assert_eventually!`] polls with a deadline instead of
//! sleeping.

pub mod cache_api;
pub mod coherence;
pub mod gateway;
pub mod logical;
pub mod process;
pub mod redis_cluster;

use std::net::SocketAddr;
use std::time::Duration;

use fred::prelude::*;
use herald_core::config::{CaptureSource, Config, TableConfig};
use herald_core::keys::KeySpace;
use herald_core::l1::L1Cache;
use herald_core::l1::subscriber::{self, SubscriberOptions};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// Postgres server URL for tests (`DATABASE_URL`, default local trust auth).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Redis URL for tests (`REDIS_URL`, default local). With
/// `HERALD_TEST_REDIS=cluster` (`make test-cluster`): a Redis Cluster of
/// this test process ([`redis_cluster::RedisCluster::shared`]).
pub fn redis_url() -> String {
    if on_cluster() {
        return redis_cluster::RedisCluster::shared().url();
    }
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Whether the suite runs against a Redis Cluster (`HERALD_TEST_REDIS=cluster`).
pub fn on_cluster() -> bool {
    std::env::var("HERALD_TEST_REDIS").is_ok_and(|v| v == "cluster")
}

/// Settings of a sandbox on a cluster: 3 log partitions, and capture and
/// broadcast wait for a replica, as a production cluster would run.
pub fn cluster_settings(config: &mut Config, url: String) {
    config.redis.url = url;
    config.redis.partitions = 3;
    config.capture.wait_replicas = 1;
    config.capture.wait_timeout_ms = 1_000;
    config.broadcast.wait_replicas = 1;
    config.broadcast.wait_timeout_ms = 1_000;
}

/// Polls `$cond` (an async block returning bool) every 10 ms until it holds
/// or `$secs` seconds pass; then panics with the message.
#[macro_export]
macro_rules! assert_eventually {
    ($secs:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = ::std::time::Instant::now() + ::std::time::Duration::from_secs_f64($secs as f64);
        loop {
            if $cond.await {
                break;
            }
            if ::std::time::Instant::now() > deadline {
                panic!($($msg)+);
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(10)).await;
        }
    }};
}

/// The demo table every sandbox has.
pub const DEMO_TABLE: &str = "
CREATE TABLE res_users (
    id           bigserial PRIMARY KEY,
    tenant_id    text NOT NULL,
    team_id      bigint,
    website_slug text,
    callsign     text,
    name         text,
    updated_at   timestamptz NOT NULL DEFAULT now()
)";

/// The demo table's configuration.
pub fn demo_table() -> TableConfig {
    TableConfig {
        name: "res_users".into(),
        schema: "public".into(),
        table: None,
        id_column: "id".into(),
        key_columns: vec!["website_slug".into(), "callsign".into()],
        tenant_column: Some("tenant_id".into()),
        team_column: Some("team_id".into()),
        watch_columns: vec!["name".into()],
    }
}

/// A running in-process service.
pub struct ServiceHandle {
    pub ops_addr: SocketAddr,
    token: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ServiceHandle {
    /// Kills the task where it stands (no graceful shutdown): in-flight
    /// transactions roll back, connections drop.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Graceful shutdown.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.task.await?
    }
}

/// Where a sandbox's capture reads changes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Statement triggers and `herald.outbox`, on the shared server.
    Outbox,
    /// A replication slot, on the process's throwaway logical cluster
    /// ([`logical::cluster`]); each sandbox has its own slot.
    Wal,
}

/// Both sources, for tests that must hold for each.
pub const SOURCES: [Source; 2] = [Source::Outbox, Source::Wal];

/// A test's private world.
pub struct Sandbox {
    pub config: Config,
    /// The server's admin URL (the shared server, or the logical cluster).
    pub admin: String,
    pub source: Source,
    pub db_name: String,
    pub pool: deadpool_postgres::Pool,
    pub redis: Pool,
    pub keys: KeySpace,
    shutdown: CancellationToken,
    cleaned: bool,
}

/// Short random hex, for names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl Sandbox {
    /// A sandbox with the demo table installed and test-friendly timings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Like [`Sandbox::start`], letting the test adjust the config first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_source(Source::Outbox, adjust).await
    }

    /// A sandbox whose capture uses `source`.
    pub async fn start_source(source: Source, adjust: impl FnOnce(&mut Config)) -> Self {
        let admin = match source {
            Source::Outbox => admin_url(),
            Source::Wal => logical::cluster().admin_url(),
        };
        Self::start_at(admin, source, adjust).await
    }

    /// A sandbox on the server at `admin` whose capture uses `source` (the
    /// WAL source needs a server with `wal_level = logical`).
    pub async fn start_at(admin: String, source: Source, adjust: impl FnOnce(&mut Config)) -> Self {
        init_logging();
        let db_name = unique("herald_t_");
        let (client, connection) = tokio_postgres::connect(&admin, NoTls).await.expect("connect to postgres");
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {db_name}")).await.expect("create database");

        let db_url = database_url_for(&admin, &db_name);
        let mut config = Config::load("", &Default::default()).expect("default config");
        config.env = unique("t");
        config.postgres.url = db_url;
        config.postgres.pool_size = 4;
        config.redis.url = redis_url();
        if on_cluster() {
            cluster_settings(&mut config, redis_url());
        }
        config.capture.ops_addr = "127.0.0.1:0".into();
        config.capture.poll_interval_ms = 200;
        config.broadcast.ops_addr = "127.0.0.1:0".into();
        config.broadcast.claim_idle_ms = 500;
        config.broadcast.block_ms = 200;
        config.broadcast.heartbeat_ms = 100;
        config.l1.heartbeat_timeout_ms = 1_000;
        config.tables = vec![demo_table()];
        match source {
            Source::Outbox => config.capture.source = CaptureSource::Outbox,
            Source::Wal => {
                config.capture.source = CaptureSource::Wal;
                config.capture.slot = unique("herald_s_");
            }
        }
        adjust(&mut config);

        let pool = herald_core::pg::pool(&config.postgres).expect("pool");
        pool.get().await.expect("connect to test db").batch_execute(DEMO_TABLE).await.expect("demo table");
        let redis = herald_core::redis::connect_pool(&config.redis).await.expect("connect to redis");
        let keys = KeySpace::new(&config.env).expect("keyspace");
        let sandbox = Self {
            config,
            admin,
            source,
            db_name,
            pool,
            redis,
            keys,
            shutdown: CancellationToken::new(),
            cleaned: false,
        };
        sandbox.install().await;
        sandbox
    }

    /// Applies the herald schema for the current config.
    pub async fn install(&self) {
        let (mut client, connection) =
            tokio_postgres::connect(&self.config.postgres.url, NoTls).await.expect("connect");
        tokio::spawn(connection);
        herald_capture::install::install(&mut client, &self.config).await.expect("install");
    }

    /// Runs SQL on the sandbox database. A pooled connection that a fault
    /// test terminated fails once; the statement is then run on a fresh one.
    pub async fn sql(&self, sql: &str) {
        let first = self.pool.get().await.expect("pg");
        let result = match first.batch_execute(sql).await {
            Err(e) if first.is_closed() || e.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN) => {
                drop(deadpool_postgres::Object::take(first));
                self.pool.get().await.expect("pg").batch_execute(sql).await
            }
            result => result,
        };
        result.unwrap_or_else(|e| {
            let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
            panic!("{sql}: {detail}")
        });
    }

    /// One scalar from the sandbox database.
    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        self.pool.get().await.expect("pg").query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// Starts capture in-process.
    pub async fn spawn_capture(&self) -> ServiceHandle {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ops_addr = listener.local_addr().expect("addr");
        let token = self.shutdown.child_token();
        let task = tokio::spawn(herald_capture::run(self.config.clone(), listener, token.clone()));
        ServiceHandle { ops_addr, token, task }
    }

    /// Starts broadcast in-process.
    pub async fn spawn_broadcast(&self) -> ServiceHandle {
        self.spawn_broadcast_with(|_| {}).await
    }

    /// A broadcast instance with its own adjustments of the sandbox's config.
    pub async fn spawn_broadcast_with(&self, adjust: impl FnOnce(&mut Config)) -> ServiceHandle {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ops_addr = listener.local_addr().expect("addr");
        let token = self.shutdown.child_token();
        let mut config = self.config.clone();
        adjust(&mut config);
        let task = tokio::spawn(herald_broadcast::run(config, listener, unique("broadcast-"), token.clone()));
        ServiceHandle { ops_addr, token, task }
    }

    /// An L1 cache with its own subscriber (as one app node would have),
    /// returned once it is live.
    pub async fn l1(&self) -> L1Holder {
        let holder = self.l1_unchecked();
        assert_eventually!(10, async { holder.cache.is_live() }, "l1 never became live");
        holder
    }

    /// Like [`Sandbox::l1`], without waiting for it to become live.
    pub fn l1_unchecked(&self) -> L1Holder {
        let cache = L1Cache::new(&self.config.l1);
        let mut options = SubscriberOptions::new(
            &self.config.redis,
            &self.config.l1,
            self.keys.l1_channels(self.config.redis.partitions),
        );
        let client_name = unique("herald-l1-test-");
        options.client_name = client_name.clone();
        let token = self.shutdown.child_token();
        let task = subscriber::spawn(cache.clone(), options, token.clone());
        L1Holder { cache, token, task, client_name }
    }

    /// The event log of the sandbox's config (every partition).
    pub fn log(&self) -> herald_core::stream::EventLog {
        herald_core::stream::EventLog::new(&self.keys, self.config.redis.partitions)
    }

    /// Every partition's consumer groups have delivered everything and have
    /// nothing pending (broadcast has caught up).
    pub async fn log_acknowledged(&self) -> bool {
        use std::collections::HashMap;
        for stream in self.log().streams() {
            let redis = self.redis.next();
            let Ok(info) = redis.xinfo_stream::<HashMap<String, Value>, _>(stream, false, None).await else {
                return false;
            };
            let last = info.get("last-generated-id").and_then(|v| v.as_string()).unwrap_or_default();
            let Ok(groups) = redis.xinfo_groups::<Vec<HashMap<String, Value>>, _>(stream).await else { return false };
            let done = !groups.is_empty()
                && groups.iter().all(|g| {
                    g.get("pending").and_then(|v| v.as_i64()) == Some(0)
                        && g.get("last-delivered-id").and_then(|v| v.as_string()).unwrap_or_default() == last
                });
            if !done {
                return false;
            }
        }
        true
    }

    /// Events in the log (every partition).
    pub async fn stream_event_count(&self) -> u64 {
        self.stream_events().await.len() as u64
    }

    /// Every event in the log, decoded: partition after partition, each in
    /// its order.
    pub async fn stream_events(&self) -> Vec<herald_proto::v1::InvalidationEvent> {
        use herald_proto::Message as _;
        let mut events = Vec::new();
        for stream in self.log().streams() {
            let reply: Value = self.redis.next().xrange(stream, "-", "+", None).await.expect("xrange");
            events.extend(
                herald_core::stream::range_entries(reply)
                    .into_iter()
                    .filter_map(|entry| entry.payload)
                    .map(|bytes| herald_proto::v1::InvalidationEvent::decode(bytes.as_ref()).expect("decode")),
            );
        }
        events
    }

    /// Reads the stream's new entries as broadcast consumer `consumer` and
    /// acknowledges nothing: a broadcast instance killed after reading.
    /// Returns whether anything was read.
    pub async fn read_without_ack(&self, consumer: &str) -> bool {
        let group = self.config.broadcast.group.as_str();
        let mut any = false;
        for stream in self.log().streams() {
            herald_core::redis::ensure_group(&self.redis, stream, group).await.expect("group");
            let read: Value = self
                .redis
                .next()
                .xreadgroup(group, consumer, Some(10), None, false, stream.as_str(), ">")
                .await
                .expect("xreadgroup");
            any |= !matches!(read, Value::Null);
        }
        any
    }

    /// Kills the Redis pub/sub connection named `name` (`CLIENT SETNAME`),
    /// and only that one: other tests share the server.
    pub async fn kill_pubsub_client(&self, name: &str) {
        let client = self.redis.next();
        let nodes = match client.cached_cluster_state() {
            Some(state) if client.is_clustered() => state.unique_primary_nodes().into_iter().map(Some).collect(),
            _ => vec![None],
        };
        let mut killed = false;
        for node in nodes {
            let on = |node: &Option<fred::types::config::Server>| match node {
                Some(server) => client.with_cluster_node(server.clone()),
                None => client.with_options(&Default::default()),
            };
            let list: String = on(&node)
                .client_list::<String, String>(Some(fred::types::client::ClientKillType::Pubsub), None)
                .await
                .expect("client list");
            let Some(id) = list
                .lines()
                .find(|line| line.contains(&format!("name={name} ")))
                .and_then(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
            else {
                continue;
            };
            let _: Value = on(&node).custom(fred::cmd!("CLIENT"), vec!["KILL", "ID", id]).await.expect("client kill");
            killed = true;
        }
        assert!(killed, "{name} not in CLIENT LIST");
    }

    /// Stops everything the sandbox started, drops the database and deletes
    /// every Redis key of its namespace. A sandbox dropped without this (a
    /// failed test) does the same from its `Drop`.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        self.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.pool.close();
        remove_everything(&self.redis, self.keys.prefix(), &self.admin, &self.db_name).await;
        let _ = self.redis.quit().await;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.shutdown.cancel();
        self.pool.close();
        let (redis_config, prefix, admin, db_name) =
            (self.config.redis.clone(), self.keys.prefix().to_string(), self.admin.clone(), self.db_name.clone());
        // A fresh runtime on its own thread: Drop may run inside (or outside)
        // the test's runtime, where blocking on it is not allowed.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                if let Ok(redis) = herald_core::redis::connect_pool(&redis_config).await {
                    remove_everything(&redis, &prefix, &admin, &db_name).await;
                    let _ = redis.quit().await;
                }
            });
        })
        .join();
    }
}

/// Deletes every key under `prefix` and drops database `db_name` of the
/// server at `admin` (and its replication slots first).
async fn remove_everything(redis: &Pool, prefix: &str, admin: &str, db_name: &str) {
    let pattern = format!("{prefix}:*");
    if let Ok(keys) = herald_core::redis::scan_every_master(redis.next(), &pattern).await {
        let _ = herald_core::redis::del_any_slots(redis.next(), keys).await;
    }
    if let Ok((client, connection)) = tokio_postgres::connect(admin, NoTls).await {
        tokio::spawn(connection);
        for _ in 0..50 {
            let slots = "FROM pg_replication_slots WHERE database = $1";
            let _ = client
                .execute(
                    &format!("SELECT pg_terminate_backend(active_pid) {slots} AND active_pid IS NOT NULL"),
                    &[&db_name],
                )
                .await;
            let _ = client
                .execute(&format!("SELECT pg_drop_replication_slot(slot_name) {slots} AND NOT active"), &[&db_name])
                .await;
            let left: i64 = match client.query_one(&format!("SELECT count(*) {slots}"), &[&db_name]).await {
                Ok(row) => row.get(0),
                Err(_) => 0,
            };
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")).await;
    }
}

/// An L1 cache and its subscriber.
pub struct L1Holder {
    pub cache: L1Cache,
    /// Name of its Redis subscription connection (`CLIENT LIST`).
    pub client_name: String,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl L1Holder {
    /// Puts `value` under `key` with `tags` in `tenant`'s scope; true if stored.
    pub fn put(&self, tenant: &str, key: &str, value: &str, tags: &[&str]) -> bool {
        use herald_core::keys::{Scope, TagKey, TenantId};
        let scope = Scope::Tenant(TenantId::new(tenant).expect("tenant"));
        let tags = tags.iter().map(|t| TagKey::new(scope.clone(), *t)).collect();
        let ticket = self.cache.begin_fill();
        self.cache.insert(ticket, key, bytes::Bytes::from(value.to_string()), tags, None)
    }

    pub fn has(&self, key: &str) -> bool {
        self.cache.get(key).is_some()
    }

    pub async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
    }
}

/// A minimal HTTP/1.1 GET over a real socket: the whole response, or empty
/// when the connection fails.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return String::new() };
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
}

/// A free TCP port on 127.0.0.1 (for servers a test starts itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A throwaway `redis-server` on `port` without persistence, killed when
/// dropped (for tests that kill or restart Redis itself).
pub fn start_redis(port: u16) -> tokio::process::Child {
    tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server on PATH")
}

/// Sum of every sample of metric `name` served at `addr`'s `/metrics` whose
/// labels contain `labels`.
pub async fn metric(addr: SocketAddr, name: &str, labels: &str) -> f64 {
    let text = http_get(addr, "/metrics").await;
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `admin`'s URL pointing at database `name`.
pub fn database_url_for(admin: &str, name: &str) -> String {
    let mut config: tokio_postgres::Config = admin.parse().expect("DATABASE_URL");
    config.dbname(name);
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let password = config.get_password().map(|p| format!(":{}", String::from_utf8_lossy(p))).unwrap_or_default();
    format!("postgres://{user}{password}@{host}:{port}/{name}")
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("HERALD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}
