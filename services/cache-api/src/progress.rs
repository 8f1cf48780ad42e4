//! Every cache-api node's applied freshness watermark, shared in Redis
//! (`KeySpace::node_watermarks`: node → `<lsn>:<secs>:<micros>`, the time
//! Redis's own): a node records its watermark when it advances (at most
//! every [`TICK`]) and at least every [`HEARTBEAT`]; a write-through call
//! waits until every node recorded within [`LIVE`] is past its commit. A
//! node that stopped recording (killed, cut off from Redis) no longer
//! counts after [`LIVE`]: it cannot serve from L1 without its feed either
//! (the feed's heartbeat timeout flushes it).

use std::time::Duration;

use fred::prelude::*;
use herald_core::l1::L1Cache;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a node looks at its watermark.
pub const TICK: Duration = Duration::from_millis(20);
/// How often a node records an unchanged watermark.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A node recorded within this long is live.
pub const LIVE: Duration = Duration::from_millis(2_000);
/// Records older than this are deleted by readers.
const FORGET_S: u64 = 60;
const REDIS_TIMEOUT: Duration = Duration::from_millis(1_000);

const RECORD: &str = "local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. t[1] .. ':' .. t[2])
return 1";

/// Redis's time, then the hash; records older than `ARGV[1]` seconds are
/// deleted first.
const READ: &str = "local t = redis.call('TIME')
local all = redis.call('HGETALL', KEYS[1])
local out = {t[1], t[2]}
for i = 1, #all, 2 do
  local secs = string.match(all[i + 1], '^%d+:(%d+):%d+$')
  if secs == nil or tonumber(t[1]) - tonumber(secs) > tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out";

/// One node's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWatermark {
    pub node: String,
    pub lsn: u64,
    /// Since the node recorded it.
    pub age: Duration,
}

fn micros(secs: &str, us: &str) -> Option<u64> {
    Some(secs.parse::<u64>().ok()? * 1_000_000 + us.parse::<u64>().ok()?)
}

/// Decodes [`READ`]'s reply; malformed records are skipped.
fn decode(reply: &[String]) -> Vec<NodeWatermark> {
    let Some(now) = reply.first().zip(reply.get(1)).and_then(|(s, us)| micros(s, us)) else { return Vec::new() };
    reply[2..]
        .chunks_exact(2)
        .filter_map(|pair| {
            let mut parts = pair[1].split(':');
            let lsn = parts.next()?.parse().ok()?;
            let at = micros(parts.next()?, parts.next()?)?;
            Some(NodeWatermark { node: pair[0].clone(), lsn, age: Duration::from_micros(now.saturating_sub(at)) })
        })
        .collect()
}

/// Every node's record.
pub async fn read(redis: &Pool, key: &str) -> anyhow::Result<Vec<NodeWatermark>> {
    let reply: Vec<String> =
        tokio::time::timeout(REDIS_TIMEOUT, redis.next().eval(READ, vec![key.to_string()], vec![FORGET_S.to_string()]))
            .await
            .map_err(|_| anyhow::anyhow!("redis: timed out"))??;
    Ok(decode(&reply))
}

/// Whether every live node has applied everything up to `position`.
pub fn all_live_past(nodes: &[NodeWatermark], position: u64) -> bool {
    nodes.iter().filter(|n| n.age <= LIVE).all(|n| n.lsn >= position)
}

/// Waits until every live node is past `position`, at most `wait`; false
/// when the wait ran out (or Redis could not tell).
pub async fn wait_past(redis: &Pool, key: &str, position: u64, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        match read(redis, key).await {
            Ok(nodes) if all_live_past(&nodes, position) => return true,
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "cannot read the nodes' watermarks"),
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5).min(deadline - Instant::now())).await;
    }
}

/// Records this node's watermark until `shutdown`, then removes the record.
pub async fn run(l1: L1Cache, redis: Pool, key: String, node: String, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let lsn = l1.applied().watermark_lsn;
        if last.is_some_and(|(l, at)| l == lsn && at.elapsed() < HEARTBEAT) {
            continue;
        }
        let record = redis.next().eval::<i64, _, _, _>(RECORD, vec![key.clone()], vec![node.clone(), lsn.to_string()]);
        match tokio::time::timeout(REDIS_TIMEOUT, record).await {
            Ok(Ok(_)) => last = Some((lsn, Instant::now())),
            Ok(Err(error)) => tracing::debug!(%error, "cannot record this node's watermark"),
            Err(_) => tracing::debug!("recording this node's watermark timed out"),
        }
    }
    let _ = tokio::time::timeout(REDIS_TIMEOUT, redis.next().hdel::<i64, _, _>(&key, &node)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_records_and_judges_liveness() {
        let reply: Vec<String> =
            ["100", "500000", "a", "42:100:0", "b", "7:97:0", "c", "junk"].iter().map(|s| s.to_string()).collect();
        let nodes = decode(&reply);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0], NodeWatermark { node: "a".into(), lsn: 42, age: Duration::from_millis(500) });
        assert_eq!(nodes[1].age, Duration::from_millis(3_500));
        // b is not live: only a counts.
        assert!(all_live_past(&nodes, 42));
        assert!(!all_live_past(&nodes, 43));
        assert!(all_live_past(&[], 1));
    }
}
