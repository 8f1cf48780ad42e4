//! Write-behind overlays: what readers see of a command that Postgres does
//! not have yet. This file owns the overlay's format.
//!
//! An overlay is a Redis hash per resource entry (`KeySpace::overlay`):
//! field = the command's stream entry id (so patches sort in command
//! order), value = `<applied lsn>|<patch>`, where the patch is a JSON object
//! of the row's fields the command sets, and the lsn is 0 while the command
//! is pending, then the position after the transaction that applied it.
//!
//! A node merges the patches it cannot yet see in its cache: pending ones,
//! and applied ones past its applied watermark (capture's event for that
//! commit has not reached it, so its cache may still hold the old row).
//! Once every live node is past a patch's position the writer deletes it.

use bytes::Bytes;
use serde_json::{Map, Value};

/// KEYS: stream, overlay, applied set; ARGV: entry id, position. The patch
/// (if still there) is marked applied (its `0|` becomes `<position>|`)
/// and listed for retirement: the writer's one change to this format.
pub const MARK_APPLIED: &str = "local v = redis.call('HGET', KEYS[2], ARGV[1])
if v then
  local patch = string.match(v, '^%d+|(.*)$')
  if patch then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. patch)
    redis.call('ZADD', KEYS[3], ARGV[2], KEYS[2] .. ' ' .. ARGV[1])
  end
end
redis.call('XDEL', KEYS[1], ARGV[1])
return 1";
/// A stream entry id (`<ms>-<seq>`), ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self { ms: ms.parse().ok()?, seq: seq.parse().ok()? })
    }
}

/// One command's patch of an entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    pub entry: EntryId,
    /// 0 while pending.
    pub applied_lsn: u64,
    pub fields: Map<String, Value>,
}

/// The hash value of a patch at `applied_lsn` (0: pending).
pub fn encode(applied_lsn: u64, fields: &Map<String, Value>) -> String {
    format!("{applied_lsn}|{}", Value::Object(fields.clone()))
}

/// The patches of an overlay hash (`HGETALL`'s pairs), in command order;
/// malformed fields are skipped.
pub fn decode(pairs: Vec<(String, String)>) -> Vec<Patch> {
    let mut patches: Vec<Patch> = pairs
        .into_iter()
        .filter_map(|(field, value)| {
            let (lsn, json) = value.split_once('|')?;
            let Ok(Value::Object(fields)) = serde_json::from_str(json) else { return None };
            Some(Patch { entry: EntryId::parse(&field)?, applied_lsn: lsn.parse().ok()?, fields })
        })
        .collect();
    patches.sort_by_key(|p| p.entry);
    patches
}

/// The patches a node whose applied watermark is `watermark` must merge.
pub fn visible(patches: Vec<Patch>, watermark: u64) -> Vec<Patch> {
    patches.into_iter().filter(|p| p.applied_lsn == 0 || p.applied_lsn > watermark).collect()
}

/// The row `base` (the resource's JSON value; `None` when no row was found)
/// with `patches` set in order. No row yet: the patches alone (a command
/// that creates it).
pub fn merge(base: Option<&[u8]>, patches: &[Patch]) -> Bytes {
    let mut row = match base.map(serde_json::from_slice::<Value>) {
        Some(Ok(Value::Object(row))) => row,
        _ => Map::new(),
    };
    for patch in patches {
        for (field, value) in &patch.fields {
            row.insert(field.clone(), value.clone());
        }
    }
    Bytes::from(Value::Object(row).to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn patches_sort_in_command_order_and_merge_over_the_row() {
        let pairs = vec![
            ("1700-10".to_string(), encode(0, &fields(json!({"name": "C"})))),
            ("1700-2".to_string(), encode(77, &fields(json!({"name": "B", "n": 2})))),
            ("junk".to_string(), "0|{}".to_string()),
            ("1700-3".to_string(), "0|not json".to_string()),
        ];
        let patches = decode(pairs);
        assert_eq!(patches.iter().map(|p| p.entry.seq).collect::<Vec<_>>(), vec![2, 10]);
        assert_eq!(patches[0].applied_lsn, 77);
        let base = br#"{"id": 1, "name": "A"}"#;
        let merged: Value = serde_json::from_slice(&merge(Some(base), &patches)).unwrap();
        assert_eq!(merged, json!({"id": 1, "name": "C", "n": 2}), "later commands win");
        // A node past 77 has the first command in its cache already.
        let seen = visible(patches.clone(), 77);
        assert_eq!(seen.len(), 1);
        assert_eq!(visible(patches.clone(), 76).len(), 2);
        let merged: Value = serde_json::from_slice(&merge(None, &seen)).unwrap();
        assert_eq!(merged, json!({"name": "C"}), "no row yet: the patches alone");
    }
}
