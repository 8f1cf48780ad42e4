//! The atomic operations of explicit keys that cache frameworks promise
//! (Django's and memcached's `add` and `incr`): each is decided by one Redis
//! script, so two nodes (or two app processes) racing on a key get one
//! winner, never a lost update. Both stamp the key's own tag like an
//! un-gated Set, so a gated fill that started earlier cannot overwrite the
//! result, and publish it so every L1 and near cache drops its copy.

use std::time::Duration;

use bytes::Bytes;
use herald_core::keys::{Scope, TagKey, TenantId};
use herald_core::l2::Condition;
use herald_core::time::now_us;
use herald_proto::Message as _;
use herald_proto::v1::StoredEntry;

use super::{Cache, KV};
use crate::error::{Error, Result};

/// Compare-and-swap attempts of one Incr before it gives up as contended.
const MAX_INCR_ATTEMPTS: usize = 32;

impl Cache {
    /// Stores an explicit key only when no entry is cached under it; true
    /// when stored.
    pub async fn add_key(
        &self,
        tenant: &TenantId,
        key: &str,
        value: Bytes,
        ttl_ms: u64,
        tags: Vec<String>,
    ) -> Result<bool> {
        let scope = Scope::Tenant(tenant.clone());
        let entry_key = self.keys.entry(&scope, KV, key)?;
        let ttl_ms = self.check_explicit(&value, ttl_ms, &tags)?;
        if !self.redis_usable() {
            return Err(Error::Unavailable("redis is unreachable; explicit keys cannot be stored".into()));
        }
        let self_tag = self.self_tag(&scope, &entry_key);
        let (tag_keys, names) = self.entry_tags(&scope, &entry_key, tags);
        let entry = StoredEntry { value, tags: names, found: true, expires_at_ms: now_us() / 1000 + ttl_ms as i64 };
        let self_key = TagKey::new(scope.clone(), self_tag.as_str());
        let ttl = Some(Duration::from_millis(ttl_ms));
        let bytes: Bytes = entry.encode_to_vec().into();
        let stored =
            self.redis_op(self.l2.replace_if(&entry_key, bytes, &self_key, &tag_keys, ttl, Condition::Absent)).await?;
        if stored {
            self.publish(&scope, vec![self_tag], Vec::new()).await?;
        }
        Ok(stored)
    }

    /// Adds `delta` to the decimal integer stored under an explicit key,
    /// keeping its expiry and tags. `None` when no entry is cached (nothing
    /// is stored then); an error when the value is not a decimal integer or
    /// the sum overflows 64 bits.
    pub async fn incr_key(&self, tenant: &TenantId, key: &str, delta: i64) -> Result<Option<i64>> {
        let scope = Scope::Tenant(tenant.clone());
        let entry_key = self.keys.entry(&scope, KV, key)?;
        if !self.redis_usable() {
            return Err(Error::Unavailable("redis is unreachable; explicit keys cannot be changed".into()));
        }
        let self_tag = self.self_tag(&scope, &entry_key);
        let self_key = TagKey::new(scope.clone(), self_tag.as_str());
        for _ in 0..MAX_INCR_ATTEMPTS {
            let Some(current) = self.redis_op(self.l2.get(&entry_key)).await? else { return Ok(None) };
            let entry = StoredEntry::decode(current.clone())
                .map_err(|_| Error::Internal(format!("undecodable entry under key {key:?}")))?;
            let ttl = match entry.expires_at_ms {
                0 => None,
                at => match u64::try_from(at - now_us() / 1000) {
                    Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
                    _ => return Ok(None),
                },
            };
            let next = parse_integer(key, &entry.value)?.checked_add(delta).ok_or_else(|| {
                Error::InvalidArgument(format!("incrementing key {key:?} by {delta} overflows 64 bits"))
            })?;
            let tags: Vec<TagKey> = entry.tags.iter().map(|t| TagKey::new(scope.clone(), t.as_str())).collect();
            let updated = StoredEntry { value: next.to_string().into_bytes().into(), ..entry };
            let bytes: Bytes = updated.encode_to_vec().into();
            let swapped = self
                .redis_op(self.l2.replace_if(&entry_key, bytes, &self_key, &tags, ttl, Condition::Holds(&current)))
                .await?;
            if swapped {
                self.publish(&scope, vec![self_tag], Vec::new()).await?;
                return Ok(Some(next));
            }
        }
        Err(Error::Unavailable(format!("key {key:?} changed under {MAX_INCR_ATTEMPTS} increments in a row; retry")))
    }
}

/// A value Incr can add to: ASCII decimal, optionally signed, within i64.
fn parse_integer(key: &str, value: &[u8]) -> Result<i64> {
    std::str::from_utf8(value).ok().and_then(|s| s.parse::<i64>().ok()).ok_or_else(|| {
        Error::InvalidArgument(format!("key {key:?} does not hold a decimal integer, so it cannot be incremented"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_decimal_integers_can_be_incremented() {
        assert_eq!(parse_integer("k", b"42").unwrap(), 42);
        assert_eq!(parse_integer("k", b"-7").unwrap(), -7);
        assert_eq!(parse_integer("k", b"+7").unwrap(), 7);
        for bad in [&b""[..], b"4 2", b"x", b"1.5", b"99999999999999999999", b"\xff"] {
            assert!(parse_integer("k", bad).is_err(), "{bad:?}");
        }
    }
}
