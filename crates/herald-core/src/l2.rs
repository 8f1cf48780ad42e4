//! L2: cache entries in Redis with tag sets, and the atomic tag invalidation
//! that broadcast applies for every event.
//!
//! A stored entry `K` with tags `T1…Tn` is the string `K` plus `K` added to
//! the set `herald:{env}:t:{tenant}:tag:Ti` for each tag. Invalidating a tag
//! deletes every key in its set and the set itself, in one Lua script, so no
//! reader sees half of an invalidation. Entry and tag sets share the tenant's
//! hash tag, so the script touches one Cluster slot.

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;

use crate::error::Result;
use crate::keys::{KeySpace, Scope, TagKey};

/// Deletes every key named in the tag sets `KEYS`, then the sets; returns the
/// number of entries deleted.
const INVALIDATE_TAGS: &str = r#"
local deleted = 0
for _, tagset in ipairs(KEYS) do
  local members = redis.call('SMEMBERS', tagset)
  for i = 1, #members, 500 do
    deleted = deleted + redis.call('DEL', unpack(members, i, math.min(i + 499, #members)))
  end
  redis.call('DEL', tagset)
end
return deleted
"#;

/// Stores `ARGV[1]` under `KEYS[1]` for `ARGV[2]` ms (0: no expiry) and adds
/// `KEYS[1]` to the tag sets `KEYS[2..]`, which live at least as long.
const STORE: &str = r#"
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  local current = redis.call('PTTL', KEYS[i])
  if ttl == 0 then
    redis.call('PERSIST', KEYS[i])
  elseif current >= 0 and current < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  elseif current == -1 then
    -- already without expiry: an entry without TTL holds it
  else
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
"#;

/// L2 operations of one installation.
#[derive(Clone)]
pub struct L2 {
    redis: Pool,
    keys: KeySpace,
}

impl L2 {
    pub fn new(redis: Pool, keys: KeySpace) -> Self {
        Self { redis, keys }
    }

    /// Stores an entry with its tags. `ttl` of `None` means no expiry.
    pub async fn store(&self, key: &str, value: Bytes, tags: &[TagKey], ttl: Option<Duration>) -> Result<()> {
        let mut keys = Vec::with_capacity(tags.len() + 1);
        keys.push(key.to_string());
        keys.extend(tags.iter().map(|t| self.keys.tag_set(t)));
        let ttl_ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        let _: i64 = self.redis.next().eval(STORE, keys, vec![Value::Bytes(value), Value::from(ttl_ms as i64)]).await?;
        Ok(())
    }

    /// The entry under `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.redis.next().get::<Option<Bytes>, _>(key).await?)
    }

    /// Deletes every entry holding any of `tags` in `scope`; returns how many.
    pub async fn invalidate(&self, scope: &Scope, tags: &[String]) -> Result<u64> {
        if tags.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> =
            tags.iter().map(|t| self.keys.tag_set(&TagKey::new(scope.clone(), t.as_str()))).collect();
        let deleted: i64 = self.redis.next().eval(INVALIDATE_TAGS, keys, Vec::<Value>::new()).await?;
        Ok(deleted.max(0) as u64)
    }

    /// Deletes every entry holding `tag` in every tenant's scope (a TRUNCATE
    /// of a table with a tenant column). Scans for the tag sets: rare and
    /// proportional to the keyspace, by design.
    pub async fn invalidate_all_scopes(&self, tag: &str) -> Result<u64> {
        // Tenant ids and key parts never contain `}`, so this matches tag sets
        // only, never entries whose key happens to contain ":tag:".
        let pattern = format!("{}:t:{{*}}:tag:{tag}", self.keys.prefix());
        let global = self.keys.tag_set(&TagKey::new(Scope::Global, tag));
        let client = self.redis.next();
        let mut deleted: i64 = client.eval(INVALIDATE_TAGS, vec![global], Vec::<Value>::new()).await?;
        let mut cursor = "0".to_string();
        loop {
            let (next, keys): (String, Vec<String>) = client
                .scan_page(cursor.as_str(), pattern.as_str(), Some(1000), Some(fred::types::scan::ScanType::Set))
                .await?;
            for key in keys {
                let n: i64 = client.eval(INVALIDATE_TAGS, vec![key], Vec::<Value>::new()).await?;
                deleted += n;
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        Ok(deleted.max(0) as u64)
    }
}
