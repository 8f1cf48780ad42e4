//! The L1 channel message: anyone who can publish on the Redis channel
//! reaches every node's subscriber with these bytes. Decodes them and does
//! what the subscriber does (crates/herald-core/src/l1/subscriber.rs):
//! heartbeat → live, invalidations → apply each event, undecodable → flush.
//! Checks coherence on top of "no panic": after an event is applied, no
//! entry that carries one of its tags (in its scope), or whose key starts
//! with one of its prefixes, is still served.
#![no_main]

use bytes::Bytes;
use herald_core::config::L1Config;
use herald_core::keys::{Scope, TagKey, TenantId};
use herald_core::l1::L1Cache;
use herald_proto::Message as _;
use herald_proto::v1::{InvalidationEvent, L1Message, l1_message};
use libfuzzer_sys::fuzz_target;

/// Entries put in the cache before each message: key, scope tenant ("" is
/// global), tags.
const ENTRIES: &[(&str, &str, &[&str])] = &[
    ("t:acme:r:user:1", "acme", &["res_users", "res_users.id=1"]),
    ("t:acme:r:user:2", "acme", &["res_users.id=2", "res_users.slug=bob"]),
    ("t:beta:r:user:1", "beta", &["res_users", "res_users.id=1"]),
    ("g:r:country:fr", "", &["countries", "countries.code=fr"]),
    ("t:acme:k:plain", "acme", &[]),
];

fn scope(tenant: &str) -> Scope {
    Scope::from_event_tenant(tenant).expect("fixed tenants are valid")
}

fn filled() -> L1Cache {
    let cache = L1Cache::new(&L1Config { max_bytes: 1 << 20, max_ttl_ms: 600_000, heartbeat_timeout_ms: 3_000 });
    cache.set_live(true);
    for (key, tenant, tags) in ENTRIES {
        let tags = tags.iter().map(|t| TagKey::new(scope(tenant), *t)).collect();
        assert!(cache.insert(cache.begin_fill(), key, Bytes::from_static(b"v"), tags, None));
    }
    cache
}

/// Whether `event` must have dropped the entry.
fn drops(event: &InvalidationEvent, key: &str, tenant: &str, tags: &[&str]) -> bool {
    if event.all_tenants {
        return true;
    }
    let Ok(event_scope) = Scope::from_event_tenant(&event.tenant) else { return true };
    (event_scope == scope(tenant) && tags.iter().any(|t| event.tags.iter().any(|e| e == t)))
        || event.key_prefixes.iter().any(|p| key.starts_with(p.as_str()))
}

fuzz_target!(|data: &[u8]| {
    let cache = filled();
    let before = cache.applied();
    match L1Message::decode(data) {
        Ok(L1Message { body: Some(l1_message::Body::Heartbeat(_)) }) => {
            cache.set_live(true);
            for (key, ..) in ENTRIES {
                assert!(cache.get(key).is_some(), "a heartbeat drops nothing");
            }
        }
        Ok(L1Message { body: Some(l1_message::Body::Invalidations(batch)) }) => {
            for event in &batch.events {
                cache.apply(event);
            }
            for (key, tenant, tags) in ENTRIES {
                if batch.events.iter().any(|e| drops(e, key, tenant, tags)) {
                    assert!(cache.get(key).is_none(), "{key} survived {batch:?}");
                }
            }
            let after = cache.applied();
            assert!(after.commit_lsn >= before.commit_lsn);
        }
        Ok(L1Message { body: None }) => {}
        Err(_) => {
            cache.flush();
            for (key, ..) in ENTRIES {
                assert!(cache.get(key).is_none(), "a flush drops everything");
            }
        }
    }
    let _ = TenantId::new("acme");
});
