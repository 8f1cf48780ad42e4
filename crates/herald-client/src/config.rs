//! What a near cache needs to know.

use std::time::Duration;

use crate::error::{Error, Result};

/// The near cache's configuration. [`NearConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct NearConfig {
    /// cache-api gRPC endpoints (`http://host:50051`); one is used at a
    /// time, the next when it fails.
    pub endpoints: Vec<String>,
    /// A cache-api token bound to every tenant in `tenants`.
    pub token: String,
    /// Tenants whose entries are cached (`["*"]`: every tenant, with an
    /// all-tenant token). Reads of other tenants are refused by the Watch
    /// filter's absence: their events would not arrive, so they are never
    /// stored — pass every tenant you read.
    pub tenants: Vec<String>,
    /// Upper bound of the cache, in bytes of keys, values and tags.
    pub max_bytes: u64,
    /// Every entry expires after this, whatever its own TTL.
    pub max_ttl: Duration,
    /// No message on the Watch stream for this long: flush and bypass. At
    /// least three times cache-api's `cache.watch_heartbeat_ms`.
    pub heartbeat_timeout: Duration,
    /// Each request to cache-api.
    pub request_timeout: Duration,
    /// Requests to cache-api in flight for misses (bounds the refill after
    /// a flush).
    pub max_concurrent_fills: usize,
    /// Reconnect backoff: first and longest delay (jittered).
    pub backoff: (Duration, Duration),
    /// The freshness bound (`max_staleness_ms`, as cache-api's): RAM answers
    /// only while the node's last reported staleness plus the time since it
    /// arrived is within it; otherwise reads go to cache-api, which applies
    /// its own bound. None: no bound (liveness alone decides).
    pub max_staleness: Option<Duration>,
}

impl NearConfig {
    pub fn new(endpoint: impl Into<String>, token: impl Into<String>, tenants: &[&str]) -> Self {
        Self {
            endpoints: vec![endpoint.into()],
            token: token.into(),
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            max_bytes: 64 * 1024 * 1024,
            max_ttl: Duration::from_secs(300),
            heartbeat_timeout: Duration::from_millis(1_500),
            request_timeout: Duration::from_secs(5),
            max_concurrent_fills: 64,
            backoff: (Duration::from_millis(50), Duration::from_secs(5)),
            max_staleness: None,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        let fail = |what: &str| Err(Error::Config(what.into()));
        if self.endpoints.is_empty() {
            return fail("no endpoint");
        }
        if self.tenants.is_empty() {
            return fail("no tenant to watch");
        }
        if self.heartbeat_timeout.is_zero() || self.request_timeout.is_zero() {
            return fail("timeouts must be greater than 0");
        }
        if self.max_staleness.is_some_and(|b| b.is_zero()) {
            return fail("max_staleness must be greater than 0");
        }
        if self.max_concurrent_fills == 0 {
            return fail("max_concurrent_fills must be greater than 0");
        }
        Ok(())
    }
}
