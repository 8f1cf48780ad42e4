//! Bounded staleness (issue 16): with `max_staleness_ms`, a node that cannot
//! vouch that its cache reflects every change committed longer ago than the
//! bound (capture or broadcast down) answers from Postgres; `on_stale =
//! "serve"` keeps answering from the cache. The bound is measured from the
//! freshness watermarks capture appends and broadcast forwards.

use std::time::Duration;

use herald_cache_api::Options;
use herald_core::config::{Config, OnStale};
use herald_proto::v1::{GetResponse, Layer};
use herald_tests::cache_api::{ACME_TOKEN, CacheNode, sandbox_with};
use herald_tests::{Sandbox, ServiceHandle, assert_eventually};

const BOUND_MS: u64 = 500;

/// `user_by_slug` bounded (bypass), `user_by_id` bounded but served stale,
/// `user_probe` unbounded.
fn bounded(c: &mut Config) {
    for r in &mut c.cache.resources {
        match r.name.as_str() {
            "user_by_slug" => r.max_staleness_ms = Some(BOUND_MS),
            "user_by_id" => {
                r.max_staleness_ms = Some(BOUND_MS);
                r.on_stale = OnStale::Serve;
            }
            _ => {}
        }
    }
    // Liveness alone would flush L1 after 3 s; the bound must act first.
    c.l1.heartbeat_timeout_ms = 60_000;
}

fn name(answer: &GetResponse) -> String {
    let row: serde_json::Value = serde_json::from_slice(&answer.value).unwrap();
    row["name"].as_str().unwrap_or_default().to_string()
}

struct World {
    sb: Sandbox,
    node: CacheNode,
    capture: Option<ServiceHandle>,
    broadcast: Option<ServiceHandle>,
}

/// Everything running, alice cached in L1 by all three resources.
async fn world() -> World {
    let sb = sandbox_with(bounded).await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (1, 'acme', 'alice', 'A')").await;
    let broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let capture = sb.spawn_capture().await;
    // Until the first watermark arrives the node cannot vouch for anything.
    assert_eventually!(
        10,
        async {
            node.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap();
            node.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap().layer() == Layer::L1
        },
        "a bounded resource never served from L1"
    );
    for (resource, param) in [("user_by_id", "1"), ("user_probe", "1")] {
        node.get(ACME_TOKEN, "acme", resource, &[param]).await.unwrap();
        assert_eq!(node.get(ACME_TOKEN, "acme", resource, &[param]).await.unwrap().layer(), Layer::L1);
    }
    World { sb, node, capture: Some(capture), broadcast: Some(broadcast) }
}

impl World {
    async fn read(&self, resource: &str, param: &str) -> GetResponse {
        self.node.get(ACME_TOKEN, "acme", resource, &[param]).await.unwrap()
    }

    /// With the pipeline broken, an update nobody invalidates; then past the
    /// bound, each resource answers by its contract.
    async fn update_unseen_and_check(&self) {
        self.sb.sql("UPDATE res_users SET name = 'A2' WHERE id = 1").await;
        tokio::time::sleep(Duration::from_millis(BOUND_MS + 300)).await;

        let slug = self.read("user_by_slug", "alice").await;
        assert_eq!(name(&slug), "A2", "a bounded resource served a value older than its bound from {:?}", slug.layer());
        assert_eq!(slug.layer(), Layer::Database);
        let served = self.read("user_by_id", "1").await;
        assert_eq!(
            (name(&served), served.layer()),
            ("A".to_string(), Layer::L1),
            "on_stale = serve answers from the cache"
        );
        let unbounded = self.read("user_probe", "1").await;
        assert_eq!(unbounded.layer(), Layer::L1, "an unbounded resource keeps today's behaviour");

        let bypassed = self.node.metric("herald_cache_bypassed_total", "resource=\"user_by_slug\"").await;
        assert!(bypassed >= 1.0, "bypassed reads are counted");
        assert!(self.node.readyz().await.contains("staleness_ms: "), "{}", self.node.readyz().await);
    }

    /// Once the pipeline is back, the invalidation lands and the cache
    /// answers again, with the new value.
    async fn recovers(self) {
        assert_eventually!(
            20,
            async {
                let slug = self.read("user_by_slug", "alice").await;
                assert_eq!(name(&slug), "A2");
                slug.layer() != Layer::Database && name(&self.read("user_by_id", "1").await) == "A2"
            },
            "the cache never answered again after the pipeline came back"
        );
        self.sb.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_resource_reads_postgres_while_capture_is_down() {
    let mut w = world().await;
    w.capture.take().unwrap().stop().await.unwrap();
    w.update_unseen_and_check().await;
    w.capture = Some(w.sb.spawn_capture().await);
    w.recovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_resource_reads_postgres_while_broadcast_is_down() {
    let mut w = world().await;
    w.broadcast.take().unwrap().stop().await.unwrap();
    w.update_unseen_and_check().await;
    w.broadcast = Some(w.sb.spawn_broadcast().await);
    w.recovers().await;
}
