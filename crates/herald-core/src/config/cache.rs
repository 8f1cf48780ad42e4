//! The cache API's section, `[cache]`, and its resources, `[[resources]]`.

use serde::{Deserialize, Serialize};

use crate::error::Result;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Address of the ops HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub ops_addr: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { ops_addr: "0.0.0.0:9103".into() }
    }
}

impl CacheConfig {
    /// Checks the section; errors name the key (`cache.…`).
    pub(crate) fn validate(&self) -> Result<()> {
        Ok(())
    }
}
