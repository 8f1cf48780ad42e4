//! The event stream's entry format, both sides: the writers ([`append`],
//! [`EventLog::append`], [`EventLog::append_watermark`],
//! [`append_dead_letter`]) and the parsing of Redis stream replies (RESP2
//! shapes) into entries carrying the event bytes (field [`EVENT_FIELD`]) or
//! a freshness watermark (field [`WATERMARK_FIELD`]), kept apart so it can
//! be tested without a server.
//!
//! **Partitions.** The log is `redis.partitions` streams ([`EventLog`]); a
//! tenant's events always go to the same one ([`crate::keys::partition_of`]),
//! so per-tenant order is the order of one stream. Global and all-tenant
//! events go to partition 0: an invalidation only deletes, so its order
//! against other tenants' events does not matter. A watermark goes to every
//! partition: it vouches for each of them.

use bytes::Bytes;
use fred::clients::Client;
use fred::prelude::*;
use fred::types::Value;

/// The field of a stream entry that holds the encoded event.
pub const EVENT_FIELD: &str = "e";

/// The field of a stream entry that holds an encoded `Watermark` (an entry
/// has either this field or [`EVENT_FIELD`]).
pub const WATERMARK_FIELD: &str = "w";

/// Appends one entry per payload (`ARGV[3..]`, field `ARGV[2]`) to stream
/// `KEYS[1]`, trimming it to about `ARGV[1]` entries.
const APPEND: &str = r"
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[2], ARGV[i])
end
return #ARGV - 2";

/// Appends one entry per payload to `stream` in one command (one write, one
/// round trip), trimming the stream to about `max_len` entries. One script
/// rather than a pipeline of `XADD`s: fred writes and flushes a pipeline
/// command by command, a system call each on the hot path of capture (and
/// of Redis, which then reads them one by one). The writes go over
/// `client`'s connection, so a `WAIT` sent on it next covers them.
pub async fn append(client: &Client, stream: &str, payloads: &[Bytes], max_len: u64) -> Result<(), fred::error::Error> {
    let max_len = i64::try_from(max_len).unwrap_or(i64::MAX);
    let mut args: Vec<Value> = Vec::with_capacity(payloads.len() + 2);
    args.push(Value::from(max_len));
    args.push(Value::from(EVENT_FIELD));
    args.extend(payloads.iter().map(|p| Value::Bytes(p.clone())));
    let _: i64 = client.eval(APPEND, vec![stream.to_string()], args).await?;
    Ok(())
}

/// Appends a freshness watermark (an encoded `herald.v1.Watermark`): every
/// change committed up to its position has its events before it.
async fn append_watermark(
    client: &Client,
    stream: &str,
    watermark: Bytes,
    max_len: u64,
) -> Result<(), fred::error::Error> {
    let max_len = i64::try_from(max_len).unwrap_or(i64::MAX);
    let _: String = client.xadd(stream, false, ("MAXLEN", "~", max_len), "*", (WATERMARK_FIELD, watermark)).await?;
    Ok(())
}

/// The partitioned event log of one installation: a stream per partition,
/// each on its own cluster slot (`KeySpace::stream_partition`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    streams: Vec<String>,
}

impl EventLog {
    pub fn new(keys: &crate::keys::KeySpace, partitions: u16) -> Self {
        let n = partitions.max(1);
        Self { streams: (0..n).map(|i| keys.stream_partition(i, n)).collect() }
    }

    /// Every partition's stream, in partition order.
    pub fn streams(&self) -> &[String] {
        &self.streams
    }

    pub fn partitions(&self) -> u16 {
        self.streams.len() as u16
    }

    /// The partition of `tenant`'s events (an event's `tenant` field).
    pub fn partition_of(&self, tenant: &str) -> u16 {
        crate::keys::partition_of(tenant, self.partitions())
    }

    /// The stream of `tenant`'s events.
    pub fn stream_of(&self, tenant: &str) -> &str {
        &self.streams[usize::from(self.partition_of(tenant))]
    }

    /// Appends each `(tenant, payload)` to its tenant's partition, in order
    /// within a partition, one pipeline per partition (each [`append`]).
    /// Returns the slots written, for a `WAIT` on `client` to cover them
    /// ([`crate::redis::wait_for_replicas`]).
    pub async fn append(
        &self,
        client: &Client,
        events: &[(&str, Bytes)],
        max_len: u64,
    ) -> Result<Vec<u16>, fred::error::Error> {
        let mut by_partition: Vec<Vec<Bytes>> = vec![Vec::new(); self.streams.len()];
        for (tenant, payload) in events {
            by_partition[usize::from(self.partition_of(tenant))].push(payload.clone());
        }
        let mut slots = Vec::new();
        for (stream, payloads) in self.streams.iter().zip(by_partition) {
            if !payloads.is_empty() {
                append(client, stream, &payloads, max_len).await?;
                slots.push(crate::keys::slot(stream));
            }
        }
        Ok(slots)
    }

    /// Appends `watermark` (an encoded `herald.v1.Watermark`) to every
    /// partition: each then holds, before it, every event of the changes
    /// committed up to its position.
    pub async fn append_watermark(
        &self,
        client: &Client,
        watermark: Bytes,
        max_len: u64,
    ) -> Result<(), fred::error::Error> {
        for stream in &self.streams {
            append_watermark(client, stream, watermark.clone(), max_len).await?;
        }
        Ok(())
    }
}

/// Appends an entry that could not be applied to the dead stream: the
/// original entry id, the reason and the payload under [`EVENT_FIELD`].
pub async fn append_dead_letter(
    client: &Client,
    stream: &str,
    entry_id: &str,
    reason: &str,
    payload: Bytes,
    max_len: u64,
) -> Result<(), fred::error::Error> {
    let max_len = i64::try_from(max_len).unwrap_or(i64::MAX);
    let fields = vec![
        ("id", Bytes::from(entry_id.to_string())),
        ("reason", Bytes::from(reason.to_string())),
        (EVENT_FIELD, payload),
    ];
    let _: String = client.xadd(stream, false, ("MAXLEN", "~", max_len), "*", fields).await?;
    Ok(())
}

/// One stream entry: its id and the event bytes (field `e`), if the entry
/// still exists and has the field, or the watermark bytes (field `w`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    pub id: String,
    pub payload: Option<Bytes>,
    pub watermark: Option<Bytes>,
}

/// Entries of an `XREADGROUP` reply for a single stream (nil → none).
pub fn read_group_entries(reply: Value) -> Vec<Entry> {
    let Value::Array(streams) = reply else { return Vec::new() };
    let mut out = Vec::new();
    for stream in streams {
        if let Value::Array(mut pair) = stream
            && pair.len() == 2
            && let Some(entries) = pair.pop()
        {
            out.extend(entries_of(entries));
        }
    }
    out
}

/// `(next cursor, entries, deleted ids)` of an `XAUTOCLAIM` reply.
pub fn autoclaim_entries(reply: Value) -> (String, Vec<Entry>, Vec<String>) {
    let Value::Array(parts) = reply else { return ("0-0".into(), Vec::new(), Vec::new()) };
    let mut parts = parts.into_iter();
    let cursor = parts.next().and_then(|v| v.as_string()).unwrap_or_else(|| "0-0".into());
    let entries = parts.next().map(entries_of).unwrap_or_default();
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.into_iter().filter_map(|v| v.as_string()).collect(),
        _ => Vec::new(),
    };
    (cursor, entries, deleted)
}

/// Entries of an `XRANGE`/`XREVRANGE` reply.
pub fn range_entries(reply: Value) -> Vec<Entry> {
    entries_of(reply)
}

/// One entry of a stream reply as Redis sent it: its id and its field-value
/// pairs, `None` for an entry deleted since it was delivered (nil fields).
/// The one parser of the RESP2 entry shape, for the event log and for any
/// other stream (write-behind commands).
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Option<Vec<(String, Value)>>,
}

/// The entries of an `XRANGE`-shaped reply (`[[id, [field, value, …]], …]`).
pub fn raw_entries(value: Value) -> Vec<RawEntry> {
    let Value::Array(entries) = value else { return Vec::new() };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut parts) = entry else { return None };
            if parts.len() != 2 {
                return None;
            }
            let fields = parts.pop()?;
            let id = parts.pop()?.as_string()?;
            let fields = match fields {
                Value::Array(fields) => {
                    let mut pairs = Vec::with_capacity(fields.len() / 2);
                    let mut it = fields.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        if let Some(k) = k.as_string() {
                            pairs.push((k, v));
                        }
                    }
                    Some(pairs)
                }
                _ => None,
            };
            Some(RawEntry { id, fields })
        })
        .collect()
}

fn entries_of(value: Value) -> Vec<Entry> {
    raw_entries(value)
        .into_iter()
        .map(|raw| {
            let mut entry = Entry { id: raw.id, ..Entry::default() };
            for (k, v) in raw.fields.unwrap_or_default() {
                let bytes = match v {
                    Value::Bytes(b) => Some(b),
                    Value::String(s) => Some(Bytes::from(s.to_string())),
                    _ => None,
                };
                match k.as_str() {
                    EVENT_FIELD => entry.payload = bytes,
                    WATERMARK_FIELD => entry.watermark = bytes,
                    _ => {}
                }
            }
            entry
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::String(x.into())
    }

    #[test]
    fn parses_xreadgroup() {
        let reply = Value::Array(vec![Value::Array(vec![
            s("k"),
            Value::Array(vec![
                Value::Array(vec![s("1-0"), Value::Array(vec![s("e"), Value::Bytes(Bytes::from_static(b"\x01"))])]),
                Value::Array(vec![s("2-0"), Value::Null]),
                Value::Array(vec![s("3-0"), Value::Array(vec![s("w"), Value::Bytes(Bytes::from_static(b"\x02"))])]),
            ]),
        ])]);
        let entries = read_group_entries(reply);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].payload.as_deref(), Some(&b"\x01"[..]));
        assert_eq!(entries[1], Entry { id: "2-0".into(), ..Entry::default() });
        assert_eq!(entries[2].watermark.as_deref(), Some(&b"\x02"[..]));
        assert_eq!(entries[2].payload, None);
        assert!(read_group_entries(Value::Null).is_empty());
    }

    #[test]
    fn parses_xautoclaim_v7() {
        let reply = Value::Array(vec![
            s("0-0"),
            Value::Array(vec![Value::Array(vec![s("5-1"), Value::Array(vec![s("e"), s("x")])])]),
            Value::Array(vec![s("4-0")]),
        ]);
        let (cursor, entries, deleted) = autoclaim_entries(reply);
        assert_eq!(cursor, "0-0");
        assert_eq!(entries[0].id, "5-1");
        assert_eq!(deleted, vec!["4-0".to_string()]);
    }
}
