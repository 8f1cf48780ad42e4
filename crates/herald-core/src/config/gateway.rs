//! The gateway's section, `[gateway]`: listeners, token keys, channel
//! namespaces and limits.

use serde::{Deserialize, Serialize};

use crate::error::Result;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address of the ops HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub ops_addr: String,
    /// Address of the WebSocket and HTTP publish listener.
    pub listen_addr: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self { ops_addr: "0.0.0.0:9104".into(), listen_addr: "0.0.0.0:8081".into() }
    }
}

impl GatewayConfig {
    /// Checks the section; errors name the key (`gateway.…`).
    pub(crate) fn validate(&self) -> Result<()> {
        Ok(())
    }
}
