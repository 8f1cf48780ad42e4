//! Presence: who is subscribed to a channel, across every node, in a Redis
//! sorted set per channel (member: `{"client":…,"user":…}`, score: expiry in
//! ms). Each node refreshes its members every third of the TTL; members of a
//! node that died expire by themselves.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use herald_core::time::now_us;
use tokio_util::sync::CancellationToken;

/// Members returned by one presence query at most.
const MAX_LISTED: i64 = 1000;

pub struct Presence {
    redis: Pool,
    ttl_ms: u64,
    /// (presence key, member) of this node's subscriptions.
    members: Mutex<HashSet<(String, String)>>,
    /// While Redis is down, joins and leaves only change the local set (the
    /// heartbeat writes it once Redis is back; leaves expire).
    redis_up: Arc<AtomicBool>,
}

fn now_ms() -> i64 {
    now_us() / 1000
}

impl Presence {
    pub fn new(redis: Pool, ttl_ms: u64, redis_up: Arc<AtomicBool>) -> Self {
        Self { redis, ttl_ms, members: Mutex::default(), redis_up }
    }

    fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed)
    }

    pub fn member(client: &str, user: &str) -> String {
        serde_json::json!({"client": client, "user": user}).to_string()
    }

    /// Adds a member (best effort: Redis errors are logged; the heartbeat
    /// adds it again when Redis is back).
    pub async fn join(&self, key: &str, member: String) {
        self.members.lock().unwrap_or_else(|p| p.into_inner()).insert((key.to_string(), member.clone()));
        if !self.redis_up() {
            return;
        }
        if let Err(error) = self.refresh(&[(key.to_string(), member)]).await {
            tracing::debug!(%error, "presence join not written");
        }
    }

    pub async fn leave(&self, key: &str, member: String) {
        self.members.lock().unwrap_or_else(|p| p.into_inner()).remove(&(key.to_string(), member.clone()));
        if !self.redis_up() {
            return;
        }
        let removed: Result<i64, _> = self.redis.next().zrem(key, member).await;
        if let Err(error) = removed {
            tracing::debug!(%error, "presence leave not written");
        }
    }

    /// The live members of a channel.
    pub async fn list(&self, key: &str) -> Result<Vec<serde_json::Value>, fred::error::Error> {
        let now = now_ms();
        let _: i64 = self.redis.next().zremrangebyscore(key, f64::NEG_INFINITY, now as f64).await?;
        let members: Vec<String> =
            self.redis.next().zrangebyscore(key, now as f64, f64::INFINITY, false, Some((0, MAX_LISTED))).await?;
        Ok(members.iter().filter_map(|m| serde_json::from_str(m).ok()).collect())
    }

    async fn refresh(&self, members: &[(String, String)]) -> Result<(), fred::error::Error> {
        let expiry = (now_ms() + self.ttl_ms as i64) as f64;
        let pipeline = self.redis.next().pipeline();
        for (key, member) in members {
            let _: () = pipeline.zadd(key.as_str(), None, None, false, false, (expiry, member.as_str())).await?;
            let _: () = pipeline.pexpire(key.as_str(), (self.ttl_ms * 2) as i64, None).await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// Refreshes this node's members every third of the TTL.
    pub async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_millis((self.ttl_ms / 3).max(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if !self.redis_up() {
                continue;
            }
            let members: Vec<(String, String)> =
                self.members.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
            for chunk in members.chunks(1000) {
                if let Err(error) = self.refresh(chunk).await {
                    tracing::debug!(%error, "presence heartbeat failed");
                    break;
                }
            }
        }
    }
}
