//! Bounded staleness (issue 16): with `max_staleness_ms`, a node that cannot
//! vouch that its cache reflects every change committed longer ago than the
//! bound (capture or broadcast down) answers from Postgres; `on_stale =
//! "serve"` keeps answering from the cache. The bound is measured from the
//! freshness watermarks capture appends and broadcast forwards. Near caches
//! with a `max_staleness` stop answering from RAM past it; reads bypassed
//! during an outage take no more Postgres reads than the fill permits.

use std::time::Duration;

use herald_cache_api::Options;
use herald_client::state::StaleCause;
use herald_client::{NearCache, NearConfig};
use herald_core::config::{Config, OnStale, Shape};
use herald_proto::v1::{GetResponse, Layer};
use herald_tests::cache_api::{ACME_TOKEN, CacheNode, resource, sandbox_with};
use herald_tests::coherence::{Fault, Settings, World as Coherence};
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

fn bounded_near(node: &CacheNode) -> NearCache {
    let mut config = NearConfig::new(format!("http://{}", node.grpc_addr), ACME_TOKEN, &["acme"]);
    config.heartbeat_timeout = Duration::from_millis(1_500);
    config.backoff = (Duration::from_millis(20), Duration::from_millis(200));
    config.max_staleness = Some(Duration::from_millis(BOUND_MS));
    NearCache::connect(config).expect("near cache")
}

async fn near_name(near: &NearCache) -> String {
    let row: serde_json::Value = near.get_resource("acme", "user_by_slug", &["alice"]).await.unwrap().unwrap();
    row["name"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_stops_answering_from_ram_past_the_bound_while_capture_is_down() {
    let mut w = world().await;
    let near = bounded_near(&w.node);
    assert!(near.wait_live(Duration::from_secs(10)).await, "never live");
    assert_eventually!(
        10,
        async {
            let hits = near.metrics().hits.get();
            near_name(&near).await == "A" && near_name(&near).await == "A" && near.metrics().hits.get() > hits
        },
        "the near cache never answered from RAM within its bound"
    );

    w.capture.take().unwrap().stop().await.unwrap();
    w.sb.sql("UPDATE res_users SET name = 'A2' WHERE id = 1").await;
    tokio::time::sleep(Duration::from_millis(BOUND_MS + 300)).await;
    // The stream is still live (broadcast heartbeats, the node's L1 is
    // live), but no watermark has come for longer than the bound.
    assert!(near.is_live(), "the stream itself stays live");
    let hits = near.metrics().hits.get();
    assert_eq!(near_name(&near).await, "A2", "a near cache served a value older than its bound");
    assert_eq!(near_name(&near).await, "A2");
    assert_eq!(near.metrics().hits.get(), hits, "past the bound nothing is answered from RAM");
    assert!(near.stale_metrics().bypassed(StaleCause::WatermarkBehind) >= 2, "bypassed reads are counted");

    w.capture = Some(w.sb.spawn_capture().await);
    assert_eventually!(
        20,
        async {
            let hits = near.metrics().hits.get();
            near_name(&near).await == "A2" && near.metrics().hits.get() > hits
        },
        "the near cache never answered from RAM again after capture came back"
    );
    near.close();
    w.recovers().await;
}

/// The coherence checker with the bound: every read through the nodes and
/// the near caches, while each fault runs.
async fn judged(on_stale: OnStale) -> Vec<herald_tests::coherence::PhaseReport> {
    let settings = Settings {
        rows: 30,
        writers: 2,
        readers: 4,
        max_staleness: Some(Duration::from_millis(BOUND_MS)),
        on_stale,
        ..Settings::default()
    };
    let mut world = Coherence::start(settings).await;
    let mut reports = Vec::new();
    for fault in [Fault::Capture, Fault::Broadcast, Fault::RedisClients] {
        reports.push(world.run_phase(fault, Duration::from_secs(4)).await);
    }
    world.stop().await;
    for r in &reports {
        eprintln!("{r:?}");
        assert!(r.reads > 100 && r.writes > 20, "{}: too little traffic to judge: {r:?}", r.phase);
        assert_eq!(r.stale_after_quiesce, 0, "{}: stale values after quiesce: {:?}", r.phase, r.examples);
        assert_eq!(r.near_stale_after_quiesce, 0, "{}: near caches stale after quiesce: {:?}", r.phase, r.examples);
    }
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_returns_a_value_superseded_beyond_the_bound_while_capture_broadcast_or_redis_connections_die() {
    for r in judged(OnStale::Bypass).await {
        let bound = r.bound.as_ref().expect("judged against the bound");
        assert_eq!(bound.stale_beyond_bound, 0, "{}: reads beyond the bound: {:?}", r.phase, r.examples);
        assert_eq!(bound.near_stale_beyond_bound, 0, "{}: near reads beyond the bound: {:?}", r.phase, r.examples);
        assert_eq!(bound.served_stale_total(), 0, "{}: bypass serves nothing stale", r.phase);
        if r.phase != Fault::RedisClients.name() {
            // A second without watermarks: the bound must have acted.
            assert!(bound.bypassed_total() > 0, "{}: no read was bypassed: {bound:?}", r.phase);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_stale_serve_keeps_answering_from_the_cache_through_the_same_faults() {
    let reports = judged(OnStale::Serve).await;
    for r in &reports {
        let bound = r.bound.as_ref().expect("judged against the bound");
        assert_eq!(bound.bypassed_total(), 0, "{}: serve bypassed reads: {bound:?}", r.phase);
    }
    let capture = reports.iter().find(|r| r.phase == Fault::Capture.name()).expect("capture phase");
    let bound = capture.bound.as_ref().expect("judged");
    assert!(bound.served_stale_total() > 0, "capture down and nothing served past the bound: {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_bypassed_in_an_outage_open_no_more_postgres_reads_than_the_fill_permits() {
    const PERMITS: usize = 3;
    let sb = sandbox_with(|c| {
        c.cache.max_concurrent_fills = PERMITS;
        c.cache.max_fills_per_tenant = PERMITS;
        c.cache.fill_permit_timeout_ms = 60_000;
        c.cache.query_timeout_ms = 60_000;
        // Blocks while the test holds advisory lock 4243.
        let mut locked = resource(
            "locked_user",
            "SELECT u.id, u.name FROM res_users u, (SELECT pg_advisory_xact_lock_shared(4243)) l \
             WHERE u.tenant_id = $tenant AND u.id = $1",
            &["id"],
            Shape::Row,
            &["res_users.id=$1"],
        );
        locked.max_staleness_ms = Some(BOUND_MS);
        c.cache.resources.push(locked);
    })
    .await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (1, 'acme', 'A')").await;
    // The outage: capture is down, so no watermark vouches for the cache and
    // every read of the bounded resource goes to Postgres.
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let (locker, connection) = tokio_postgres::connect(&sb.config.postgres.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker.batch_execute("SELECT pg_advisory_lock(4243)").await.unwrap();

    let mut reads = Vec::new();
    for _ in 0..4 * PERMITS {
        let node = node.client().await;
        reads.push(tokio::spawn(async move {
            let mut node = node;
            let request = herald_proto::v1::GetRequest {
                tenant: "acme".into(),
                target: Some(herald_proto::v1::get_request::Target::Resource(herald_proto::v1::ResourceRef {
                    resource: "locked_user".into(),
                    params: vec!["1".into()],
                })),
                min_commit_lsn: 0,
            };
            node.get(herald_tests::cache_api::authed(request, ACME_TOKEN)).await
        }));
    }
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%4243%' \
                   AND pid <> pg_backend_pid()";
    assert_eventually!(
        20,
        async { sb.scalar_i64(waiting).await == PERMITS as i64 },
        "the bypassed reads never took every permit"
    );
    let asked = || node.metric("herald_cache_bypassed_total", "resource=\"locked_user\"");
    assert_eventually!(20, async { asked().await >= (4 * PERMITS) as f64 }, "not every read was a bypass");
    // Every read has arrived and is bypassing; Postgres sees only the permits.
    for _ in 0..20 {
        let open = sb.scalar_i64(waiting).await;
        assert!(open <= PERMITS as i64, "{open} postgres reads open, the permits are {PERMITS}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queries = node.metric("herald_cache_db_queries_total", "resource=\"locked_user\"").await;
    assert_eq!(queries, PERMITS as f64, "database reads started while the permits were held");

    locker.batch_execute("SELECT pg_advisory_unlock(4243)").await.unwrap();
    for read in reads {
        let answer = read.await.unwrap().expect("a bypassed read failed").into_inner();
        assert_eq!(answer.layer(), Layer::Database);
        assert_eq!(name(&answer), "A");
    }
    sb.cleanup().await;
}
