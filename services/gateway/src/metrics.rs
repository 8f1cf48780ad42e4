//! The gateway's metrics, under `herald_gateway_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub sockets: Gauge,
    pub subscriptions: Gauge,
    /// Channels this node holds a Redis subscription for.
    pub redis_channels: Gauge,
    pub deliveries: Counter,
    /// Publications not queued for a socket (its queue was full or closed).
    pub drops: Counter,
    pub slow_closes: Counter,
    pub closes: Family<CodeLabel, Counter>,
    pub refused_connections: Family<ResultLabel, Counter>,
    pub publications: Family<ResultLabel, Counter>,
    pub publish_errors: Counter,
    pub recoveries: Family<ResultLabel, Counter>,
    /// Publications read from history to answer recovering subscribes.
    pub recovery_reads: Counter,
    pub gaps: Family<ResultLabel, Counter>,
    pub rate_limited: Counter,
    pub rate_limit_fallbacks: Counter,
    pub malformed_messages: Counter,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("herald_gateway");
        r.register("sockets", "open WebSocket connections", self.sockets.clone());
        r.register("subscriptions", "channel subscriptions of open connections", self.subscriptions.clone());
        r.register("redis_channels", "channels with a Redis subscription on this node", self.redis_channels.clone());
        r.register("deliveries", "publications queued for a socket", self.deliveries.clone());
        r.register(
            "drops",
            "publications not queued because the socket's queue was full or closed",
            self.drops.clone(),
        );
        r.register("slow_closes", "connections closed because their queue overflowed", self.slow_closes.clone());
        r.register("closes", "connections closed by the server, by close code", self.closes.clone());
        r.register("refused_connections", "upgrades refused (limit, rate)", self.refused_connections.clone());
        r.register("publications", "publish API calls by result", self.publications.clone());
        r.register("publish_errors", "publications that could not be written to Redis", self.publish_errors.clone());
        r.register("recoveries", "subscriptions that asked to recover, by result", self.recoveries.clone());
        r.register(
            "recovery_reads",
            "publications read from history to answer recovering subscribes",
            self.recovery_reads.clone(),
        );
        r.register("gaps", "offset gaps seen on the live path, by how they were resolved", self.gaps.clone());
        r.register(
            "rate_limited",
            "commands, connections and publications refused by a rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "rate_limit_fallbacks",
            "tenant rate checks made locally because Redis failed",
            self.rate_limit_fallbacks.clone(),
        );
        r.register("malformed_messages", "pub/sub messages that could not be parsed", self.malformed_messages.clone());
    }
}
