//! The gateway's section, `[gateway]`: listeners, token keys, service tokens,
//! channel namespaces and limits.
//!
//! Secrets (HS256 secrets, service tokens) should come from the environment,
//! e.g. `HERALD_GATEWAY__JWT_KEYS='[{kid="k1", hs256_secret="…"}]'`; a key may
//! also name an environment variable (`hs256_secret_env`, `rs256_public_pem_env`,
//! `token_env`) that is read at start.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::validate_identifier;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address of the ops HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub ops_addr: String,
    /// Address of the WebSocket (`/v1/ws`) and HTTP publish (`/v1/publish`) listener.
    pub listen_addr: String,
    /// Address of the gRPC listener (`herald.v1.Publisher`).
    pub grpc_addr: String,
    /// Keys that verify client tokens, chosen by the token's `kid`.
    pub jwt_keys: Vec<JwtKey>,
    /// Clock skew allowed when checking `exp` and `nbf`, seconds. A socket
    /// is closed (4502) once its token's `exp` plus this has passed.
    pub jwt_leeway_s: u64,
    /// When set, tokens must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// When set, tokens must carry this `aud` (or list it).
    pub jwt_audience: Option<String>,
    /// Bearer tokens of the app servers that may publish.
    pub service_tokens: Vec<ServiceToken>,
    /// Channel namespaces (`team` in `team:42`); other namespaces are refused.
    pub namespaces: Vec<NamespaceConfig>,
    pub limits: GatewayLimits,
    /// Presence entries expire this long after their last heartbeat.
    pub presence_ttl_ms: u64,
    /// Time a client has to send its `connect` frame.
    pub connect_timeout_ms: u64,
    /// On shutdown, sockets are told to reconnect and closed within this.
    pub shutdown_grace_ms: u64,
    /// Clients are advised to wait a random time up to this before
    /// reconnecting after a shutdown close.
    pub reconnect_jitter_ms: u64,
    /// The ops channel: when set, broadcast and every gateway publish a
    /// stats message on it each `interval_ms`, and only tokens of its
    /// tenant may subscribe to its namespace.
    pub ops: Option<OpsChannelConfig>,
}

/// `[gateway.ops]`: where the live console's stats are published.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsChannelConfig {
    /// The ops tenant: the only tenant whose tokens may subscribe to the
    /// channel's namespace (in any tenant).
    pub tenant: String,
    /// The channel, `namespace:id`; its namespace must be configured.
    pub channel: String,
    /// Each publisher sends one stats message this often.
    pub interval_ms: u64,
}

impl Default for OpsChannelConfig {
    fn default() -> Self {
        Self { tenant: "ops".into(), channel: "ops:stats".into(), interval_ms: 1_000 }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            ops_addr: "0.0.0.0:9104".into(),
            listen_addr: "0.0.0.0:8081".into(),
            grpc_addr: "0.0.0.0:50052".into(),
            jwt_keys: Vec::new(),
            jwt_leeway_s: 5,
            jwt_issuer: None,
            jwt_audience: None,
            service_tokens: Vec::new(),
            namespaces: vec![NamespaceConfig::default()],
            limits: GatewayLimits::default(),
            presence_ttl_ms: 30_000,
            connect_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            reconnect_jitter_ms: 5_000,
            ops: None,
        }
    }
}

/// One token verification key. Exactly one of the key fields is set; the
/// algorithm follows from it (a token's own `alg` must match).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    pub kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rs256_public_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rs256_public_pem_env: Option<String>,
}

impl JwtKey {
    /// The key's algorithm (`"HS256"` or `"RS256"`) and material (the
    /// secret, or the PEM text), reading the named environment variable if
    /// needed.
    pub fn material(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<(&'static str, String), String> {
        let from_env = |name: &str| env(name).ok_or_else(|| format!("environment variable {name} is not set"));
        match (&self.hs256_secret, &self.hs256_secret_env, &self.rs256_public_pem, &self.rs256_public_pem_env) {
            (Some(s), None, None, None) => Ok(("HS256", s.clone())),
            (None, Some(n), None, None) => from_env(n).map(|s| ("HS256", s)),
            (None, None, Some(p), None) => Ok(("RS256", p.clone())),
            (None, None, None, Some(n)) => from_env(n).map(|p| ("RS256", p)),
            _ => {
                Err("set exactly one of hs256_secret, hs256_secret_env, rs256_public_pem, rs256_public_pem_env".into())
            }
        }
    }
}

/// An app server's publish credential.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceToken {
    /// Who this is (logs and metrics), e.g. `billing-api`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Environment variable holding the token, instead of `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Tenants it may publish to; `["*"]` means all.
    pub tenants: Vec<String>,
}

impl ServiceToken {
    pub fn secret(&self, env: impl Fn(&str) -> Option<String>) -> std::result::Result<String, String> {
        match (&self.token, &self.token_env) {
            (Some(t), None) => Ok(t.clone()),
            (None, Some(n)) => env(n).ok_or_else(|| format!("environment variable {n} is not set")),
            _ => Err("set exactly one of token, token_env".into()),
        }
    }
}

/// A channel namespace and its options.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    pub name: String,
    /// Publications kept per channel for recovery (0: no history, and a
    /// reconnecting client always gets `recovered: false`).
    pub history_size: u64,
    /// History (and the channel's offset and epoch) expire this long after
    /// the last publication.
    pub history_ttl_s: u64,
    /// Whether the channel keeps a presence set (who is subscribed).
    pub presence: bool,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self { name: "team".into(), history_size: 100, history_ttl_s: 600, presence: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayLimits {
    /// Sockets one gateway node holds at most; more are refused (HTTP 503).
    pub max_connections: usize,
    /// New connections per second a node accepts (burst: the same number).
    pub connections_per_s: u32,
    /// Bytes waiting to be written to one socket before it is closed as slow.
    pub max_queue_bytes: usize,
    /// Largest frame a client may send, bytes.
    pub max_frame_bytes: usize,
    /// Largest publication payload (`data` as JSON), bytes.
    pub max_publication_bytes: usize,
    /// Channels one connection may be subscribed to.
    pub max_subscriptions_per_connection: usize,
    /// Commands one connection may send per second (burst: twice this plus
    /// `max_subscriptions_per_connection`, so a client may subscribe to all
    /// its channels at connect).
    pub connection_commands_per_s: u32,
    /// Connects and subscribes of WebSocket clients per second for one
    /// tenant across all gateway nodes (a token bucket in Redis; each node
    /// falls back to a local bucket of the same size while Redis is down).
    pub tenant_ops_per_s: u32,
    /// Publish API calls per second for one tenant across all gateway
    /// nodes: a bucket of its own, so untrusted clients cannot use up the
    /// app servers' publications.
    pub publish_ops_per_s: u32,
    /// Server pings this often; a client that has not answered (any frame) in
    /// `ping_timeout_ms` is closed.
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            connections_per_s: 2_000,
            max_queue_bytes: 1 << 20,
            max_frame_bytes: 64 * 1024,
            max_publication_bytes: 64 * 1024,
            max_subscriptions_per_connection: 128,
            connection_commands_per_s: 50,
            tenant_ops_per_s: 5_000,
            publish_ops_per_s: 5_000,
            ping_interval_ms: 25_000,
            ping_timeout_ms: 60_000,
        }
    }
}

impl GatewayConfig {
    /// The options of namespace `name`.
    pub fn namespace(&self, name: &str) -> Option<&NamespaceConfig> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    /// Checks the section; errors name the key (`gateway.…`).
    pub(crate) fn validate(&self) -> Result<()> {
        let err = |key: String, reason: &str| Err(Error::Config(format!("gateway.{key}: {reason}")));
        let l = &self.limits;
        let positive = [
            ("limits.max_connections", l.max_connections as u64),
            ("limits.connections_per_s", l.connections_per_s as u64),
            ("limits.max_subscriptions_per_connection", l.max_subscriptions_per_connection as u64),
            ("limits.connection_commands_per_s", l.connection_commands_per_s as u64),
            ("limits.tenant_ops_per_s", l.tenant_ops_per_s as u64),
            ("limits.publish_ops_per_s", l.publish_ops_per_s as u64),
            ("limits.ping_interval_ms", l.ping_interval_ms),
            ("presence_ttl_ms", self.presence_ttl_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return err(key.into(), "must be greater than 0");
            }
        }
        if l.max_frame_bytes < 1024 {
            return err("limits.max_frame_bytes".into(), "must be at least 1024");
        }
        if l.max_publication_bytes < 16 {
            return err("limits.max_publication_bytes".into(), "must be at least 16");
        }
        if l.max_queue_bytes < l.max_publication_bytes + 1024 {
            return err("limits.max_queue_bytes".into(), "must exceed limits.max_publication_bytes by at least 1024");
        }
        if l.ping_timeout_ms <= l.ping_interval_ms {
            return err("limits.ping_timeout_ms".into(), "must be longer than limits.ping_interval_ms");
        }
        let mut names = HashSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            let key = |field: &str| format!("namespaces[{i}].{field}");
            if let Err(e) = validate_identifier(&ns.name) {
                return err(key("name"), &e);
            }
            if !names.insert(ns.name.as_str()) {
                return err(key("name"), "duplicate namespace");
            }
            if ns.history_size > 1_000_000 {
                return err(key("history_size"), "must be at most 1000000");
            }
            if ns.history_size > 0 && ns.history_ttl_s == 0 {
                return err(key("history_ttl_s"), "must be greater than 0 when history_size is");
            }
        }
        if let Some(ops) = &self.ops {
            if let Err(e) = crate::keys::TenantId::new(&ops.tenant) {
                return err("ops.tenant".into(), &e.to_string());
            }
            let channel = crate::channel::Channel::parse(&ops.channel);
            match channel {
                Err(e) => return err("ops.channel".into(), &e.to_string()),
                Ok(c) if self.namespace(c.namespace()).is_none() => {
                    return err("ops.channel".into(), "its namespace is not in gateway.namespaces");
                }
                Ok(_) => {}
            }
            if ops.interval_ms == 0 {
                return err("ops.interval_ms".into(), "must be greater than 0");
            }
        }
        let mut kids = HashSet::new();
        for (i, k) in self.jwt_keys.iter().enumerate() {
            if k.kid.is_empty() || k.kid.len() > 128 {
                return err(format!("jwt_keys[{i}].kid"), "must be 1 to 128 bytes");
            }
            if !kids.insert(k.kid.as_str()) {
                return err(format!("jwt_keys[{i}].kid"), "duplicate kid");
            }
            // Only the shape is checked here; environment variables are read
            // (and PEM parsed) when the gateway starts.
            let set = [&k.hs256_secret, &k.hs256_secret_env, &k.rs256_public_pem, &k.rs256_public_pem_env]
                .iter()
                .filter(|v| v.is_some())
                .count();
            if set != 1 {
                return err(
                    format!("jwt_keys[{i}]"),
                    "set exactly one of hs256_secret, hs256_secret_env, rs256_public_pem, rs256_public_pem_env",
                );
            }
            if let Some(s) = &k.hs256_secret
                && s.len() < 32
            {
                return err(format!("jwt_keys[{i}].hs256_secret"), "must be at least 32 bytes");
            }
        }
        for (i, t) in self.service_tokens.iter().enumerate() {
            if t.name.is_empty() {
                return err(format!("service_tokens[{i}].name"), "must not be empty");
            }
            if t.token.is_some() == t.token_env.is_some() {
                return err(format!("service_tokens[{i}]"), "set exactly one of token, token_env");
            }
            if let Some(s) = &t.token
                && s.len() < 16
            {
                return err(format!("service_tokens[{i}].token"), "must be at least 16 bytes");
            }
            if t.tenants.is_empty() {
                return err(format!("service_tokens[{i}].tenants"), "must name at least one tenant, or \"*\"");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(text: &str) -> crate::Result<Config> {
        Config::load(text, &Default::default())
    }

    #[test]
    fn defaults_are_valid_and_namespaces_parse() {
        let c = load(
            "[[gateway.namespaces]]\nname = \"team\"\nhistory_size = 50\n\
             [[gateway.namespaces]]\nname = \"alerts\"\npresence = false\n",
        )
        .unwrap();
        assert_eq!(c.gateway.namespaces.len(), 2);
        assert_eq!(c.gateway.namespace("team").unwrap().history_size, 50);
        assert!(!c.gateway.namespace("alerts").unwrap().presence);
        assert!(c.gateway.namespace("repo").is_none());
    }

    #[test]
    fn the_ops_channel_needs_a_configured_namespace() {
        let ns = "[[gateway.namespaces]]\nname = \"ops\"\n";
        let c = load(&format!("[gateway.ops]\ntenant = \"ops\"\n{ns}")).unwrap();
        assert_eq!(c.gateway.ops.unwrap().channel, "ops:stats");
        let e = load("[gateway.ops]\ntenant = \"ops\"\n").unwrap_err().to_string();
        assert!(e.contains("gateway.ops.channel"), "{e}");
        let e = load(&format!("[gateway.ops]\ntenant = \"no tenant\"\n{ns}")).unwrap_err().to_string();
        assert!(e.contains("gateway.ops.tenant"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(
            "[[gateway.namespaces]]\nname = \"a\"\n[[gateway.namespaces]]\nname = \"b\"\nhistory_size = 2000000\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("gateway.namespaces[1].history_size"), "{e}");
        let e = load("[[gateway.namespaces]]\nname = \"Team!\"\n").unwrap_err().to_string();
        assert!(e.contains("gateway.namespaces[0].name"), "{e}");
        let e = load("[[gateway.jwt_keys]]\nkid = \"k\"\nhs256_secret = \"short\"\n").unwrap_err().to_string();
        assert!(e.contains("gateway.jwt_keys[0].hs256_secret"), "{e}");
        let e = load("[[gateway.jwt_keys]]\nkid = \"k\"\n").unwrap_err().to_string();
        assert!(e.contains("gateway.jwt_keys[0]"), "{e}");
        let e = load("[gateway.limits]\nmax_queue_bytes = 10\n").unwrap_err().to_string();
        assert!(e.contains("gateway.limits.max_queue_bytes"), "{e}");
        let e = load("[[gateway.service_tokens]]\nname = \"app\"\ntoken = \"0123456789abcdef\"\ntenants = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.service_tokens[0].tenants"), "{e}");
    }

    #[test]
    fn keys_come_from_the_environment() {
        let env: std::collections::BTreeMap<String, String> =
            [("HERALD_GATEWAY__JWT_KEYS".to_string(), "[{kid = \"k1\", hs256_secret_env = \"K1\"}]".to_string())]
                .into();
        let c = Config::load("", &env).unwrap();
        let material = c.gateway.jwt_keys[0].material(|n| (n == "K1").then(|| "s".repeat(32)));
        assert_eq!(material, Ok(("HS256", "s".repeat(32))));
        assert!(c.gateway.jwt_keys[0].material(|_| None).is_err());
    }
}
