//! The L1 section of the configuration (`[l1]`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct L1Config {
    /// Upper bound of the L1 cache, in bytes of keys and values.
    pub max_bytes: u64,
    /// Every L1 entry expires after this, whatever its own TTL.
    pub max_ttl_ms: u64,
    /// No heartbeat for this long: flush everything and bypass L1.
    pub heartbeat_timeout_ms: u64,
}

impl Default for L1Config {
    fn default() -> Self {
        Self { max_bytes: 64 * 1024 * 1024, max_ttl_ms: 300_000, heartbeat_timeout_ms: 3_000 }
    }
}
