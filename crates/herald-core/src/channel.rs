//! Channels (`namespace:id`, such as `team:42`): their names, their Redis
//! keys, and the one publish function that the gateway's publish API and
//! broadcast's team events both use, so the two write identical publications.
//!
//! Every channel lives inside a tenant. Its keys carry the tenant as a Redis
//! Cluster hash tag, so one script can touch all of them (the root of them
//! is built by `KeySpace::channel`, with the rest of the key layout):
//!
//! | what | key |
//! |---|---|
//! | pub/sub channel | `herald:{env}:t:{<tenant>}:ch:<channel>` |
//! | offset and epoch (hash) | `…:ch:<channel>:meta` |
//! | history (stream, entry id `<offset>-0`) | `…:ch:<channel>:hist` |
//! | presence (sorted set, score = expiry ms) | `…:ch:<channel>:pres` |
//! | idempotency key | `…:ch:<channel>:idem:<key>` |
//!
//! A publication gets the next offset of its channel (1, 2, …) and the
//! channel's epoch, a random string fixed when the channel's state is
//! created. When the state expires (no publication for the history TTL) the
//! next publication starts a new epoch at offset 1: a client holding the old
//! epoch learns that its position means nothing any more.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use fred::prelude::*;

use crate::error::{Error, Result};
use crate::keys::{KeySpace, TenantId, validate_identifier};

const MAX_CHANNEL_ID_LEN: usize = 128;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// A validated channel name, `namespace:id`: the namespace is an identifier
/// (`[a-z_][a-z0-9_]*`), the id 1 to 128 of `A-Z a-z 0-9 _ - .`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel {
    name: Arc<str>,
    colon: usize,
}

impl Channel {
    pub fn parse(s: &str) -> Result<Self> {
        let (namespace, id) =
            s.split_once(':').ok_or_else(|| Error::invalid("channel", "must be namespace:id, e.g. team:42"))?;
        validate_identifier(namespace)
            .map_err(|reason| Error::InvalidArgument { what: "channel namespace", reason })?;
        validate_channel_id(id)?;
        Ok(Self { name: s.into(), colon: namespace.len() })
    }

    /// `team` for `team:42`.
    pub fn namespace(&self) -> &str {
        &self.name[..self.colon]
    }

    /// `42` for `team:42`.
    pub fn id(&self) -> &str {
        &self.name[self.colon + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

fn validate_channel_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_CHANNEL_ID_LEN {
        return Err(Error::invalid("channel id", format!("must be 1 to {MAX_CHANNEL_ID_LEN} bytes")));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(Error::invalid("channel id", format!("character {c:?} is not allowed")));
    }
    Ok(())
}

/// Checks an idempotency key: 1 to 128 printable ASCII bytes without
/// whitespace or braces.
pub fn validate_idempotency_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(Error::invalid("idempotency key", format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes")));
    }
    if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic() || matches!(c, '{' | '}')) {
        return Err(Error::invalid("idempotency key", format!("character {c:?} is not allowed")));
    }
    Ok(())
}

/// The Redis names of one tenant's channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelKeys {
    /// The pub/sub channel; the other keys extend it.
    pub pubsub: String,
}

impl ChannelKeys {
    pub fn new(keys: &KeySpace, tenant: &TenantId, channel: &Channel) -> Self {
        Self { pubsub: keys.channel(tenant, channel.as_str()) }
    }

    pub fn meta(&self) -> String {
        format!("{}:meta", self.pubsub)
    }

    pub fn history(&self) -> String {
        format!("{}:hist", self.pubsub)
    }

    pub fn presence(&self) -> String {
        format!("{}:pres", self.pubsub)
    }

    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.pubsub)
    }
}

/// How a channel keeps history (from its namespace's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Publications kept; 0 keeps none.
    pub size: u64,
    /// History, offset and epoch expire this long after the last publication.
    pub ttl_s: u64,
}

impl HistoryOptions {
    /// Offset and epoch outlive a channel without history by a day, so gaps
    /// on the live path are still detected.
    fn state_ttl_s(&self) -> u64 {
        if self.size > 0 { self.ttl_s.max(1) } else { 86_400 }
    }
}

/// What [`publish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    pub epoch: String,
    /// The idempotency key had been used: nothing was published again, and
    /// offset and epoch are those of the first publication.
    pub duplicate: bool,
}

/// A publication as it travels on pub/sub and sits in history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub offset: u64,
    pub epoch: Arc<str>,
    /// The payload, JSON text.
    pub data: Bytes,
}

impl Publication {
    /// Parses a pub/sub message: `<offset> <epoch> <data>`.
    pub fn decode_pubsub(message: &[u8]) -> Option<Self> {
        let first = message.iter().position(|b| *b == b' ')?;
        let offset = std::str::from_utf8(&message[..first]).ok()?.parse().ok()?;
        let rest = &message[first + 1..];
        let second = rest.iter().position(|b| *b == b' ')?;
        let epoch = std::str::from_utf8(&rest[..second]).ok()?;
        Some(Self { offset, epoch: epoch.into(), data: Bytes::copy_from_slice(&rest[second + 1..]) })
    }
}

/// Atomically: honour the idempotency key, take the next offset (starting a
/// new epoch if the channel has no state), append to the capped history,
/// refresh the TTLs and PUBLISH `<offset> <epoch> <data>` (`ARGV[8]`:
/// `SPUBLISH` on a cluster, so only the shard of the tenant's slot carries
/// it; the channel shares that slot).
const PUBLISH: &str = r#"
if ARGV[7] == '1' then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    local sep = string.find(prev, ' ', 1, true)
    return {tonumber(string.sub(prev, 1, sep - 1)), string.sub(prev, sep + 1), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local ttl = tonumber(ARGV[3])
redis.call('EXPIRE', KEYS[1], ttl)
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ttl)
end
redis.call(ARGV[8], ARGV[5], offset .. ' ' .. epoch .. ' ' .. ARGV[1])
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], offset .. ' ' .. epoch, 'EX', ARGV[6])
end
return {offset, epoch, 0}
"#;

/// Publishes `data` (JSON text, checked by the caller) on `channel` of
/// `tenant`. With an `idempotency` key (and its TTL), a repeated call
/// publishes nothing and returns the first call's offset.
pub async fn publish(
    redis: &Pool,
    keys: &KeySpace,
    tenant: &TenantId,
    channel: &Channel,
    history: HistoryOptions,
    data: &[u8],
    idempotency: Option<(&str, u64)>,
) -> Result<Published> {
    let ck = ChannelKeys::new(keys, tenant, channel);
    let (idem_key, idem_on, idem_ttl) = match idempotency {
        Some((key, ttl_s)) => {
            validate_idempotency_key(key)?;
            (ck.idempotency(key), "1", ttl_s.max(1))
        }
        // The script always gets three keys; the third is unused here.
        None => (ck.meta(), "0", 1),
    };
    let epoch = new_epoch();
    let args: Vec<Value> = vec![
        Value::Bytes(Bytes::copy_from_slice(data)),
        Value::from(history.size as i64),
        Value::from(history.state_ttl_s() as i64),
        Value::from(epoch),
        Value::from(ck.pubsub.clone()),
        Value::from(idem_ttl as i64),
        Value::from(idem_on),
        Value::from(crate::redis::publish_command(redis.next())),
    ];
    let keys = vec![ck.meta(), ck.history(), idem_key];
    crate::keys::one_slot(&keys)?;
    let reply: (i64, String, i64) = redis.next().eval(PUBLISH, keys, args).await?;
    Ok(Published { offset: reply.0.max(0) as u64, epoch: reply.1, duplicate: reply.2 == 1 })
}

/// A fresh epoch: 8 random hex digits.
pub fn new_epoch() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A channel's position and the history after a given offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySince {
    /// The channel's epoch, or `None` when it has no state (nothing was
    /// published within the history TTL).
    pub epoch: Option<String>,
    /// The channel's latest offset (0 without state).
    pub offset: u64,
    /// Publications after the requested offset, oldest first (at most the
    /// requested limit).
    pub publications: Vec<Publication>,
}

impl HistorySince {
    /// Whether these publications are exactly everything after `since`:
    /// the history reaches back to `since + 1` (or nothing was missed).
    pub fn complete_after(&self, since: u64) -> bool {
        if since >= self.offset {
            return since == self.offset;
        }
        match (self.publications.first(), self.publications.last()) {
            (Some(first), Some(last)) => first.offset == since + 1 && last.offset == self.offset,
            _ => false,
        }
    }
}

const HISTORY: &str = r#"
local state = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
if not state[1] then return {false, 0, {}} end
local entries = {}
if ARGV[2] ~= '0' then
  entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])
end
return {state[1], tonumber(state[2]), entries}
"#;

/// The epoch, latest offset and up to `limit` publications after `since` of
/// one channel, read atomically (`limit` 0: the position only).
pub async fn history_since(
    redis: &Pool,
    keys: &KeySpace,
    tenant: &TenantId,
    channel: &Channel,
    since: u64,
    limit: u64,
) -> Result<HistorySince> {
    let ck = ChannelKeys::new(keys, tenant, channel);
    let start = format!("{}-0", since + 1);
    let reply: Value =
        redis.next().eval(HISTORY, vec![ck.meta(), ck.history()], vec![start, limit.to_string()]).await?;
    Ok(parse_history(reply))
}

fn parse_history(reply: Value) -> HistorySince {
    let empty = HistorySince { epoch: None, offset: 0, publications: Vec::new() };
    let Value::Array(mut parts) = reply else { return empty };
    if parts.len() != 3 {
        return empty;
    }
    let entries = parts.pop().unwrap_or(Value::Null);
    let offset = parts.pop().and_then(|v| v.as_u64()).unwrap_or(0);
    let Some(epoch) = parts.pop().and_then(|v| v.as_string()) else { return empty };
    let epoch_arc: Arc<str> = epoch.as_str().into();
    let mut publications = Vec::new();
    if let Value::Array(entries) = entries {
        for entry in entries {
            let Value::Array(mut pair) = entry else { continue };
            if pair.len() != 2 {
                continue;
            }
            let fields = pair.pop().unwrap_or(Value::Null);
            let Some(id) = pair.pop().and_then(|v| v.as_string()) else { continue };
            let Some(offset) = id.split_once('-').and_then(|(ms, _)| ms.parse::<u64>().ok()) else { continue };
            let Value::Array(fields) = fields else { continue };
            let data = fields.chunks(2).find_map(|kv| match kv {
                [k, v] if k.as_str().as_deref() == Some("d") => v.as_bytes().map(Bytes::copy_from_slice),
                _ => None,
            });
            if let Some(data) = data {
                publications.push(Publication { offset, epoch: epoch_arc.clone(), data });
            }
        }
    }
    HistorySince { epoch: Some(epoch), offset, publications }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_and_keys() {
        let c = Channel::parse("team:42").unwrap();
        assert_eq!((c.namespace(), c.id()), ("team", "42"));
        let ks = KeySpace::new("prod").unwrap();
        let ck = ChannelKeys::new(&ks, &TenantId::new("acme").unwrap(), &c);
        assert_eq!(ck.pubsub, "herald:prod:t:{acme}:ch:team:42");
        assert_eq!(ck.history(), "herald:prod:t:{acme}:ch:team:42:hist");
        assert_eq!(ck.idempotency("k-1"), "herald:prod:t:{acme}:ch:team:42:idem:k-1");
        for bad in ["team", "team:", ":42", "Team:42", "team:4 2", "team:{x}", "team:a:b", "team:*"] {
            assert!(Channel::parse(bad).is_err(), "{bad}");
        }
        assert!(validate_idempotency_key("a b").is_err());
        assert!(validate_idempotency_key("{a}").is_err());
        assert!(validate_idempotency_key("evt:1:team:42").is_ok());
    }

    #[test]
    fn pubsub_payload_round_trip() {
        let p = Publication::decode_pubsub(b"17 ab12cd34 {\"x\": \"a b\"}").unwrap();
        assert_eq!((p.offset, &*p.epoch, &p.data[..]), (17, "ab12cd34", &b"{\"x\": \"a b\"}"[..]));
        assert!(Publication::decode_pubsub(b"x y z").is_none());
        assert!(Publication::decode_pubsub(b"17").is_none());
    }

    #[test]
    fn completeness() {
        let p = |offset| Publication { offset, epoch: "e".into(), data: Bytes::new() };
        let h = HistorySince { epoch: Some("e".into()), offset: 5, publications: vec![p(4), p(5)] };
        assert!(h.complete_after(3));
        assert!(!h.complete_after(2));
        assert!(HistorySince { epoch: Some("e".into()), offset: 5, publications: vec![] }.complete_after(5));
        assert!(!HistorySince { epoch: Some("e".into()), offset: 5, publications: vec![] }.complete_after(6));
    }

    proptest! {
        // What the publish script sends (`<offset> <epoch> <data>`) parses
        // back, whatever the data holds; any other bytes never panic.
        #[test]
        fn pubsub_payloads_round_trip(offset in 1u64.., epoch in "[0-9a-f]{8}", data in "\\PC{0,64}", junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            let message = format!("{offset} {epoch} {data}");
            let p = Publication::decode_pubsub(message.as_bytes()).unwrap();
            prop_assert_eq!((p.offset, &*p.epoch, &p.data[..]), (offset, epoch.as_str(), data.as_bytes()));
            let _ = Publication::decode_pubsub(&junk);
        }

        // Distinct (tenant, channel) pairs never share a Redis key, and the
        // tenant's hash tag stays the only one.
        #[test]
        fn channel_keys_are_injective(a in "[a-z]{1,4}", b in "[a-z]{1,4}", x in "[a-z0-9._-]{1,6}", y in "[a-z0-9._-]{1,6}") {
            let ks = KeySpace::new("e").unwrap();
            let k1 = ChannelKeys::new(&ks, &TenantId::new(&a).unwrap(), &Channel::parse(&format!("team:{x}")).unwrap());
            let k2 = ChannelKeys::new(&ks, &TenantId::new(&b).unwrap(), &Channel::parse(&format!("team:{y}")).unwrap());
            prop_assert_eq!(k1.pubsub == k2.pubsub, a == b && x == y);
            prop_assert_eq!(k1.history().matches('{').count(), 1);
        }
    }
}
