//! L2: cache entries in Redis with tag sets, the atomic tag invalidation that
//! broadcast applies for every event, and version-gated fills.
//!
//! A stored entry `K` with tags `T1…Tn` is the string `K` plus `K` added to
//! the set `herald:{env}:t:{tenant}:tag:Ti` for each tag. Invalidating a tag
//! deletes every key in its set and the set itself, in one Lua script, so no
//! reader sees half of an invalidation. Entry and tag sets share the tenant's
//! hash tag, so the script touches one Cluster slot.
//!
//! **Version-gated fills** (Meta's leases): a filler takes a [`FillToken`]
//! (the scope's fill epoch and the Redis server time) *before* it reads the
//! source. Every invalidation stamps each tag with the server time
//! (`…:tv:<tag>`); [`L2::store_gated`] stores nothing when any of the entry's
//! tags was stamped at or after the token, when a prefix invalidation covering
//! the key came after it, when the epoch changed (Redis lost its data, or a
//! TRUNCATE of a tenant table), or when the fill is older than
//! [`MAX_FILL_AGE`] (stamps live longer than that). One clock, Redis's, orders
//! fills and invalidations, so node clocks cannot skew the decision.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::prelude::*;

use crate::error::{Error, Result};
use crate::keys::{KeySpace, Scope, TagKey, glob_escape, one_slot};
use crate::tags;

/// A fill older than this is never stored.
pub const MAX_FILL_AGE: Duration = Duration::from_secs(30);
/// How long invalidation stamps and prefix marks live; longer than
/// [`MAX_FILL_AGE`], so no fill can outlive the stamp that refuses it.
const STAMP_TTL: Duration = Duration::from_secs(120);
/// Prefix marks kept per scope before they collapse into one of the whole
/// scope (see `MARK_PREFIX`).
const MAX_PREFIX_MARKS: i64 = 256;

/// Redis server time in microseconds, as a string of digits, then:
/// deletes every key named in the tag sets `KEYS[1..n]`, the sets, and stamps
/// the tag versions `KEYS[n+1..2n]` with the time. Returns entries deleted.
const INVALIDATE_TAGS: &str = r#"
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local n = #KEYS / 2
local deleted = 0
for i = 1, n do
  local members = redis.call('SMEMBERS', KEYS[i])
  for j = 1, #members, 500 do
    deleted = deleted + redis.call('DEL', unpack(members, j, math.min(j + 499, #members)))
  end
  redis.call('DEL', KEYS[i])
  redis.call('SET', KEYS[n + i], now, 'PX', ARGV[1])
end
return deleted
"#;

/// Shared by the store scripts: `SET KEYS[1] value` with a TTL of `ttl` ms
/// (0: none) and add it to the tag sets `sets`, which live at least as long.
const STORE_BODY: &str = r#"
local function store(key, value, ttl, sets)
  if ttl > 0 then
    redis.call('SET', key, value, 'PX', ttl)
  else
    redis.call('SET', key, value)
  end
  for _, set in ipairs(sets) do
    redis.call('SADD', set, key)
    local current = redis.call('PTTL', set)
    if ttl == 0 then
      redis.call('PERSIST', set)
    elseif current == -1 then
      -- already without expiry: an entry without TTL holds it
    elseif current < ttl then
      redis.call('PEXPIRE', set, ttl)
    end
  end
end
"#;

/// Unconditional store: `KEYS[1]` entry, `KEYS[2..]` tag sets; ARGV value, ttl.
const STORE: &str = r#"
local sets = {}
for i = 2, #KEYS do sets[#sets + 1] = KEYS[i] end
store(KEYS[1], ARGV[1], tonumber(ARGV[2]), sets)
return 1
"#;

/// `KEYS[1]` epoch (created when missing); optionally `KEYS[2]` a lease
/// taken with `SET NX PX` (ARGV owner, ms) unless the entry `KEYS[3]` is
/// already there (another node's fill finished first). Returns {acquired,
/// epoch, now, entry or false}.
const BEGIN_FILL: &str = r#"
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = now
  redis.call('SET', KEYS[1], epoch)
end
local acquired = 1
local entry = false
if #KEYS > 1 then
  entry = redis.call('GET', KEYS[3])
  if entry or not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then acquired = 0 end
end
return {acquired, epoch, now, entry}
"#;

/// Gated store. KEYS: entry, epoch, prefix marks, lease, n tag sets, n tag
/// versions. ARGV: value, ttl ms, epoch, start µs, max age µs, lease owner
/// ('' for none), n. Returns 1 when stored, 0 when refused; releases the
/// lease when owned either way.
const STORE_GATED: &str = r#"
local n = tonumber(ARGV[7])
local start = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ok = redis.call('GET', KEYS[2]) == ARGV[3] and now - start <= tonumber(ARGV[5])
if ok then
  for i = 1, n do
    local v = redis.call('GET', KEYS[4 + n + i])
    if v and tonumber(v) >= start then ok = false break end
  end
end
if ok then
  local marks = redis.call('HGETALL', KEYS[3])
  for i = 1, #marks, 2 do
    if tonumber(marks[i + 1]) >= start and string.sub(KEYS[1], 1, #marks[i]) == marks[i] then ok = false break end
  end
end
if ok then
  local sets = {}
  for i = 1, n do sets[i] = KEYS[4 + i] end
  store(KEYS[1], ARGV[1], tonumber(ARGV[2]), sets)
end
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) == ARGV[6] then redis.call('DEL', KEYS[4]) end
if ok then return 1 else return 0 end
"#;

/// `KEYS[1]` prefix marks: records `ARGV[1]` (a key prefix) at server time.
/// Marks older than `ARGV[2]` ms are forgotten (no fill that old can still
/// be stored), and past `ARGV[3]` marks they all collapse into one mark of
/// the scope root `ARGV[4]` (coarser: it refuses every fill of the scope
/// that started before). So the hash that every gated store reads stays
/// small however many distinct prefixes are invalidated.
const MARK_PREFIX: &str = r#"
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local oldest = tonumber(now) - tonumber(ARGV[2]) * 1000
local marks = redis.call('HGETALL', KEYS[1])
local kept = 0
for i = 1, #marks, 2 do
  if tonumber(marks[i + 1]) < oldest then redis.call('HDEL', KEYS[1], marks[i]) else kept = kept + 1 end
end
if kept >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], ARGV[4], now)
else
  redis.call('HSET', KEYS[1], ARGV[1], now)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Deletes `KEYS[1]` when it holds `ARGV[1]`.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Taken before a fill reads its source; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillToken {
    epoch: String,
    start_us: i64,
}

impl fmt::Display for FillToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.start_us)
    }
}

impl FromStr for FillToken {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::invalid("fill token", "not a token returned by a Get miss");
        let (epoch, start) = s.split_once('.').ok_or_else(bad)?;
        if epoch.is_empty() || epoch.len() > 32 || !epoch.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Self { epoch: epoch.to_string(), start_us: start.parse().map_err(|_| bad())? })
    }
}

/// A fill lease: only its owner's fill reads the source; others wait for
/// the value to appear in L2.
pub struct Lease<'a> {
    /// The entry the fill is for.
    pub entry: &'a str,
    /// The entry's lease key ([`KeySpace::lease`]).
    pub key: &'a str,
    /// Unique per fill.
    pub owner: &'a str,
    pub ttl: Duration,
}

/// What [`L2::begin_fill`] found.
pub struct BegunFill {
    /// The lease is this fill's (always false without a lease).
    pub acquired: bool,
    pub token: FillToken,
    /// The entry, when another fill stored it already.
    pub entry: Option<Bytes>,
}

/// L2 operations of one installation.
#[derive(Clone)]
pub struct L2 {
    redis: Pool,
    keys: KeySpace,
}

fn script(body: &str) -> String {
    format!("{STORE_BODY}\n{body}")
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl L2 {
    pub fn new(redis: Pool, keys: KeySpace) -> Self {
        Self { redis, keys }
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// Stores an entry with its tags, unconditionally (the caller vouches
    /// that the value is current). `ttl` of `None` means no expiry.
    pub async fn store(&self, key: &str, value: Bytes, tags: &[TagKey], ttl: Option<Duration>) -> Result<()> {
        let tags = tags::indexed_tags(tags.to_vec());
        let mut keys = Vec::with_capacity(tags.len() + 1);
        keys.push(key.to_string());
        keys.extend(tags.iter().map(|t| self.keys.tag_set(t)));
        let ttl_ms = ttl.map_or(0, millis);
        one_slot(&keys)?;
        let _: i64 =
            self.redis.next().eval(script(STORE), keys, vec![Value::Bytes(value), Value::from(ttl_ms)]).await?;
        Ok(())
    }

    /// Starts a fill in `scope`: the token to pass to [`L2::store_gated`].
    /// With a `lease`, also whether it was acquired, or the entry when it
    /// is already stored (then nobody needs to fill it).
    pub async fn begin_fill(&self, scope: &Scope, lease: Option<&Lease<'_>>) -> Result<BegunFill> {
        let mut keys = vec![self.keys.fill_epoch(scope)];
        let mut args: Vec<Value> = Vec::new();
        if let Some(lease) = lease {
            keys.push(lease.key.to_string());
            keys.push(lease.entry.to_string());
            args.push(lease.owner.into());
            args.push(millis(lease.ttl).into());
        }
        one_slot(&keys)?;
        let (acquired, epoch, now, entry): (i64, String, String, Option<Bytes>) =
            self.redis.next().eval(BEGIN_FILL, keys, args).await?;
        let token = FillToken { epoch, start_us: now.parse().map_err(|_| Error::invalid("redis time", now))? };
        Ok(BegunFill { acquired: acquired == 1, token, entry })
    }

    /// Stores the entry unless an invalidation passed `token` (see the module
    /// docs); releases `lease_owner`'s lease either way. True when stored.
    #[allow(clippy::too_many_arguments)]
    pub async fn store_gated(
        &self,
        scope: &Scope,
        key: &str,
        value: Bytes,
        tags: &[TagKey],
        ttl: Option<Duration>,
        token: &FillToken,
        lease_owner: Option<&str>,
    ) -> Result<bool> {
        // Indexed (and gated) under the implied any-row tags too, so a
        // table-wide invalidation during the fill refuses it.
        let tags = tags::indexed_tags(tags.to_vec());
        let mut keys = Vec::with_capacity(4 + 2 * tags.len());
        keys.push(key.to_string());
        keys.push(self.keys.fill_epoch(scope));
        keys.push(self.keys.prefix_marks(scope));
        keys.push(self.keys.lease(key));
        keys.extend(tags.iter().map(|t| self.keys.tag_set(t)));
        keys.extend(tags.iter().map(|t| self.keys.tag_version(t)));
        let args: Vec<Value> = vec![
            Value::Bytes(value),
            ttl.map_or(0, millis).into(),
            token.epoch.as_str().into(),
            token.start_us.into(),
            i64::try_from(MAX_FILL_AGE.as_micros()).unwrap_or(i64::MAX).into(),
            lease_owner.unwrap_or("").into(),
            (tags.len() as i64).into(),
        ];
        one_slot(&keys)?;
        let stored: i64 = self.redis.next().eval(script(STORE_GATED), keys, args).await?;
        Ok(stored == 1)
    }

    /// Gives up a lease (a fill that failed before storing).
    pub async fn release_lease(&self, lease_key: &str, owner: &str) -> Result<()> {
        let _: i64 = self.redis.next().eval(RELEASE, vec![lease_key.to_string()], vec![owner.to_string()]).await?;
        Ok(())
    }

    /// Whether anyone holds the lease.
    pub async fn lease_held(&self, lease_key: &str) -> Result<bool> {
        Ok(self.redis.next().exists::<i64, _>(lease_key).await? > 0)
    }

    /// The entry under `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.redis.next().get::<Option<Bytes>, _>(key).await?)
    }

    /// Deletes every entry holding any of `tags` in `scope` and stamps the
    /// tags, so fills that started before cannot store; returns how many.
    pub async fn invalidate(&self, scope: &Scope, tags: &[String]) -> Result<u64> {
        self.invalidate_on(self.redis.next(), scope, tags).await
    }

    /// [`L2::invalidate`] over `client`'s connections, so a `WAIT` sent on
    /// them next covers the deletes ([`crate::redis::wait_for_replicas`]
    /// with the scope's [`L2::slot_of`]).
    pub async fn invalidate_on(&self, client: &Client, scope: &Scope, tags: &[String]) -> Result<u64> {
        if tags.is_empty() {
            return Ok(0);
        }
        let tags: Vec<TagKey> = tags.iter().map(|t| TagKey::new(scope.clone(), t.as_str())).collect();
        let mut keys: Vec<String> = tags.iter().map(|t| self.keys.tag_set(t)).collect();
        keys.extend(tags.iter().map(|t| self.keys.tag_version(t)));
        one_slot(&keys)?;
        let deleted: i64 = client.eval(INVALIDATE_TAGS, keys, vec![millis(STAMP_TTL)]).await?;
        Ok(deleted.max(0) as u64)
    }

    /// The cluster slot of every key of `scope`.
    pub fn slot_of(&self, scope: &Scope) -> u16 {
        crate::keys::slot(&self.keys.scope_root(scope))
    }

    /// Deletes every entry holding any of `tags` in every tenant's scope (a
    /// TRUNCATE of a table with a tenant column), and ends every fill in
    /// flight by dropping the fill epochs. Scans every master of a cluster
    /// (the patterns name no slot): rare and proportional to the keyspace,
    /// by design. Runs over `client`'s connections (see
    /// [`L2::invalidate_on`]); returns the deleted count and the slots
    /// written.
    pub async fn invalidate_all_scopes_on(&self, client: &Client, tags: &[String]) -> Result<(u64, Vec<u16>)> {
        let mut deleted = self.invalidate_on(client, &Scope::Global, tags).await?;
        let mut slots = vec![self.slot_of(&Scope::Global)];
        // Tenant ids and key parts never contain `}`, so these patterns match
        // Herald's bookkeeping keys only, never entries.
        for epoch in crate::redis::scan_every_master(client, &self.keys.every_tenant_fill_epoch()).await? {
            slots.push(crate::keys::slot(&epoch));
            let _: i64 = client.del(epoch).await?;
        }
        for tag in tags {
            for set in crate::redis::scan_every_master(client, &self.keys.every_tenant_tag_set(tag)).await? {
                let keys = vec![set.clone(), self.keys.tag_version_of_set(&set)];
                slots.push(one_slot(&keys)?);
                let n: i64 = client.eval(INVALIDATE_TAGS, keys, vec![millis(STAMP_TTL)]).await?;
                deleted += n.max(0) as u64;
            }
        }
        slots.sort_unstable();
        slots.dedup();
        Ok((deleted, slots))
    }

    /// [`L2::invalidate_all_scopes_on`] over any connection of the pool.
    pub async fn invalidate_all_scopes(&self, tags: &[String]) -> Result<u64> {
        Ok(self.invalidate_all_scopes_on(self.redis.next(), tags).await?.0)
    }

    /// Deletes every entry of `scope` whose key starts with `prefix` (a full
    /// key prefix within the scope root) and marks the prefix so fills that
    /// started before cannot store; returns how many entries. Only what the
    /// cache owns is deleted (entries and tag sets; never fill gates or the
    /// gateway's state, which share the scope root).
    pub async fn invalidate_prefix(&self, scope: &Scope, prefix: &str) -> Result<u64> {
        let root = self.keys.scope_root(scope);
        if !prefix.starts_with(&root) {
            return Err(Error::invalid("prefix", "outside the tenant's keys"));
        }
        let client = self.redis.next();
        let _: i64 = client
            .eval(
                MARK_PREFIX,
                vec![self.keys.prefix_marks(scope)],
                vec![Value::from(prefix), millis(STAMP_TTL).into(), MAX_PREFIX_MARKS.into(), root.as_str().into()],
            )
            .await?;
        let mut deleted = 0u64;
        // The prefix holds the scope's hash tag: one slot, one node.
        let keys = self.scan(&format!("{}*", glob_escape(prefix))).await?;
        let doomed: Vec<String> = keys
            .into_iter()
            .filter(|k| self.keys.segment_of(scope, k).is_none_or(|owner| owner.cache_may_sweep()))
            .collect();
        for chunk in doomed.chunks(500) {
            let n: i64 = client.del(chunk.to_vec()).await?;
            deleted += n.max(0) as u64;
        }
        Ok(deleted)
    }

    async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        let client = self.redis.next();
        let mut found = Vec::new();
        let mut cursor = "0".to_string();
        loop {
            let (next, keys): (String, Vec<String>) =
                client.scan_page(cursor.as_str(), pattern, Some(1000), None).await?;
            found.extend(keys);
            if next == "0" {
                return Ok(found);
            }
            cursor = next;
        }
    }

    /// Replaces an entry unconditionally, in one script: invalidates its own
    /// tag `self_tag` (stamping it, so fills that started before cannot
    /// overwrite the new value), then stores it with `tags` (which include
    /// `self_tag`). No reader sees the entry missing in between.
    pub async fn replace(
        &self,
        key: &str,
        value: Bytes,
        self_tag: &TagKey,
        tags: &[TagKey],
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.replace_if(key, value, self_tag, tags, ttl, Condition::Always).await?;
        Ok(())
    }

    /// [`L2::replace`] when `condition` holds, decided in the same script;
    /// true when replaced. The atomic steps of explicit keys (add, incr).
    pub async fn replace_if(
        &self,
        key: &str,
        value: Bytes,
        self_tag: &TagKey,
        tags: &[TagKey],
        ttl: Option<Duration>,
        condition: Condition<'_>,
    ) -> Result<bool> {
        let tags = tags::indexed_tags(tags.to_vec());
        let mut keys = Vec::with_capacity(tags.len() + 3);
        keys.push(key.to_string());
        keys.push(self.keys.tag_set(self_tag));
        keys.push(self.keys.tag_version(self_tag));
        keys.extend(tags.iter().map(|t| self.keys.tag_set(t)));
        let (mode, expected) = match condition {
            Condition::Always => ("always", Bytes::new()),
            Condition::Absent => ("absent", Bytes::new()),
            Condition::Holds(bytes) => ("holds", Bytes::copy_from_slice(bytes)),
        };
        let args: Vec<Value> = vec![
            Value::Bytes(value),
            ttl.map_or(0, millis).into(),
            millis(STAMP_TTL).into(),
            mode.into(),
            Value::Bytes(expected),
        ];
        one_slot(&keys)?;
        let replaced: i64 = self.redis.next().eval(script(REPLACE), keys, args).await?;
        Ok(replaced == 1)
    }
}

/// When [`L2::replace_if`] replaces.
#[derive(Debug, Clone, Copy)]
pub enum Condition<'a> {
    Always,
    /// No entry is stored under the key.
    Absent,
    /// The stored entry is exactly these bytes (compare-and-swap).
    Holds(&'a [u8]),
}

/// [`L2::replace_if`]. KEYS: entry, its self tag's set and version, then the
/// entry's tag sets. ARGV: value, ttl ms (0: none), stamp ttl ms, condition
/// (`always`, `absent`, `holds`), the bytes `holds` compares with. Returns 1
/// when replaced, 0 when the condition failed (nothing changed).
const REPLACE: &str = r#"
if ARGV[4] == 'absent' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[4] == 'holds' and redis.call('GET', KEYS[1]) ~= ARGV[5] then return 0 end
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local members = redis.call('SMEMBERS', KEYS[2])
for j = 1, #members, 500 do
  redis.call('DEL', unpack(members, j, math.min(j + 499, #members)))
end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], now, 'PX', ARGV[3])
local sets = {}
for i = 4, #KEYS do sets[#sets + 1] = KEYS[i] end
store(KEYS[1], ARGV[1], tonumber(ARGV[2]), sets)
return 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_tokens_round_trip_and_reject_junk() {
        let t: FillToken = "1763683200000000.1763683200123456".parse().unwrap();
        assert_eq!(t.to_string().parse::<FillToken>().unwrap(), t);
        for bad in ["", ".", "x.1", "1.", "1.x", "1", "a1.2"] {
            assert!(bad.parse::<FillToken>().is_err(), "{bad}");
        }
    }
}
