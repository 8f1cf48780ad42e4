//! The cache API's metrics, under `herald_cache_*`, per resource (`kv` for
//! explicit keys) and layer.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabel {
    pub resource: String,
    pub layer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub resource: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub resource: String,
    pub cause: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    /// Answers per resource and the layer that gave them (l1, l2, database).
    pub hits: Family<LayerLabel, Counter>,
    /// Lookups that missed a layer.
    pub misses: Family<LayerLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    /// Postgres reads of a resource.
    pub db_queries: Family<ResourceLabel, Counter>,
    /// Fills stored nowhere because an invalidation passed them.
    pub rejected_stale_fills: Family<LayerLabel, Counter>,
    /// Requests that joined another request's fill on this node.
    pub single_flight_merges: Family<ResourceLabel, Counter>,
    /// Fills that waited for another node's fill (lease) instead of reading.
    pub lease_waits: Family<ResourceLabel, Counter>,
    /// Seconds from a miss to the value read from Postgres.
    pub fill_seconds: Family<ResourceLabel, Histogram>,
    /// 1 while Redis is unreachable and answers come from Postgres.
    pub degraded: Gauge,
    /// Reads answered from Postgres because the node could not vouch for
    /// the cache, by cause.
    pub bypassed: Family<CauseLabel, Counter>,
    /// Reads served from the cache past their freshness bound
    /// (`on_stale = "serve"`), by cause.
    pub served_stale: Family<CauseLabel, Counter>,
    /// Milliseconds since the Postgres time of the newest watermark applied
    /// (plus `cache.clock_skew_ms`): every answer from the cache reflects
    /// every change committed longer ago. -1 before the first watermark.
    pub staleness_ms: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            hits: Family::default(),
            misses: Family::default(),
            errors: Family::default(),
            db_queries: Family::default(),
            rejected_stale_fills: Family::default(),
            single_flight_merges: Family::default(),
            lease_waits: Family::default(),
            fill_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 18))),
            degraded: Gauge::default(),
            bypassed: Family::default(),
            served_stale: Family::default(),
            staleness_ms: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("herald_cache");
        r.register("hits", "answers by resource and the layer that gave them", self.hits.clone());
        r.register("misses", "lookups that missed a layer", self.misses.clone());
        r.register("errors", "failed requests by resource and kind", self.errors.clone());
        r.register("db_queries", "Postgres reads of a resource", self.db_queries.clone());
        r.register(
            "rejected_stale_fills",
            "fills not stored because an invalidation passed them",
            self.rejected_stale_fills.clone(),
        );
        r.register(
            "single_flight_merges",
            "requests that joined a fill already running on this node",
            self.single_flight_merges.clone(),
        );
        r.register("lease_waits", "fills that waited for another node's fill", self.lease_waits.clone());
        r.register("fill_seconds", "miss to value read from Postgres", self.fill_seconds.clone());
        r.register("degraded", "1 while Redis is unreachable and answers come from Postgres", self.degraded.clone());
        r.register(
            "bypassed",
            "reads answered from Postgres because the node could not vouch for its cache, by cause",
            self.bypassed.clone(),
        );
        r.register(
            "served_stale",
            "reads served from the cache past their freshness bound (on_stale = serve), by cause",
            self.served_stale.clone(),
        );
        r.register(
            "staleness_ms",
            "milliseconds since the Postgres time of the newest freshness watermark applied (-1: none yet)",
            self.staleness_ms.clone(),
        );
    }

    pub fn hit(&self, resource: &str, layer: &'static str) {
        self.hits.get_or_create(&LayerLabel { resource: resource.into(), layer }).inc();
    }

    pub fn miss(&self, resource: &str, layer: &'static str) {
        self.misses.get_or_create(&LayerLabel { resource: resource.into(), layer }).inc();
    }

    pub fn rejected(&self, resource: &str, layer: &'static str) {
        self.rejected_stale_fills.get_or_create(&LayerLabel { resource: resource.into(), layer }).inc();
    }

    pub fn cause(&self, family: &Family<CauseLabel, Counter>, resource: &str, cause: &'static str) {
        family.get_or_create(&CauseLabel { resource: resource.into(), cause }).inc();
    }

    pub fn error(&self, resource: &str, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabel { resource: resource.into(), kind }).inc();
    }

    pub fn resource(&self, family: &Family<ResourceLabel, Counter>, resource: &str) {
        family.get_or_create(&ResourceLabel { resource: resource.into() }).inc();
    }
}
