//! Rate limits: token buckets. A connection's bucket is local (the
//! connection lives on one node); a tenant's bucket is shared by every node
//! through Redis, and each node falls back to a local bucket of the same
//! size while Redis is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fred::prelude::*;
use herald_core::keys::{KeySpace, TenantId};

use crate::metrics::Metrics;

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { tokens: burst, last: Instant::now(), rate, burst }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Takes one token from the bucket at KEYS[1] (rate ARGV[1]/s, burst
/// ARGV[2]), using the server's clock so every node agrees. Returns 1 or 0.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local ok = 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return ok
"#;

/// Which of a tenant's buckets a limiter takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantBucket {
    /// Connects and subscribes of (untrusted) WebSocket clients.
    Clients,
    /// The app servers' publish API: a bucket of its own, so clients
    /// cannot use up the publications.
    Publish,
}

impl TenantBucket {
    /// The bucket's name in its Redis key (`…:rl:<name>`).
    fn name(self) -> &'static str {
        match self {
            TenantBucket::Clients => "gateway",
            TenantBucket::Publish => "gateway-publish",
        }
    }
}

/// Per-tenant limit shared through Redis.
pub struct TenantLimiter {
    bucket: TenantBucket,
    redis: Pool,
    keys: KeySpace,
    rate: f64,
    fallback: Mutex<HashMap<TenantId, Bucket>>,
    metrics: Metrics,
    /// Whether Redis is reachable; while it is not, the local bucket
    /// answers at once instead of waiting for a command timeout.
    redis_up: Arc<AtomicBool>,
}

/// Local fallback buckets kept at most; beyond this the map starts over.
const MAX_FALLBACK_TENANTS: usize = 10_000;

impl TenantLimiter {
    pub fn new(
        bucket: TenantBucket,
        redis: Pool,
        keys: KeySpace,
        per_s: u32,
        metrics: Metrics,
        redis_up: Arc<AtomicBool>,
    ) -> Self {
        Self { bucket, redis, keys, rate: per_s as f64, fallback: Mutex::new(HashMap::new()), metrics, redis_up }
    }

    /// Takes one token from `tenant`'s bucket.
    pub async fn take(&self, tenant: &TenantId) -> bool {
        let key = self.keys.rate_limit(tenant, self.bucket.name());
        let args = vec![self.rate.to_string(), self.rate.to_string()];
        let taken: Result<i64, fred::error::Error> = if self.redis_up.load(Ordering::Relaxed) {
            self.redis.next().eval(TAKE, vec![key], args).await
        } else {
            Err(fred::error::Error::new(fred::error::ErrorKind::IO, "redis is down"))
        };
        match taken {
            Ok(ok) => ok == 1,
            Err(error) => {
                tracing::debug!(%error, "tenant rate limit falls back to the local bucket");
                self.metrics.rate_limit_fallbacks.inc();
                let mut buckets = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
                if buckets.len() >= MAX_FALLBACK_TENANTS && !buckets.contains_key(tenant) {
                    buckets.clear();
                }
                buckets.entry(tenant.clone()).or_insert_with(|| Bucket::new(self.rate, self.rate)).take()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_refuses() {
        let mut b = Bucket::new(0.001, 3.0);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
    }
}
