//! The cache API's section, `[cache]`: listeners, fill behaviour, API tokens
//! (`[[cache.tokens]]`) and resources (`[[cache.resources]]`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::TableConfig;
use super::command::CommandConfig;
use crate::error::{Error, Result};
use crate::keys::{TenantId, validate_identifier};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Address of the ops HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub ops_addr: String,
    /// gRPC listener (`herald.v1.Cache`, health, reflection).
    pub grpc_addr: String,
    /// HTTP/JSON listener (`/v1/…`, `/openapi.json`).
    pub http_addr: String,
    /// Cross-node fill lease: while one node reads Postgres for a key, the
    /// others wait for its value in L2 instead of reading too.
    pub lease_ms: u64,
    /// Longest a request waits for another node's fill before it reads
    /// Postgres itself.
    pub fill_wait_ms: u64,
    /// Postgres reads in flight per node; more wait.
    pub max_concurrent_fills: usize,
    /// Largest value accepted by Set or produced by a resource.
    pub max_value_bytes: usize,
    /// Largest answer of one GetMany (value bytes as sent: JSON or base64
    /// over HTTP); items past it get a `resource_exhausted` error.
    pub max_get_many_bytes: usize,
    /// Most tags in one Set or InvalidateTags.
    pub max_tags_per_request: usize,
    /// Longest caller-supplied tag, in bytes.
    pub max_tag_bytes: usize,
    /// Longest wait for a database-read permit (node-wide or the tenant's)
    /// before a read fails with `unavailable`.
    pub fill_permit_timeout_ms: u64,
    /// Database reads in flight for one tenant (a share of
    /// `max_concurrent_fills`, so one tenant cannot take them all).
    pub max_fills_per_tenant: usize,
    /// `statement_timeout` of resource queries.
    pub query_timeout_ms: u64,
    /// Invalidation watch streams per node.
    pub max_watchers: usize,
    /// Invalidation watch streams per tenant on one node.
    pub max_watchers_per_tenant: usize,
    /// `Watch` streams carry a heartbeat at least this often; near caches
    /// flush when none arrives within their timeout.
    pub watch_heartbeat_ms: u64,
    /// TTL of explicit keys set without one.
    pub key_ttl_ms: u64,
    /// Longest TTL a caller may ask for an explicit key.
    pub max_key_ttl_ms: u64,
    /// Default freshness bound of resources, in milliseconds: a node that
    /// cannot vouch that its cache reflects every change committed longer
    /// ago than this answers from Postgres instead (see a resource's
    /// `on_stale`). Unset: no bound (the cache serves what it holds while
    /// the pipeline is down).
    pub max_staleness_ms: Option<u64>,
    /// Added to every staleness measurement: the most this node's clock may
    /// lag Postgres's (staleness compares the two). Hosts are assumed to be
    /// NTP-synchronised; set it to the skew you tolerate.
    pub clock_skew_ms: u64,
    /// Who may call the API.
    pub tokens: Vec<TokenConfig>,
    /// Read-through resources.
    pub resources: Vec<ResourceConfig>,
    /// Write commands (`[[cache.commands]]`, see `command.rs`).
    pub commands: Vec<CommandConfig>,
    /// Longest a write-through call waits, after its commit, for every live
    /// node to apply the changes up to it (the answer says whether it did).
    pub write_wait_ms: u64,
    /// Runs the write-behind writer on this node (leases keep one writer
    /// active per tenant across nodes).
    pub write_behind_writer: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ops_addr: "0.0.0.0:9103".into(),
            grpc_addr: "0.0.0.0:50051".into(),
            http_addr: "0.0.0.0:8080".into(),
            lease_ms: 2_000,
            fill_wait_ms: 3_000,
            max_concurrent_fills: 32,
            max_value_bytes: 1024 * 1024,
            // Under the 4 MiB that gRPC clients accept by default.
            max_get_many_bytes: 3 * 1024 * 1024,
            max_tags_per_request: 64,
            max_tag_bytes: 256,
            fill_permit_timeout_ms: 5_000,
            max_fills_per_tenant: 8,
            query_timeout_ms: 10_000,
            max_watchers: 1024,
            max_watchers_per_tenant: 64,
            watch_heartbeat_ms: 500,
            key_ttl_ms: 300_000,
            max_key_ttl_ms: 86_400_000,
            max_staleness_ms: None,
            clock_skew_ms: 0,
            tokens: Vec::new(),
            resources: Vec::new(),
            commands: Vec::new(),
            write_wait_ms: 2_000,
            write_behind_writer: true,
        }
    }
}

/// An API token and the tenants it may touch. Its `Debug` never shows the
/// secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs and metrics, never the secret.
    pub name: String,
    /// The secret itself; prefer `token_env`.
    #[serde(default)]
    pub token: Option<String>,
    /// Name of the environment variable holding the secret.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Tenant ids, or `["*"]` for a trusted backend that serves every tenant.
    pub tenants: Vec<String>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_env", &self.token_env)
            .field("tenants", &self.tenants)
            .finish()
    }
}

/// How a resource's rows become its JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// At most one row, as an object; no row is a negative entry (`null`).
    Row,
    /// Every row, as an array of objects.
    Rows,
    /// One column of at most one row, as its JSON value.
    Scalar,
}

/// What a node does with a read of a resource whose freshness bound it
/// cannot vouch for (capture, broadcast or Redis down, a lagging feed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStale {
    /// Answer from Postgres, storing nothing (freshness over availability:
    /// Postgres takes the reads, within the fill permits).
    #[default]
    Bypass,
    /// Answer from the cache anyway (availability over freshness).
    Serve,
}

/// Smallest freshness bound: capture confirms a watermark about every
/// 100 ms, and a bound below that could never be vouched for.
pub const MIN_STALENESS_MS: u64 = 250;

/// A read-through resource.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    pub name: String,
    /// The query. Caller parameters are `$1…$n`; the tenant is `$tenant`,
    /// bound by Herald (never by the caller), and required unless `global`.
    pub sql: String,
    /// Names of `$1…$n`, in order (HTTP passes them as `?name=value`).
    #[serde(default)]
    pub params: Vec<String>,
    pub shape: Shape,
    /// Tag templates: `$k` is parameter k, `{column}` a result column (one
    /// tag per row). `<table>.<column>=…` tags must name a watched table's id
    /// or key column, so capture can drop them.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Time to live; 0 means unlimited and needs `unlimited_ttl_reason`.
    pub ttl_ms: u64,
    #[serde(default)]
    pub unlimited_ttl_reason: Option<String>,
    /// TTL of negative entries (no row); 0 disables negative caching.
    #[serde(default)]
    pub negative_ttl_ms: u64,
    /// Random spread added to TTLs, in percent, so entries filled together
    /// do not expire together.
    #[serde(default = "default_jitter")]
    pub ttl_jitter_pct: u8,
    /// Data shared by every tenant (no `$tenant`): kept in the global scope.
    #[serde(default)]
    pub global: bool,
    /// Result columns that look like secrets but may be cached anyway.
    #[serde(default)]
    pub allow_secret_columns: Vec<String>,
    /// This resource's freshness bound (else `cache.max_staleness_ms`).
    #[serde(default)]
    pub max_staleness_ms: Option<u64>,
    /// What a read does when the bound cannot be vouched for.
    #[serde(default)]
    pub on_stale: OnStale,
}

impl ResourceConfig {
    /// The freshness bound that applies, if any, with `default` the
    /// cache-wide one.
    pub fn staleness_bound_ms(&self, default: Option<u64>) -> Option<u64> {
        self.max_staleness_ms.or(default)
    }
}

fn default_jitter() -> u8 {
    10
}

impl ResourceConfig {
    /// The `$k` parameter numbers used in `text`, in order of appearance.
    pub fn placeholders(text: &str) -> Vec<usize> {
        let bytes = text.as_bytes();
        let mut found = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'$' {
                let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
                if digits > 0 {
                    if let Ok(n) = text[i + 1..i + 1 + digits].parse() {
                        found.push(n);
                    }
                    i += digits;
                }
            }
            i += 1;
        }
        found
    }

    /// The `{column}` references of a tag template.
    pub fn column_refs(template: &str) -> Vec<&str> {
        let mut refs = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else { break };
            refs.push(&rest[open + 1..open + close]);
            rest = &rest[open + close + 1..];
        }
        refs
    }
}

impl CacheConfig {
    /// Checks the section against the watched `tables`; errors name the key.
    pub(crate) fn validate(&self, tables: &[TableConfig]) -> Result<()> {
        let err = |key: String, reason: &str| Err(Error::Config(format!("{key}: {reason}")));
        let positive = [
            ("cache.lease_ms", self.lease_ms as i64),
            ("cache.fill_wait_ms", self.fill_wait_ms as i64),
            ("cache.max_concurrent_fills", self.max_concurrent_fills as i64),
            ("cache.max_value_bytes", self.max_value_bytes as i64),
            ("cache.key_ttl_ms", self.key_ttl_ms as i64),
            ("cache.max_get_many_bytes", self.max_get_many_bytes as i64),
            ("cache.max_tags_per_request", self.max_tags_per_request as i64),
            ("cache.max_tag_bytes", self.max_tag_bytes as i64),
            ("cache.fill_permit_timeout_ms", self.fill_permit_timeout_ms as i64),
            ("cache.max_fills_per_tenant", self.max_fills_per_tenant as i64),
            ("cache.query_timeout_ms", self.query_timeout_ms as i64),
            ("cache.max_watchers", self.max_watchers as i64),
            ("cache.max_watchers_per_tenant", self.max_watchers_per_tenant as i64),
            ("cache.watch_heartbeat_ms", self.watch_heartbeat_ms as i64),
            ("cache.write_wait_ms", self.write_wait_ms as i64),
        ];
        for (key, value) in positive {
            if value <= 0 {
                return err(key.into(), "must be greater than 0");
            }
        }
        if self.max_get_many_bytes < 2 * self.max_value_bytes {
            // A value may grow by a third as base64 over HTTP: the largest
            // value must fit in one GetMany answer.
            return err("cache.max_get_many_bytes".into(), "must be at least twice cache.max_value_bytes");
        }
        if self.max_tag_bytes > 512 {
            return err("cache.max_tag_bytes".into(), "must be at most 512 (a tag is part of a Redis key)");
        }
        if self.max_fills_per_tenant > self.max_concurrent_fills {
            return err("cache.max_fills_per_tenant".into(), "must be at most cache.max_concurrent_fills");
        }
        if self.max_watchers_per_tenant > self.max_watchers {
            return err("cache.max_watchers_per_tenant".into(), "must be at most cache.max_watchers");
        }
        if self.max_key_ttl_ms < self.key_ttl_ms {
            return err("cache.max_key_ttl_ms".into(), "must be at least cache.key_ttl_ms");
        }
        let too_tight = format!("must be at least {MIN_STALENESS_MS} (watermarks are confirmed about every 100 ms)");
        if self.max_staleness_ms.is_some_and(|ms| ms < MIN_STALENESS_MS) {
            return err("cache.max_staleness_ms".into(), &too_tight);
        }
        let mut names = HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let at = |field: &str| format!("cache.tokens[{i}] ({}).{field}", t.name);
            if t.token.is_some() == t.token_env.is_some() {
                return err(at("token"), "set exactly one of token and token_env");
            }
            if t.token.as_ref().is_some_and(|s| s.len() < 16) {
                return err(at("token"), "must be at least 16 characters");
            }
            if t.tenants.is_empty() {
                return err(at("tenants"), "list tenant ids, or [\"*\"] for every tenant");
            }
            for tenant in t.tenants.iter().filter(|t| *t != "*") {
                if let Err(e) = TenantId::new(tenant) {
                    return err(at("tenants"), &e.to_string());
                }
            }
            if !names.insert(t.name.as_str()) {
                return err(at("name"), "duplicate token name");
            }
            // Two tokens with one secret: the caller would get whichever
            // matched last, and its tenants.
            let first = |same: &dyn Fn(&TokenConfig) -> bool| self.tokens[..i].iter().find(|u| same(u));
            if let Some(u) = first(&|u| u.token.is_some() && u.token == t.token) {
                return err(at("token"), &format!("has the same secret as {}", u.name));
            }
            if let Some(u) = first(&|u| u.token_env.is_some() && u.token_env == t.token_env) {
                return err(at("token_env"), &format!("has the same secret as {} (the same variable)", u.name));
            }
        }
        let mut names = HashSet::new();
        for (i, r) in self.resources.iter().enumerate() {
            let at = |field: &str| format!("cache.resources[{i}] ({}).{field}", r.name);
            if let Err(e) = validate_identifier(&r.name) {
                return err(at("name"), &e);
            }
            if crate::keys::reserved_segment(&r.name).is_some() {
                return err(at("name"), "is reserved");
            }
            if !names.insert(r.name.as_str()) {
                return err(at("name"), "duplicate resource name");
            }
            for p in &r.params {
                if let Err(e) = validate_identifier(p) {
                    return err(at("params"), &e);
                }
            }
            let used: HashSet<usize> = ResourceConfig::placeholders(&r.sql).into_iter().collect();
            let n = r.params.len();
            if let Some(k) = used.iter().find(|k| **k == 0 || **k > n) {
                return err(at("sql"), &format!("uses ${k} but the resource has {n} params"));
            }
            if let Some(k) = (1..=n).find(|k| !used.contains(k)) {
                return err(at("sql"), &format!("never uses ${k} ({})", r.params[k - 1]));
            }
            let has_tenant = r.sql.contains("$tenant");
            if r.global && has_tenant {
                return err(at("sql"), "a global resource has no $tenant");
            }
            if !r.global && !has_tenant {
                return err(at("sql"), "must filter by $tenant (Herald binds it), or set global = true");
            }
            if r.ttl_ms == 0 && r.unlimited_ttl_reason.as_deref().is_none_or(|s| s.trim().is_empty()) {
                return err(at("ttl_ms"), "0 (unlimited) needs unlimited_ttl_reason");
            }
            if r.max_staleness_ms.is_some_and(|ms| ms < MIN_STALENESS_MS) {
                return err(at("max_staleness_ms"), &too_tight);
            }
            if r.ttl_jitter_pct > 50 {
                return err(at("ttl_jitter_pct"), "must be at most 50");
            }
            if r.tags.is_empty() {
                return err(at("tags"), "a resource needs tags, or nothing could invalidate it");
            }
            for tag in &r.tags {
                if let Some(k) = ResourceConfig::placeholders(tag).into_iter().find(|k| *k == 0 || *k > n) {
                    return err(at("tags"), &format!("{tag:?} uses ${k} but the resource has {n} params"));
                }
                check_row_tag(tag, r.global, tables)
                    .map_err(|reason| Error::Config(format!("{}: {reason}", at("tags"))))?;
            }
        }
        super::command::validate(&self.commands, &self.resources, tables).map_err(Error::Config)
    }
}

/// A tag naming a table (`res_users` or `res_users.col=…`) must name a
/// watched table, its column the id or a key column, and the table's events
/// must be in the resource's scope (a tenant column for a tenant resource,
/// none for a global one): capture emits no other row tags, and events of
/// one scope never drop entries of the other, so such an entry would never
/// be invalidated.
pub(super) fn check_row_tag(tag: &str, global: bool, tables: &[TableConfig]) -> std::result::Result<(), String> {
    let head = tag.split('=').next().unwrap_or(tag);
    let (table, column) = match head.split_once('.') {
        Some((t, c)) => (t, Some(c)),
        None if tag.contains('=') => return Ok(()),
        None => (head, None),
    };
    let Some(t) = tables.iter().find(|t| t.name == table) else {
        if column.is_some() {
            return Err(format!("{tag:?}: {table:?} is not a watched table ([[tables]])"));
        }
        // A bare word: an application tag, dropped by InvalidateTags.
        return Ok(());
    };
    match (global, &t.tenant_column) {
        (false, None) => {
            return Err(format!(
                "{tag:?}: {table:?} has no tenant_column, so its events are global and never drop this tenant \
                 resource's entries (set global = true, or give the table its tenant_column)"
            ));
        }
        (true, Some(_)) => {
            return Err(format!(
                "{tag:?}: {table:?} has a tenant_column, so its events are per tenant and never drop this global \
                 resource's entries (filter by $tenant instead of global = true)"
            ));
        }
        _ => {}
    }
    match column {
        Some(c) if c != t.id_column && !t.key_columns.iter().any(|k| k == c) => Err(format!(
            "{tag:?}: {c:?} is neither the id column nor a key column of {table:?}, so no event would carry it"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Config;

    const TABLE: &str =
        "[[tables]]\nname = \"res_users\"\nkey_columns = [\"website_slug\"]\ntenant_column = \"tenant_id\"\n";

    fn load(resource: &str) -> std::result::Result<Config, String> {
        let text = format!("{TABLE}[[cache.resources]]\nname = \"r\"\nshape = \"row\"\n{resource}");
        Config::load(&text, &BTreeMap::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_shipped_config_loads() {
        let text = include_str!("../../../../deploy/herald.toml");
        let config = Config::load(text, &BTreeMap::new()).unwrap();
        assert!(config.cache.resources.iter().any(|r| r.name == "user_by_slug"));
        assert!(config.cache.tokens.iter().all(|t| t.token.is_none()), "secrets belong in the environment");
    }

    #[test]
    fn resources_are_checked_and_errors_name_the_key() {
        let ok = "sql = \"SELECT id FROM res_users WHERE tenant_id = $tenant AND website_slug = $1\"\nparams = [\"slug\"]\ntags = [\"res_users.website_slug=$1\", \"res_users.id={id}\"]\nttl_ms = 1000\n";
        load(ok).unwrap();
        let cases = [
            (ok.replace("$1\"\nparams", "$2\"\nparams"), "uses $2 but the resource has 1 params"),
            (ok.replace("[\"slug\"]", "[\"slug\", \"x\"]"), "never uses $2"),
            (ok.replace("tenant_id = $tenant AND ", ""), "must filter by $tenant"),
            (ok.replace("ttl_ms = 1000", "ttl_ms = 0"), "needs unlimited_ttl_reason"),
            (ok.replace("res_users.id={id}", "res_users.name={id}"), "neither the id column nor a key column"),
            (ok.replace("res_users.id={id}", "orders.id={id}"), "not a watched table"),
            (ok.replace("tags = [\"res_users.website_slug=$1\", \"res_users.id={id}\"]", "tags = []"), "needs tags"),
        ];
        for (text, expected) in cases {
            let err = load(&text).unwrap_err();
            assert!(err.contains("cache.resources[0] (r)") && err.contains(expected), "{err}");
        }
        let unlimited =
            ok.replace("ttl_ms = 1000", "ttl_ms = 0\nunlimited_ttl_reason = \"reference data, dropped by events\"");
        load(&unlimited).unwrap();
    }

    #[test]
    fn a_resource_and_its_tables_must_share_a_scope() {
        let text = |global: bool, sql: &str, tag: &str| {
            format!(
                "{TABLE}[[tables]]\nname = \"plans\"\n[[cache.resources]]\nname = \"r\"\nshape = \"row\"\n\
                 sql = \"{sql}\"\nparams = [\"id\"]\ntags = [\"{tag}\"]\nttl_ms = 1000\nglobal = {global}\n"
            )
        };
        let tenant_sql = "SELECT id FROM plans WHERE tenant = $tenant AND id = $1";
        let global_sql = "SELECT id FROM res_users WHERE id = $1";
        for (global, sql, tag, expected) in [
            (false, tenant_sql, "plans.id=$1", "\"plans\" has no tenant_column"),
            (false, tenant_sql, "plans", "\"plans\" has no tenant_column"),
            (true, global_sql, "res_users.id=$1", "\"res_users\" has a tenant_column"),
        ] {
            let err = Config::load(&text(global, sql, tag), &BTreeMap::new()).unwrap_err().to_string();
            assert!(err.contains("cache.resources[0] (r).tags") && err.contains(expected), "{err}");
        }
        Config::load(&text(true, "SELECT id FROM plans WHERE id = $1", "plans.id=$1"), &BTreeMap::new()).unwrap();
        let tenant_ok = "SELECT id FROM res_users WHERE tenant_id = $tenant AND id = $1";
        Config::load(&text(false, tenant_ok, "res_users.id=$1"), &BTreeMap::new()).unwrap();
    }

    #[test]
    fn tokens_are_checked() {
        let load = |t: &str| Config::load(&format!("[[cache.tokens]]\nname = \"a\"\n{t}"), &BTreeMap::new());
        assert!(load("token = \"short\"\ntenants = [\"acme\"]").unwrap_err().to_string().contains("at least 16"));
        assert!(load("tenants = [\"acme\"]").unwrap_err().to_string().contains("exactly one of token"));
        assert!(load("token_env = \"T\"\ntenants = []").unwrap_err().to_string().contains("tenants"));
        assert!(load("token_env = \"T\"\ntenants = [\"a b\"]").unwrap_err().to_string().contains("tenant id"));
        load("token_env = \"T\"\ntenants = [\"*\"]").unwrap();
        let two = |a: &str, b: &str| {
            let text = format!(
                "[[cache.tokens]]\nname = \"a\"\n{a}\ntenants = [\"acme\"]\n\
                 [[cache.tokens]]\nname = \"b\"\n{b}\ntenants = [\"*\"]\n"
            );
            Config::load(&text, &BTreeMap::new()).map_err(|e| e.to_string())
        };
        let err = two("token = \"0123456789abcdef\"", "token = \"0123456789abcdef\"").unwrap_err();
        assert!(err.contains("cache.tokens[1] (b).token") && err.contains("same secret as a"), "{err}");
        let err = two("token_env = \"T\"", "token_env = \"T\"").unwrap_err();
        assert!(err.contains("cache.tokens[1] (b).token_env") && err.contains("same secret as a"), "{err}");
        let config = two("token_env = \"T\"", "token = \"0123456789abcdef\"").unwrap();
        assert!(!format!("{config:?}").contains("0123456789abcdef"), "a secret in Debug output");
    }

    #[test]
    fn placeholders_and_refs() {
        assert_eq!(ResourceConfig::placeholders("a = $1 and b = $12 and $tenant"), vec![1, 12]);
        assert_eq!(ResourceConfig::column_refs("res_users.id={id}:{x}"), vec!["id", "x"]);
    }
}
