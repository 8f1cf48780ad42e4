//! Tenant, tag and Redis key types. Herald builds every key itself; callers
//! never pass a raw key.
//!
//! Layout (the braces are Redis Cluster hash tags, so a tenant's entries and
//! tag sets share a slot and one Lua script can delete them together):
//!
//! | what | key |
//! |---|---|
//! | cache entry | `herald:{env}:t:{<tenant>}:<resource>:<key>` |
//! | tag set (keys holding a tag) | `herald:{env}:t:{<tenant>}:tag:<tag>` |
//! | last invalidation time of a tag | `herald:{env}:t:{<tenant>}:tv:<tag>` |
//! | fill lease of an entry | `herald:{env}:t:{<tenant>}:lease:<resource>:<key>` |
//! | fill epoch, prefix invalidations | `herald:{env}:t:{<tenant>}:epoch`, `…:prefixes` |
//! | global data | `herald:{env}:g:{global}:…` |
//! | event log | `herald:{env}:events` (and `:dead` for undecodable entries) |
//! | L1 channel | `herald:{env}:l1` |

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

const MAX_TENANT_LEN: usize = 64;
const MAX_KEY_PART_LEN: usize = 512;
/// Segments after the scope that are Herald's bookkeeping, never a resource.
pub const RESERVED_SEGMENTS: [&str; 5] = ["tag", "tv", "lease", "epoch", "prefixes"];

/// Checks an SQL identifier from configuration: `[a-z_][a-z0-9_]*`, at most
/// 63 bytes. Identifiers are also quoted where they are used.
pub fn validate_identifier(s: &str) -> std::result::Result<(), String> {
    let mut chars = s.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !ok_first || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') || s.len() > 63 {
        return Err(format!("{s:?} is not a valid identifier (lowercase letters, digits and _, at most 63 bytes)"));
    }
    Ok(())
}

/// Checks the key namespace name: `[A-Za-z0-9_-]{1,64}`.
pub fn validate_env(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("{s:?} must be 1 to 64 of A-Z a-z 0-9 _ -"));
    }
    Ok(())
}

/// A validated tenant id: 1 to 64 of `A-Z a-z 0-9 _ - .`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    pub fn new(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > MAX_TENANT_LEN {
            return Err(Error::invalid("tenant id", format!("must be 1 to {MAX_TENANT_LEN} bytes")));
        }
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
            return Err(Error::invalid("tenant id", format!("character {c:?} is not allowed")));
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whose data a key or tag belongs to: one tenant, or the explicit global
/// namespace (tables without a tenant column).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Tenant(TenantId),
    Global,
}

impl Scope {
    /// The scope of an event's tenant field: empty means global.
    pub fn from_event_tenant(tenant: &str) -> Result<Self> {
        if tenant.is_empty() { Ok(Scope::Global) } else { TenantId::new(tenant).map(Scope::Tenant) }
    }

    fn hash_tagged(&self) -> String {
        match self {
            Scope::Tenant(t) => format!("t:{{{t}}}"),
            Scope::Global => "g:{global}".to_string(),
        }
    }
}

/// A tag within a scope: what cache entries are indexed by and what events
/// invalidate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagKey {
    pub scope: Scope,
    pub tag: Arc<str>,
}

impl TagKey {
    pub fn new(scope: Scope, tag: impl Into<Arc<str>>) -> Self {
        Self { scope, tag: tag.into() }
    }
}

/// Checks one caller-supplied part of a key (a resource name or key).
pub fn validate_key_part(what: &'static str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_KEY_PART_LEN {
        return Err(Error::invalid(what, format!("must be 1 to {MAX_KEY_PART_LEN} bytes")));
    }
    if let Some(c) = s.chars().find(|c| c.is_control() || c.is_whitespace() || matches!(c, '{' | '}')) {
        return Err(Error::invalid(what, format!("character {c:?} is not allowed")));
    }
    Ok(())
}

/// Builds the Redis keys of one installation (`herald:{env}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    prefix: Arc<str>,
}

impl KeySpace {
    pub fn new(env: &str) -> Result<Self> {
        validate_env(env).map_err(|reason| Error::InvalidArgument { what: "env", reason })?;
        Ok(Self { prefix: format!("herald:{env}").into() })
    }

    /// `herald:{env}`: every key of the installation starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The durable event log (a Redis stream).
    pub fn stream(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Where broadcast moves stream entries it cannot decode.
    pub fn dead_stream(&self) -> String {
        format!("{}:events:dead", self.prefix)
    }

    /// The L1 invalidation pub/sub channel.
    pub fn l1_channel(&self) -> String {
        format!("{}:l1", self.prefix)
    }

    /// The set of cache keys that hold `tag`.
    pub fn tag_set(&self, tag: &TagKey) -> String {
        format!("{}:{}:tag:{}", self.prefix, tag.scope.hash_tagged(), tag.tag)
    }

    /// A cache entry of `resource` under `key`, both validated.
    pub fn entry(&self, scope: &Scope, resource: &str, key: &str) -> Result<String> {
        validate_key_part("resource", resource)?;
        validate_key_part("key", key)?;
        if RESERVED_SEGMENTS.contains(&resource) {
            return Err(Error::invalid("resource", format!("{resource:?} is reserved")));
        }
        Ok(format!("{}:{}:{resource}:{key}", self.prefix, scope.hash_tagged()))
    }

    /// When `tag` was last invalidated (Redis server time, microseconds).
    pub fn tag_version(&self, tag: &TagKey) -> String {
        format!("{}:{}:tv:{}", self.prefix, tag.scope.hash_tagged(), tag.tag)
    }

    /// The cross-node fill lease of an entry key built by [`KeySpace::entry`].
    pub fn lease(&self, entry: &str) -> String {
        let root = self.root_len(entry);
        format!("{}lease:{}", &entry[..root], &entry[root..])
    }

    /// Where every key of `scope` starts: `herald:{env}:t:{<tenant>}:`.
    pub fn scope_root(&self, scope: &Scope) -> String {
        format!("{}:{}:", self.prefix, scope.hash_tagged())
    }

    /// The fill epoch of `scope`: changes when Redis loses its data, so fills
    /// started before cannot be stored after.
    pub fn fill_epoch(&self, scope: &Scope) -> String {
        format!("{}:{}:epoch", self.prefix, scope.hash_tagged())
    }

    /// Recent prefix invalidations of `scope` (prefix → time).
    pub fn prefix_marks(&self, scope: &Scope) -> String {
        format!("{}:{}:prefixes", self.prefix, scope.hash_tagged())
    }

    /// The scope root of an entry key: the byte length of
    /// `herald:{env}:t:{<tenant>}:`.
    fn root_len(&self, entry: &str) -> usize {
        entry.find('}').map_or(0, |i| i + 2).min(entry.len())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn layout() {
        let ks = KeySpace::new("prod").unwrap();
        let acme = Scope::Tenant(TenantId::new("acme").unwrap());
        assert_eq!(ks.entry(&acme, "user_by_slug", "alice").unwrap(), "herald:prod:t:{acme}:user_by_slug:alice");
        assert_eq!(ks.tag_set(&TagKey::new(acme.clone(), "res_users.id=5")), "herald:prod:t:{acme}:tag:res_users.id=5");
        assert_eq!(ks.tag_set(&TagKey::new(Scope::Global, "x")), "herald:prod:g:{global}:tag:x");
        assert_eq!(ks.stream(), "herald:prod:events");
        let entry = ks.entry(&acme, "user_by_slug", "alice").unwrap();
        assert_eq!(ks.lease(&entry), "herald:prod:t:{acme}:lease:user_by_slug:alice");
        assert_eq!(ks.scope_root(&acme), "herald:prod:t:{acme}:");
        assert_eq!(ks.fill_epoch(&acme), "herald:prod:t:{acme}:epoch");
        assert_eq!(ks.tag_version(&TagKey::new(acme, "x")), "herald:prod:t:{acme}:tv:x");
    }

    #[test]
    fn rejects_bad_parts() {
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a:b").is_err());
        assert!(TenantId::new("a}b").is_err());
        assert!(TenantId::new(&"x".repeat(65)).is_err());
        let ks = KeySpace::new("p").unwrap();
        assert!(ks.entry(&Scope::Global, "tag", "x").is_err());
        assert!(ks.entry(&Scope::Global, "lease", "x").is_err());
        assert!(ks.entry(&Scope::Global, "r", "a b").is_err());
        assert!(ks.entry(&Scope::Global, "r", "{x}").is_err());
        assert!(KeySpace::new("a:b").is_err());
    }

    proptest! {
        // Any accepted tenant keeps its hash tag intact: exactly one `{`, one `}`.
        #[test]
        fn accepted_tenants_make_one_hash_tag(s in "\\PC{0,80}") {
            if let Ok(t) = TenantId::new(&s) {
                let key = KeySpace::new("e").unwrap().entry(&Scope::Tenant(t), "r", "k").unwrap();
                prop_assert_eq!(key.matches('{').count(), 1);
                prop_assert_eq!(key.matches('}').count(), 1);
            }
        }

        // Distinct (tenant, key) pairs never map to the same Redis key.
        #[test]
        fn keys_are_injective(a in "[a-z]{1,5}", b in "[a-z]{1,5}", k1 in "[a-z:]{1,6}", k2 in "[a-z:]{1,6}") {
            let ks = KeySpace::new("e").unwrap();
            let x = ks.entry(&Scope::Tenant(TenantId::new(&a).unwrap()), "r", &k1).unwrap();
            let y = ks.entry(&Scope::Tenant(TenantId::new(&b).unwrap()), "r", &k2).unwrap();
            prop_assert_eq!(x == y, a == b && k1 == k2);
        }
    }
}
