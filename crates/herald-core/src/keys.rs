//! Tenant, tag and Redis key types, and the whole Redis key layout: every
//! key and channel name Herald uses is built here, and nowhere else. Callers
//! never pass a raw key. `docs/redis-keys.md` lists each with its type, TTL,
//! writers, readers and Cluster slot.
//!
//! Layout (the braces are Redis Cluster hash tags, so a tenant's entries and
//! tag sets share a slot and one Lua script can delete them together):
//!
//! | what | key |
//! |---|---|
//! | cache entry of a resource | `herald:{env}:t:{<tenant>}:<resource>:<key>` |
//! | explicit cache key | `herald:{env}:t:{<tenant>}:kv:<key>` |
//! | tag set (keys holding a tag) | `herald:{env}:t:{<tenant>}:tag:<tag>` |
//! | last invalidation time of a tag | `herald:{env}:t:{<tenant>}:tv:<tag>` |
//! | fill lease of an entry | `herald:{env}:t:{<tenant>}:lease:<resource>:<key>` |
//! | fill epoch, prefix invalidations | `herald:{env}:t:{<tenant>}:epoch`, `…:prefixes` |
//! | a gateway channel and its state | `herald:{env}:t:{<tenant>}:ch:<channel>[:meta\|:hist\|:pres\|:idem:<k>]` |
//! | a gateway rate-limit bucket | `herald:{env}:t:{<tenant>}:rl:<bucket>` |
//! | global data | `herald:{env}:g:{global}:…` (same segments) |
//! | event log | `herald:{env}:events` (and `:dead` for undecodable entries) |
//! | L1 channel | `herald:{env}:l1` |
//!
//! The segment after the scope root says who owns a key ([`SEGMENTS`]); a
//! resource can never be named like a reserved segment, and a bulk
//! invalidation of the cache deletes only what the cache owns
//! ([`Segment::cache_may_sweep`]).

use std::sync::Arc;

use crate::error::{Error, Result};

// Tenant, scope and tag types live with the L1 cache (herald-l1), which
// applications embed without the rest of herald-core.
pub use herald_l1::scope::{Scope, TagKey, TenantId, validate_identifier};

const MAX_KEY_PART_LEN: usize = 512;
/// Who owns the keys under a reserved segment of a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// The cache's values (explicit keys).
    CacheValues,
    /// The cache's tag sets: rebuilt by the next fills.
    CacheTagSets,
    /// What gates fills (tag stamps, leases, epochs, prefix marks): must
    /// outlive the entries it protects.
    FillGate,
    /// The gateway's channels and rate limits: not the cache's to delete.
    Gateway,
}

impl Segment {
    /// Whether a bulk invalidation of the cache (`InvalidatePrefix`) may
    /// delete keys under this segment.
    pub fn cache_may_sweep(self) -> bool {
        matches!(self, Segment::CacheValues | Segment::CacheTagSets)
    }
}

/// Every reserved segment after a scope root, and its owner. Anything else
/// in that place is the name of a cache resource.
pub const SEGMENTS: [(&str, Segment); 8] = [
    (KV_SEGMENT, Segment::CacheValues),
    ("tag", Segment::CacheTagSets),
    ("tv", Segment::FillGate),
    ("lease", Segment::FillGate),
    ("epoch", Segment::FillGate),
    ("prefixes", Segment::FillGate),
    (CHANNEL_SEGMENT, Segment::Gateway),
    (RATE_LIMIT_SEGMENT, Segment::Gateway),
];

/// Explicit cache keys live under this segment.
pub const KV_SEGMENT: &str = "kv";
const CHANNEL_SEGMENT: &str = "ch";
const RATE_LIMIT_SEGMENT: &str = "rl";

/// The owner of `segment` when it is reserved; `None` for a resource name.
pub fn reserved_segment(segment: &str) -> Option<Segment> {
    SEGMENTS.iter().find(|(name, _)| *name == segment).map(|(_, owner)| *owner)
}

/// Checks the key namespace name: `[A-Za-z0-9_-]{1,64}`.
pub fn validate_env(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("{s:?} must be 1 to 64 of A-Z a-z 0-9 _ -"));
    }
    Ok(())
}

/// The Redis Cluster hash-tagged form of a scope (`t:{<tenant>}`,
/// `g:{global}`), used by every key of the scope.
trait HashTagged {
    fn hash_tagged(&self) -> String;
}

impl HashTagged for Scope {
    fn hash_tagged(&self) -> String {
        match self {
            Scope::Tenant(t) => format!("t:{{{t}}}"),
            Scope::Global => "g:{global}".to_string(),
        }
    }
}

/// Escapes Redis glob metacharacters (for `SCAN … MATCH`).
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
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

    /// A cache entry of `resource` (or of the explicit keys, [`KV_SEGMENT`])
    /// under `key`, both validated.
    pub fn entry(&self, scope: &Scope, resource: &str, key: &str) -> Result<String> {
        validate_key_part("resource", resource)?;
        validate_key_part("key", key)?;
        if reserved_segment(resource).is_some_and(|owner| owner != Segment::CacheValues) {
            return Err(Error::invalid("resource", format!("{resource:?} is reserved")));
        }
        Ok(format!("{}:{}:{resource}:{key}", self.prefix, scope.hash_tagged()))
    }

    /// The owner of the key `key` of `scope`, judged by its first segment
    /// after the scope root; `None` for a resource entry or a key outside
    /// the scope.
    pub fn segment_of(&self, scope: &Scope, key: &str) -> Option<Segment> {
        let rest = key.strip_prefix(&self.scope_root(scope))?;
        reserved_segment(rest.split(':').next().unwrap_or(""))
    }

    /// The pub/sub channel of a gateway channel (validated by its caller,
    /// `channel::Channel`); the channel's other keys extend it.
    pub fn channel(&self, tenant: &TenantId, channel: &str) -> String {
        format!("{}:t:{{{tenant}}}:{CHANNEL_SEGMENT}:{channel}", self.prefix)
    }

    /// A gateway rate-limit bucket of `tenant` (`bucket` is Herald's own
    /// name, such as `gateway`).
    pub fn rate_limit(&self, tenant: &TenantId, bucket: &str) -> String {
        format!("{}:t:{{{tenant}}}:{RATE_LIMIT_SEGMENT}:{bucket}", self.prefix)
    }

    /// A `SCAN` pattern matching the fill epoch of every tenant. Tenant ids
    /// never contain `}`, so it matches only epochs.
    pub fn every_tenant_fill_epoch(&self) -> String {
        format!("{}:t:{{*}}:epoch", self.prefix)
    }

    /// A `SCAN` pattern matching the set of `tag` in every tenant's scope.
    pub fn every_tenant_tag_set(&self, tag: &str) -> String {
        format!("{}:t:{{*}}:tag:{}", self.prefix, glob_escape(tag))
    }

    /// The tag version key that belongs to a tag set key built by
    /// [`KeySpace::tag_set`].
    pub fn tag_version_of_set(&self, tag_set: &str) -> String {
        tag_set.replacen("}:tag:", "}:tv:", 1)
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
        assert_eq!(ks.tag_version(&TagKey::new(acme.clone(), "x")), "herald:prod:t:{acme}:tv:x");
        let tenant = TenantId::new("acme").unwrap();
        assert_eq!(ks.channel(&tenant, "team:1"), "herald:prod:t:{acme}:ch:team:1");
        assert_eq!(ks.rate_limit(&tenant, "gateway"), "herald:prod:t:{acme}:rl:gateway");
        assert_eq!(ks.every_tenant_tag_set("a*b"), "herald:prod:t:{*}:tag:a\\*b");
        let set = ks.tag_set(&TagKey::new(acme, "x"));
        assert_eq!(ks.tag_version_of_set(&set), "herald:prod:t:{acme}:tv:x");
    }

    #[test]
    fn every_key_says_who_owns_it() {
        let ks = KeySpace::new("prod").unwrap();
        let acme = Scope::Tenant(TenantId::new("acme").unwrap());
        let tenant = TenantId::new("acme").unwrap();
        let entry = ks.entry(&acme, "user_by_slug", "alice").unwrap();
        assert_eq!(ks.segment_of(&acme, &entry), None);
        assert_eq!(ks.segment_of(&acme, &ks.entry(&acme, KV_SEGMENT, "k").unwrap()), Some(Segment::CacheValues));
        assert_eq!(ks.segment_of(&acme, &ks.tag_set(&TagKey::new(acme.clone(), "t"))), Some(Segment::CacheTagSets));
        for gate in [
            ks.lease(&entry),
            ks.fill_epoch(&acme),
            ks.prefix_marks(&acme),
            ks.tag_version(&TagKey::new(acme.clone(), "t")),
        ] {
            assert_eq!(ks.segment_of(&acme, &gate), Some(Segment::FillGate), "{gate}");
        }
        for gateway in [
            ks.channel(&tenant, "team:1"),
            format!("{}:meta", ks.channel(&tenant, "x")),
            ks.rate_limit(&tenant, "gateway"),
        ] {
            assert_eq!(ks.segment_of(&acme, &gateway), Some(Segment::Gateway), "{gateway}");
            assert!(!Segment::Gateway.cache_may_sweep());
        }
        assert_eq!(ks.segment_of(&Scope::Global, &entry), None, "a key outside the scope");
    }

    #[test]
    fn no_resource_can_take_a_reserved_segment() {
        let ks = KeySpace::new("p").unwrap();
        for (segment, owner) in SEGMENTS {
            let taken = ks.entry(&Scope::Global, segment, "x");
            assert_eq!(taken.is_ok(), owner == Segment::CacheValues, "{segment}");
        }
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
