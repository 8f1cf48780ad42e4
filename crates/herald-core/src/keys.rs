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
//! | write-behind command stream, dead commands, writer lease, applied patches | `herald:{env}:t:{<tenant>}:commands[:dead\|:lease\|:applied]` |
//! | write-behind overlay of a resource entry | `herald:{env}:t:{<tenant>}:overlay:<resource>:<key>` |
//! | tenants with write-behind work | `herald:{env}:commands:tenants` |
//! | global data | `herald:{env}:g:{global}:…` (same segments) |
//! | event log | `herald:{env}:events` (and `:dead` for undecodable entries) |
//! | L1 channel | `herald:{env}:l1` |
//! | event log partition `i` of `n > 1` | `herald:{env}:events:{p<i>.<k>}` |
//! | L1 channel of partition `i` of `n > 1` | `herald:{env}:l1:{p<i>.<k>}` |
//!
//! **Slots.** [`slot`] is Redis Cluster's `CRC16(hash tag) mod 16384`;
//! [`one_slot`] is checked before every multi-key script, so a script that
//! would span slots fails here, with the keys named, instead of with
//! `CROSSSLOT` on a cluster only. A partition's hash tag `p<i>.<k>` takes the
//! smallest `k` whose slot lies in the `i`-th `n`-th of the slot space, so
//! partitions spread over the masters of an evenly sliced cluster (what
//! `redis-cli --cluster create` makes), and partition `i`'s stream and L1
//! channel share a slot (one master).
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

/// Redis Cluster's hash slots.
pub const SLOTS: u16 = 16384;
/// Most partitions of the event log (`redis.partitions`).
pub const MAX_PARTITIONS: u16 = 1024;
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
    /// Write-behind commands and their overlays: writes not yet in
    /// Postgres, never the cache's to delete.
    WriteBehind,
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
pub const SEGMENTS: [(&str, Segment); 10] = [
    (KV_SEGMENT, Segment::CacheValues),
    ("tag", Segment::CacheTagSets),
    ("tv", Segment::FillGate),
    ("lease", Segment::FillGate),
    ("epoch", Segment::FillGate),
    ("prefixes", Segment::FillGate),
    (CHANNEL_SEGMENT, Segment::Gateway),
    (RATE_LIMIT_SEGMENT, Segment::Gateway),
    (COMMANDS_SEGMENT, Segment::WriteBehind),
    (OVERLAY_SEGMENT, Segment::WriteBehind),
];

/// Explicit cache keys live under this segment.
pub const KV_SEGMENT: &str = "kv";
const CHANNEL_SEGMENT: &str = "ch";
const RATE_LIMIT_SEGMENT: &str = "rl";
const COMMANDS_SEGMENT: &str = "commands";
const OVERLAY_SEGMENT: &str = "overlay";

/// The owner of `segment` when it is reserved; `None` for a resource name.
pub fn reserved_segment(segment: &str) -> Option<Segment> {
    SEGMENTS.iter().find(|(name, _)| *name == segment).map(|(_, owner)| *owner)
}

/// The Redis Cluster hash slot of `key` (of its `{…}` hash tag, if any).
pub fn slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// The one slot of `keys`, or an error naming two keys on different slots:
/// every key of a script (or of any multi-key command) must share a slot.
pub fn one_slot(keys: &[String]) -> Result<u16> {
    let Some(first) = keys.first() else { return Ok(0) };
    let want = slot(first);
    match keys.iter().find(|k| slot(k) != want) {
        None => Ok(want),
        Some(other) => {
            Err(Error::invalid("key set", format!("{first:?} and {other:?} are on different cluster slots")))
        }
    }
}

/// The partition of the event log (and L1 channel) that carries `tenant`'s
/// events: FNV-1a of the tenant id mod `partitions`, fixed forever. Global
/// and all-tenant events (empty tenant) go to partition 0.
pub fn partition_of(tenant: &str, partitions: u16) -> u16 {
    if tenant.is_empty() || partitions <= 1 {
        return 0;
    }
    (crate::hash::fnv1a64(tenant.as_bytes()) % u64::from(partitions)) as u16
}

/// The hash tag of partition `i` of `n` (see the module docs): `p<i>.<k>`.
fn partition_tag(i: u16, n: u16) -> String {
    let (lo, hi) =
        (u32::from(i) * u32::from(SLOTS) / u32::from(n), (u32::from(i) + 1) * u32::from(SLOTS) / u32::from(n));
    (0u32..)
        .map(|k| format!("p{i}.{k}"))
        .find(|tag| (lo..hi).contains(&u32::from(slot(tag))))
        .expect("every slice of the slot space is reached")
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

    /// Each cache-api node's applied freshness watermark: a hash of node name
    /// → `<watermark lsn>:<Redis time ms of the update>`. A write-through
    /// call waits until every node updated recently (live) is past its commit.
    pub fn node_watermarks(&self) -> String {
        format!("{}:nodes:watermarks", self.prefix)
    }

    /// The L1 invalidation pub/sub channel (the only one with a single
    /// partition).
    pub fn l1_channel(&self) -> String {
        format!("{}:l1", self.prefix)
    }

    /// The stream of event log partition `i` of `n`: [`KeySpace::stream`]
    /// when `n` is 1.
    pub fn stream_partition(&self, i: u16, n: u16) -> String {
        if n <= 1 { self.stream() } else { format!("{}:events:{{{}}}", self.prefix, partition_tag(i, n)) }
    }

    /// The L1 channel of partition `i` of `n` (on the slot of its stream):
    /// [`KeySpace::l1_channel`] when `n` is 1.
    pub fn l1_partition_channel(&self, i: u16, n: u16) -> String {
        if n <= 1 { self.l1_channel() } else { format!("{}:l1:{{{}}}", self.prefix, partition_tag(i, n)) }
    }

    /// The L1 channels of every partition, in partition order.
    pub fn l1_channels(&self, n: u16) -> Vec<String> {
        (0..n.max(1)).map(|i| self.l1_partition_channel(i, n)).collect()
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

    /// `tenant`'s write-behind command stream: one entry per enqueued
    /// command, in order, deleted once applied (or moved aside).
    pub fn commands(&self, tenant: &TenantId) -> String {
        format!("{}:t:{{{tenant}}}:{COMMANDS_SEGMENT}", self.prefix)
    }

    /// Where `tenant`'s poison commands go, with their reason.
    pub fn dead_commands(&self, tenant: &TenantId) -> String {
        format!("{}:dead", self.commands(tenant))
    }

    /// The lease of the one writer applying `tenant`'s commands.
    pub fn command_lease(&self, tenant: &TenantId) -> String {
        format!("{}:lease", self.commands(tenant))
    }

    /// `tenant`'s applied overlay patches not yet retired: a sorted set of
    /// `<overlay key> <field>` scored by the commit position.
    pub fn applied_patches(&self, tenant: &TenantId) -> String {
        format!("{}:applied", self.commands(tenant))
    }

    /// The overlay of one entry of `resource` (a hash: stream entry id →
    /// patch), validated like [`KeySpace::entry`].
    pub fn overlay(&self, tenant: &TenantId, resource: &str, key: &str) -> Result<String> {
        validate_key_part("resource", resource)?;
        validate_key_part("key", key)?;
        Ok(format!("{}:t:{{{tenant}}}:{OVERLAY_SEGMENT}:{resource}:{key}", self.prefix))
    }

    /// Whether `key` is an overlay of `tenant`'s (a stream entry names the
    /// overlay its patch went to; a writer must not touch another tenant's).
    pub fn is_overlay_of(&self, tenant: &TenantId, key: &str) -> bool {
        key.starts_with(&format!("{}:t:{{{tenant}}}:{OVERLAY_SEGMENT}:", self.prefix))
    }

    /// The tenant of a key in a tenant's slot (`…:t:{<tenant>}:…`), such as
    /// one [`KeySpace::every_tenant_commands`] matched.
    pub fn tenant_of(&self, key: &str) -> Option<TenantId> {
        let rest = key.strip_prefix(&*self.prefix)?.strip_prefix(":t:{")?;
        TenantId::new(rest.split_once('}')?.0).ok()
    }

    /// The tenants that may have write-behind work (commands to apply or
    /// patches to retire): how writers find the streams.
    pub fn command_tenants(&self) -> String {
        format!("{}:{COMMANDS_SEGMENT}:tenants", self.prefix)
    }

    /// A `SCAN` pattern matching every tenant's write-behind command stream
    /// (the writers' backstop, should a tenant miss its listing).
    pub fn every_tenant_commands(&self) -> String {
        format!("{}:t:{{*}}:{COMMANDS_SEGMENT}", self.prefix)
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
        assert_eq!(ks.node_watermarks(), "herald:prod:nodes:watermarks");
        let entry = ks.entry(&acme, "user_by_slug", "alice").unwrap();
        assert_eq!(ks.lease(&entry), "herald:prod:t:{acme}:lease:user_by_slug:alice");
        assert_eq!(ks.scope_root(&acme), "herald:prod:t:{acme}:");
        assert_eq!(ks.fill_epoch(&acme), "herald:prod:t:{acme}:epoch");
        assert_eq!(ks.tag_version(&TagKey::new(acme.clone(), "x")), "herald:prod:t:{acme}:tv:x");
        let tenant = TenantId::new("acme").unwrap();
        assert_eq!(ks.channel(&tenant, "team:1"), "herald:prod:t:{acme}:ch:team:1");
        assert_eq!(ks.rate_limit(&tenant, "gateway"), "herald:prod:t:{acme}:rl:gateway");
        assert_eq!(ks.commands(&tenant), "herald:prod:t:{acme}:commands");
        assert_eq!(ks.dead_commands(&tenant), "herald:prod:t:{acme}:commands:dead");
        assert_eq!(ks.overlay(&tenant, "user_by_id", "5").unwrap(), "herald:prod:t:{acme}:overlay:user_by_id:5");
        let overlay = ks.overlay(&tenant, "user_by_id", "5").unwrap();
        assert!(ks.is_overlay_of(&tenant, &overlay));
        assert!(!ks.is_overlay_of(&TenantId::new("globex").unwrap(), &overlay));
        assert!(!ks.is_overlay_of(&tenant, &ks.commands(&tenant)));
        assert_eq!(ks.tenant_of(&ks.commands(&tenant)), Some(tenant.clone()));
        assert_eq!(ks.tenant_of("herald:other:t:{acme}:commands"), None);
        assert!(ks.overlay(&tenant, "user_by_id", "a b").is_err());
        assert_eq!(ks.command_tenants(), "herald:prod:commands:tenants");
        assert_eq!(ks.every_tenant_commands(), "herald:prod:t:{*}:commands");
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
        for write_behind in [ks.commands(&tenant), ks.overlay(&tenant, "r", "k").unwrap()] {
            assert_eq!(ks.segment_of(&acme, &write_behind), Some(Segment::WriteBehind), "{write_behind}");
            assert!(!Segment::WriteBehind.cache_may_sweep());
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

    /// Every key family of a scope, as the scripts combine them.
    pub(crate) fn every_family(ks: &KeySpace, scope: &Scope) -> Vec<String> {
        let entry = ks.entry(scope, "user_by_slug", "alice").unwrap();
        let mut keys = vec![
            entry.clone(),
            ks.entry(scope, KV_SEGMENT, "k").unwrap(),
            ks.tag_set(&TagKey::new(scope.clone(), "res_users.id=5")),
            ks.tag_version(&TagKey::new(scope.clone(), "res_users.id=5")),
            ks.tag_set(&TagKey::new(scope.clone(), "res_users.*")),
            ks.lease(&entry),
            ks.fill_epoch(scope),
            ks.prefix_marks(scope),
        ];
        if let Scope::Tenant(tenant) = scope {
            let channel = ks.channel(tenant, "team:1");
            keys.extend([
                format!("{channel}:meta"),
                format!("{channel}:hist"),
                format!("{channel}:pres"),
                format!("{channel}:idem:k"),
                channel,
                ks.rate_limit(tenant, "gateway"),
                ks.rate_limit(tenant, "gateway-publish"),
                ks.commands(tenant),
                ks.dead_commands(tenant),
                ks.command_lease(tenant),
                ks.applied_patches(tenant),
                ks.overlay(tenant, "user_by_id", "5").unwrap(),
            ]);
        }
        keys
    }

    #[test]
    fn every_key_family_of_a_scope_is_on_the_scope_slot() {
        let ks = KeySpace::new("prod").unwrap();
        for (scope, tag) in [(Scope::Tenant(TenantId::new("acme").unwrap()), "acme"), (Scope::Global, "global")] {
            let keys = every_family(&ks, &scope);
            assert_eq!(one_slot(&keys).unwrap(), slot(tag), "{scope:?}");
            assert_eq!(slot(&ks.tag_version_of_set(&keys[2])), slot(tag));
        }
        let other = ks.fill_epoch(&Scope::Tenant(TenantId::new("umbrella").unwrap()));
        let mixed = vec![ks.fill_epoch(&Scope::Global), other];
        assert!(one_slot(&mixed).unwrap_err().to_string().contains("different cluster slots"));
        // Redis Cluster's reference: CRC16 of "123456789" is 0x31C3 (12739).
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
    }

    #[test]
    fn partitions_have_their_own_slot_spread_over_the_slot_space() {
        let ks = KeySpace::new("prod").unwrap();
        assert_eq!(ks.stream_partition(0, 1), ks.stream());
        assert_eq!(ks.l1_channels(1), vec![ks.l1_channel()]);
        for n in [2u16, 3, 10, 64] {
            let mut slots: Vec<u16> = (0..n).map(|i| slot(&ks.stream_partition(i, n))).collect();
            for (i, s) in slots.iter().enumerate() {
                let slice = u32::from(*s) * u32::from(n) / u32::from(SLOTS);
                assert_eq!(slice, i as u32, "partition {i} of {n} lies in its slice of the slot space");
                assert_eq!(slot(&ks.l1_partition_channel(i as u16, n)), *s, "l1 channel shares the stream's slot");
            }
            slots.dedup();
            assert_eq!(slots.len(), usize::from(n));
        }
        assert_eq!(ks.stream_partition(1, 3), "herald:prod:events:{p1.0}".replace("p1.0", &partition_tag(1, 3)));
        assert_eq!(partition_of("", 8), 0, "global events go to partition 0");
        assert_eq!(partition_of("acme", 1), 0);
        assert_eq!(partition_of("acme", 8), partition_of("acme", 8));
        let spread: std::collections::HashSet<u16> = (0..100).map(|t| partition_of(&format!("t{t}"), 4)).collect();
        assert_eq!(spread.len(), 4);
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
