//! The ops channel (`[gateway.ops]`): broadcast and every gateway publish a
//! JSON stats message on it each interval, through [`channel::publish`]
//! like any publication, so the live console follows Herald through Herald
//! itself. Only tokens of the ops tenant may subscribe to its namespace
//! (the gateway checks that in `conn.rs`).

use std::time::Duration;

use fred::prelude::Pool;
use tokio_util::sync::CancellationToken;

use crate::channel::{self, Channel, HistoryOptions};
use crate::config::GatewayConfig;
use crate::keys::{KeySpace, TenantId};

/// Where stats go, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct OpsChannel {
    pub tenant: TenantId,
    pub channel: Channel,
    history: HistoryOptions,
    pub interval: Duration,
}

impl OpsChannel {
    /// `None` when `[gateway.ops]` is not configured (validation has
    /// checked the tenant, the channel and its namespace).
    pub fn from_config(gateway: &GatewayConfig) -> Option<Self> {
        let ops = gateway.ops.as_ref()?;
        let tenant = TenantId::new(&ops.tenant).ok()?;
        let channel = Channel::parse(&ops.channel).ok()?;
        let ns = gateway.namespace(channel.namespace())?;
        Some(Self {
            tenant,
            channel,
            history: HistoryOptions { size: ns.history_size, ttl_s: ns.history_ttl_s },
            interval: Duration::from_millis(ops.interval_ms),
        })
    }

    /// Whether a token of `tenant` may subscribe to `channel`: the ops
    /// namespace belongs to the ops tenant alone.
    pub fn allows(&self, tenant: &TenantId, channel: &Channel) -> bool {
        channel.namespace() != self.channel.namespace() || *tenant == self.tenant
    }

    /// Publishes one stats message (JSON text).
    pub async fn publish(&self, redis: &Pool, keys: &KeySpace, json: &[u8]) -> crate::Result<channel::Published> {
        channel::publish(redis, keys, &self.tenant, &self.channel, self.history, json, None).await
    }

    /// Calls `message` every interval until `shutdown` and publishes what it
    /// returns; a failed publication is logged and the next one tried.
    pub async fn publish_every(
        self,
        redis: Pool,
        keys: KeySpace,
        shutdown: CancellationToken,
        mut message: impl FnMut(Duration) -> Vec<u8>,
    ) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = tokio::time::Instant::now();
            let json = message(now - last);
            last = now;
            if let Err(error) = self.publish(&redis, &keys, &json).await {
                tracing::debug!(%error, channel = %self.channel, "stats not published");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn only_the_ops_tenant_may_subscribe_to_the_ops_namespace() {
        let text = "[gateway.ops]\ntenant = \"ops\"\n[[gateway.namespaces]]\nname = \"ops\"\n\
                    [[gateway.namespaces]]\nname = \"team\"\n";
        let config = Config::load(text, &Default::default()).unwrap();
        let ops = OpsChannel::from_config(&config.gateway).unwrap();
        let (ops_tenant, demo) = (TenantId::new("ops").unwrap(), TenantId::new("demo").unwrap());
        let stats = Channel::parse("ops:stats").unwrap();
        assert!(ops.allows(&ops_tenant, &stats));
        assert!(!ops.allows(&demo, &stats));
        assert!(!ops.allows(&demo, &Channel::parse("ops:other").unwrap()));
        assert!(ops.allows(&demo, &Channel::parse("team:1").unwrap()));
    }
}
