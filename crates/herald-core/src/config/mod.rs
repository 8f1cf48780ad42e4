//! Configuration: one TOML file plus environment overrides, 12-factor style.
//!
//! Loading is a pure function of the file text and an environment map
//! ([`Config::load`]), so tests pass their own map. Overrides:
//! `DATABASE_URL` → `postgres.url`, `REDIS_URL` → `redis.url`,
//! `HERALD_ENV` → `env`, and `HERALD_<SECTION>__<KEY>` → `<section>.<key>`
//! (for example `HERALD_CAPTURE__BATCH_SIZE=200`). A bad configuration fails
//! with a message that names the key.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::{validate_env, validate_identifier};

mod cache;
mod command;
mod gateway;

pub use cache::{CacheConfig, OnStale, ResourceConfig, Shape, TokenConfig};
pub use command::{CommandConfig, OverlayConfig, WriteModel};
pub use gateway::{GatewayConfig, OpsChannelConfig};
pub use herald_l1::L1Config;

/// The whole configuration of a Herald installation. Every service reads the
/// sections it needs and ignores the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Key namespace: every Redis key starts with `herald:{env}:`.
    #[serde(default = "default_env")]
    pub env: String,
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub capture: CaptureConfig,
    #[serde(default)]
    pub broadcast: BroadcastConfig,
    #[serde(default)]
    pub l1: L1Config,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// Limits of every HTTP listener.
    #[serde(default)]
    pub http: crate::serve::HttpConfig,
    /// Limits of every gRPC listener.
    #[serde(default)]
    pub grpc: crate::serve::GrpcConfig,
    /// The watched tables.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    pub url: String,
    /// Connections in each service's pool (capture's LISTEN connection is
    /// separate and not counted).
    pub pool_size: usize,
    /// Timeout for taking a connection from the pool and for connecting.
    pub connect_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self { url: "postgres://postgres@127.0.0.1:5432/postgres".into(), pool_size: 8, connect_timeout_ms: 5_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port` (one server), or `redis-cluster://host:port?node=host:port&…`
    /// (seed nodes of a Redis Cluster).
    pub url: String,
    /// Talk to a Redis Cluster: the url's host (and its `node=` seeds) are
    /// seed nodes. Implied by a `redis-cluster://` url.
    pub cluster: bool,
    /// Partitions of the event log (and of the L1 channel): a tenant's events
    /// go to partition `fnv1a(tenant) % partitions`, each on its own slot.
    /// 1 keeps the single stream `herald:{env}:events`. Change it only with
    /// the log drained (see docs/redis-keys.md, Cluster notes).
    pub partitions: u16,
    /// Connections in each service's command pool.
    pub pool_size: usize,
    /// Timeout of one command.
    pub command_timeout_ms: u64,
    /// On a cluster, how often subscribers (L1, gateway) compare the slot
    /// map with the one they subscribed against: a slot that changed master
    /// took its sharded subscription with it, so they start over.
    pub topology_check_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            partitions: 1,
            pool_size: 4,
            command_timeout_ms: 5_000,
            topology_check_ms: 1_000,
        }
    }
}

impl RedisConfig {
    /// Whether Herald talks to a Redis Cluster (sharded pub/sub, scans of
    /// every master).
    pub fn is_cluster(&self) -> bool {
        self.cluster || self.url.starts_with("redis-cluster://") || self.url.starts_with("rediss-cluster://")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Address of the ops HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub ops_addr: String,
    /// Outbox rows drained per transaction.
    pub batch_size: i64,
    /// Rows of one statement per outbox row; larger statements are split.
    pub chunk_rows: i64,
    /// Backstop poll while idle, in case a doorbell is missed.
    pub poll_interval_ms: u64,
    /// How long capture keeps polling an empty outbox before it goes idle and
    /// asks writers to ring the doorbell again.
    pub linger_ms: u64,
    /// Capture stops appending (the outbox holds the backlog) while the stream
    /// is this long; the stream's MAXLEN is twice this, so unread entries are
    /// never trimmed in practice.
    pub stream_max_len: u64,
    /// Largest encoded event; a larger one is widened to a table-wide event.
    pub max_event_bytes: usize,
    /// Replicas that must acknowledge a batch's appends (Redis `WAIT`) before
    /// its outbox rows are deleted; 0 deletes once the primary answered.
    pub wait_replicas: u32,
    /// How long one `WAIT` may block; must be shorter than
    /// `redis.command_timeout_ms`.
    pub wait_timeout_ms: u64,
    /// Where changes come from: `wal` (logical replication: a publication
    /// and a slot, no statement triggers), `outbox` (statement triggers
    /// writing `herald.outbox`), or `auto` (`wal` when the database has
    /// `wal_level = logical` and the role may replicate, else `outbox`).
    pub source: CaptureSource,
    /// The WAL source's replication slot. A slot nobody reads pins WAL on
    /// the database server forever: drop it with `herald-capture uninstall
    /// --drop-slot` when Herald leaves.
    pub slot: String,
    /// The WAL source's publication.
    pub publication: String,
    /// How often a standby capture (the slot is active in another instance)
    /// tries to take the slot over.
    pub standby_poll_ms: u64,
    /// Where the WAL source gets old row images (a renamed slug's old key, a
    /// deleted row).
    pub old_images: OldImages,
}

/// `capture.old_images`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OldImages {
    /// `REPLICA IDENTITY FULL` on the watched tables: the stream carries the
    /// old row of every UPDATE and DELETE, and no trigger runs on any write.
    /// Every UPDATE and DELETE logs its whole old row (more WAL on wide rows).
    #[default]
    ReplicaIdentity,
    /// Row triggers emit the old image as a logical message, only for an
    /// UPDATE of the id, a key, the tenant or the team, and for DELETE. Less
    /// WAL on wide tables; every UPDATE pays the trigger's `WHEN`.
    Triggers,
}

/// `capture.source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureSource {
    #[default]
    Auto,
    Wal,
    Outbox,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            ops_addr: "0.0.0.0:9101".into(),
            batch_size: 500,
            chunk_rows: 500,
            poll_interval_ms: 1_000,
            linger_ms: 200,
            stream_max_len: 1_000_000,
            max_event_bytes: 256 * 1024,
            wait_replicas: 0,
            wait_timeout_ms: 1_000,
            source: CaptureSource::Auto,
            slot: "herald".into(),
            publication: "herald".into(),
            standby_poll_ms: 500,
            old_images: OldImages::ReplicaIdentity,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BroadcastConfig {
    pub ops_addr: String,
    /// Consumer group on the event stream; instances of one group share work.
    pub group: String,
    /// Entries read per XREADGROUP.
    pub read_count: u64,
    /// How long one XREADGROUP blocks waiting for entries.
    pub block_ms: u64,
    /// Pending entries idle this long are claimed from their (dead) consumer.
    pub claim_idle_ms: u64,
    /// Heartbeat period on the L1 channel.
    pub heartbeat_ms: u64,
    /// This instance's consumer name in the group. Keep it stable across
    /// restarts (the default, `$HOSTNAME`, is the pod name on Kubernetes),
    /// so a restarted instance re-reads the entries it had read but not
    /// acknowledged at once, instead of leaving them to `XAUTOCLAIM` after
    /// `claim_idle_ms`. Two live instances should not share a name; if they
    /// do, nothing is lost (each may re-apply the other's pending entries).
    pub consumer: Option<String>,
    /// Replicas that must acknowledge a batch's L2 deletes (Redis `WAIT` on
    /// every master it touched) before it is acknowledged; 0: none. With
    /// replicas and failover, set it (like `capture.wait_replicas`) so a
    /// promoted replica never holds entries an acknowledged event deleted.
    pub wait_replicas: u32,
    /// How long one `WAIT` may block; shorter than `redis.command_timeout_ms`.
    pub wait_timeout_ms: u64,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        Self {
            ops_addr: "0.0.0.0:9102".into(),
            group: "broadcast".into(),
            read_count: 256,
            block_ms: 1_000,
            claim_idle_ms: 5_000,
            heartbeat_ms: 1_000,
            consumer: None,
            wait_replicas: 0,
            wait_timeout_ms: 1_000,
        }
    }
}

/// A watched table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Name used in events and tags (`res_users.website_slug=alice`).
    pub name: String,
    #[serde(default = "default_schema")]
    pub schema: String,
    /// The table's name in Postgres, when it differs from `name`.
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Columns whose values are cache lookup keys; events carry tags of their
    /// old and new values.
    #[serde(default)]
    pub key_columns: Vec<String>,
    #[serde(default)]
    pub tenant_column: Option<String>,
    #[serde(default)]
    pub team_column: Option<String>,
    /// An update that changes none of these columns emits nothing. Empty
    /// means every column matters.
    #[serde(default)]
    pub watch_columns: Vec<String>,
}

impl TableConfig {
    /// The table's name in Postgres.
    pub fn pg_table(&self) -> &str {
        self.table.as_deref().unwrap_or(&self.name)
    }
}

fn default_env() -> String {
    "dev".into()
}
fn default_schema() -> String {
    "public".into()
}
fn default_id_column() -> String {
    "id".into()
}

impl Config {
    /// Parses `text` (TOML), applies the overrides found in `env`, and
    /// validates the result.
    pub fn load(text: &str, env: &BTreeMap<String, String>) -> Result<Self> {
        let file: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        let overrides = env_overrides(env)?;
        // Without overrides serde's errors point at the file's own lines.
        let config: Config = if overrides.is_empty() {
            toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?
        } else {
            let mut table = file.clone();
            for o in &overrides {
                o.apply(&mut table)?;
            }
            deserialize(&table).map_err(|e| blame(text, &file, &overrides, e))?
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the file at `path` (or starts from defaults without one) and the
    /// process environment.
    pub fn from_file(path: Option<&Path>) -> Result<Self> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?,
            None => String::new(),
        };
        Self::load(&text, &std::env::vars().collect())
    }

    fn validate(&self) -> Result<()> {
        validate_env(&self.env).map_err(|e| Error::Config(format!("env: {e}")))?;
        let positive = [
            ("postgres.pool_size", self.postgres.pool_size as i64),
            ("redis.pool_size", self.redis.pool_size as i64),
            ("redis.topology_check_ms", self.redis.topology_check_ms as i64),
            ("capture.batch_size", self.capture.batch_size),
            ("capture.chunk_rows", self.capture.chunk_rows),
            ("capture.poll_interval_ms", self.capture.poll_interval_ms as i64),
            ("capture.stream_max_len", self.capture.stream_max_len as i64),
            ("broadcast.read_count", self.broadcast.read_count as i64),
            ("broadcast.heartbeat_ms", self.broadcast.heartbeat_ms as i64),
            ("l1.max_bytes", self.l1.max_bytes as i64),
            ("l1.heartbeat_timeout_ms", self.l1.heartbeat_timeout_ms as i64),
        ];
        for (key, value) in positive {
            if value <= 0 {
                return Err(Error::Config(format!("{key}: must be greater than 0")));
            }
        }
        for (key, value) in [("capture.slot", &self.capture.slot), ("capture.publication", &self.capture.publication)] {
            if value.is_empty()
                || value.len() > 63
                || !value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(Error::Config(format!("{key}: {value:?} must be 1 to 63 of a-z 0-9 _")));
            }
        }
        if self.capture.max_event_bytes < 4096 {
            return Err(Error::Config("capture.max_event_bytes: must be at least 4096".into()));
        }
        if let Some(name) = &self.broadcast.consumer
            && (name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(Error::Config(format!("broadcast.consumer: {name:?} must be 1 to 64 of A-Z a-z 0-9 _ - .")));
        }
        if self.capture.wait_replicas > 0
            && (self.capture.wait_timeout_ms == 0 || self.capture.wait_timeout_ms >= self.redis.command_timeout_ms)
        {
            return Err(Error::Config(
                "capture.wait_timeout_ms: must be greater than 0 and shorter than redis.command_timeout_ms".into(),
            ));
        }
        if self.broadcast.wait_replicas > 0
            && (self.broadcast.wait_timeout_ms == 0 || self.broadcast.wait_timeout_ms >= self.redis.command_timeout_ms)
        {
            return Err(Error::Config(
                "broadcast.wait_timeout_ms: must be greater than 0 and shorter than redis.command_timeout_ms".into(),
            ));
        }
        if !(1..=crate::keys::MAX_PARTITIONS).contains(&self.redis.partitions) {
            return Err(Error::Config(format!("redis.partitions: must be 1 to {}", crate::keys::MAX_PARTITIONS)));
        }
        if self.l1.heartbeat_timeout_ms <= self.broadcast.heartbeat_ms {
            return Err(Error::Config("l1.heartbeat_timeout_ms: must be longer than broadcast.heartbeat_ms".into()));
        }
        self.cache.validate(&self.tables)?;
        self.gateway.validate()?;
        self.http.validate()?;
        self.grpc.validate()?;
        let mut names = HashSet::new();
        for (i, t) in self.tables.iter().enumerate() {
            let at = |field: &str| format!("tables[{i}] ({}).{field}", t.name);
            let check = |field: &str, value: &str| {
                validate_identifier(value).map_err(|e| Error::Config(format!("{}: {e}", at(field))))
            };
            check("name", &t.name)?;
            check("schema", &t.schema)?;
            check("table", t.pg_table())?;
            check("id_column", &t.id_column)?;
            for c in &t.key_columns {
                check("key_columns", c)?;
            }
            for c in &t.watch_columns {
                check("watch_columns", c)?;
            }
            if let Some(c) = &t.tenant_column {
                check("tenant_column", c)?;
            }
            if let Some(c) = &t.team_column {
                check("team_column", c)?;
            }
            if !names.insert(t.name.as_str()) {
                return Err(Error::Config(format!("{}: duplicate table name", at("name"))));
            }
        }
        Ok(())
    }
}

/// One environment variable that sets a configuration key.
struct Override {
    /// The variable, e.g. `HERALD_CAPTURE__BATCH_SIZE`.
    name: String,
    /// The key's path, e.g. `["capture", "batch_size"]`.
    path: Vec<String>,
    value: String,
}

impl Override {
    fn apply(&self, table: &mut toml::Table) -> Result<()> {
        let mut cursor = table;
        let (key, sections) = self.path.split_last().expect("a path has a key");
        for section in sections {
            let entry = cursor.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = entry
                .as_table_mut()
                .ok_or_else(|| Error::Config(format!("{}: {} is not a table", self.name, self.path.join("."))))?;
        }
        cursor.insert(key.clone(), parse_env_value(&self.value));
        Ok(())
    }
}

/// The overrides found in `env`: `DATABASE_URL`, `REDIS_URL`, `HERALD_ENV`
/// and `HERALD_<SECTION>__<KEY>`.
fn env_overrides(env: &BTreeMap<String, String>) -> Result<Vec<Override>> {
    let mut overrides = Vec::new();
    let mut add = |name: &str, path: &[&str]| {
        if let Some(value) = env.get(name) {
            let path = path.iter().map(|s| s.to_string()).collect();
            overrides.push(Override { name: name.to_string(), path, value: value.clone() });
        }
    };
    add("DATABASE_URL", &["postgres", "url"]);
    add("REDIS_URL", &["redis", "url"]);
    add("HERALD_ENV", &["env"]);
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("HERALD_") else { continue };
        if !rest.contains("__") {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            return Err(Error::Config(format!("{name}: empty section or key")));
        }
        overrides.push(Override { name: name.clone(), path, value: value.clone() });
    }
    Ok(overrides)
}

fn deserialize(table: &toml::Table) -> std::result::Result<Config, toml::de::Error> {
    table.clone().try_into()
}

/// The error of a configuration that fails only with the environment's
/// overrides applied, naming the variable to blame rather than a line of a
/// document the user never wrote.
fn blame(text: &str, file: &toml::Table, overrides: &[Override], error: toml::de::Error) -> Error {
    if let Err(e) = toml::from_str::<Config>(text) {
        return Error::Config(e.to_string());
    }
    for o in overrides {
        let mut table = file.clone();
        if let Err(e) = o.apply(&mut table) {
            return e;
        }
        if let Err(e) = deserialize(&table) {
            return Error::Config(format!("{} (key {}): {}", o.name, o.path.join("."), e.message().trim()));
        }
    }
    let names: Vec<&str> = overrides.iter().map(|o| o.name.as_str()).collect();
    Error::Config(format!("environment overrides {}: {}", names.join(", "), error.message().trim()))
}

/// An environment value as TOML when it parses as a number, boolean or
/// array, else as a string.
fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) | toml::Value::Array(_)),
            ) => v,
            _ => toml::Value::String(raw.to_string()),
        },
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Milliseconds from config as a [`Duration`].
pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const SAMPLE: &str = r#"
        env = "prod"
        [capture]
        batch_size = 100
        [[tables]]
        name = "res_users"
        key_columns = ["website_slug"]
        tenant_column = "tenant_id"
    "#;

    #[test]
    fn file_then_env_overrides() {
        let c = Config::load(
            SAMPLE,
            &env(&[
                ("DATABASE_URL", "postgres://x@db/app"),
                ("HERALD_CAPTURE__BATCH_SIZE", "42"),
                ("HERALD_L1__MAX_BYTES", "1024"),
                ("HERALD_BROADCAST__GROUP", "g2"),
            ]),
        )
        .unwrap();
        assert_eq!(c.env, "prod");
        assert_eq!(c.postgres.url, "postgres://x@db/app");
        assert_eq!(c.capture.batch_size, 42);
        assert_eq!(c.l1.max_bytes, 1024);
        assert_eq!(c.broadcast.group, "g2");
        assert_eq!(c.tables[0].schema, "public");
        assert_eq!(c.tables[0].id_column, "id");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::load("[capture]\nbatchsize = 3\n", &env(&[])).unwrap_err().to_string();
        assert!(err.contains("batchsize"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::load("", &env(&[("HERALD_CAPTURE__BATCH_SIZE", "0")])).unwrap_err();
        assert!(err.to_string().contains("capture.batch_size"), "{err}");
        let err = Config::load("[[tables]]\nname = \"x; drop\"\n", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("tables[0]"), "{err}");
        let err = Config::load("env = \"a:b\"\n", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("env"), "{err}");
        let dup = "[[tables]]\nname = \"a\"\n[[tables]]\nname = \"a\"\n";
        assert!(Config::load(dup, &env(&[])).unwrap_err().to_string().contains("duplicate"));
    }

    #[test]
    fn a_freshness_bound_tighter_than_watermarks_is_refused() {
        let err = Config::load("[cache]\nmax_staleness_ms = 50\n", &env(&[])).unwrap_err().to_string();
        assert!(err.contains("cache.max_staleness_ms") && err.contains("250"), "{err}");
        let ok = Config::load("[cache]\nmax_staleness_ms = 500\n", &env(&[])).unwrap();
        assert_eq!(ok.cache.max_staleness_ms, Some(500));
    }

    #[test]
    fn replica_wait_must_fit_the_command_timeout() {
        assert_eq!(Config::load("", &env(&[])).unwrap().capture.wait_replicas, 0);
        let wait = "[capture]\nwait_replicas = 1\nwait_timeout_ms = 5000\n";
        let err = Config::load(wait, &env(&[])).unwrap_err().to_string();
        assert!(err.contains("capture.wait_timeout_ms"), "{err}");
        let ok = Config::load("[capture]\nwait_replicas = 1\nwait_timeout_ms = 500\n", &env(&[])).unwrap();
        assert_eq!((ok.capture.wait_replicas, ok.capture.wait_timeout_ms), (1, 500));
        let wait = "[broadcast]\nwait_replicas = 1\nwait_timeout_ms = 5000\n";
        let err = Config::load(wait, &env(&[])).unwrap_err().to_string();
        assert!(err.contains("broadcast.wait_timeout_ms"), "{err}");
    }

    #[test]
    fn cluster_mode_comes_from_the_flag_or_the_url() {
        let single = Config::load("", &env(&[])).unwrap().redis;
        assert!(!single.is_cluster());
        assert_eq!(single.partitions, 1);
        let url = Config::load("", &env(&[("REDIS_URL", "redis-cluster://a:7000?node=b:7001")])).unwrap();
        assert!(url.redis.is_cluster());
        let flag = Config::load("[redis]\ncluster = true\npartitions = 3\n", &env(&[])).unwrap();
        assert!(flag.redis.is_cluster());
        assert_eq!(flag.redis.partitions, 3);
        let err = Config::load("[redis]\npartitions = 0\n", &env(&[])).unwrap_err().to_string();
        assert!(err.contains("redis.partitions"), "{err}");
    }

    #[test]
    fn env_wins_over_file_and_types_are_checked() {
        let err = Config::load("", &env(&[("HERALD_CAPTURE__BATCH_SIZE", "many")])).unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
    }
}
