//! Near caches (herald-client) against real Postgres, Redis and cache-api
//! nodes: invalidations reach every client, every doubt flushes, the Watch
//! stream keeps tenants apart, and answers of another node are not stored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_cache_api::Options;
use herald_client::feed::{self, FeedOptions, Messages, Source};
use herald_client::state::{Answer, Coherence};
use herald_client::{NearCache, NearConfig};
use herald_core::config::Config;
use herald_proto::v1::watch_message::Body;
use herald_proto::v1::{InvalidationEvent, WatchRequest};
use herald_tests::cache_api::{ACME_TOKEN, BACKEND_TOKEN, CacheNode, authed, sandbox};
use herald_tests::process::ChildService;
use herald_tests::{Sandbox, assert_eventually, free_port};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn near(addr: SocketAddr, tenants: &[&str]) -> NearCache {
    let mut config = NearConfig::new(format!("http://{addr}"), ACME_TOKEN, tenants);
    config.heartbeat_timeout = Duration::from_millis(1_500);
    config.backoff = (Duration::from_millis(20), Duration::from_millis(200));
    NearCache::connect(config).expect("connect")
}

async fn name_of(cache: &NearCache, slug: &str) -> Option<String> {
    match cache.get_resource::<Value>("acme", "user_by_slug", &[slug]).await {
        Ok(Some(row)) => row["name"].as_str().map(String::from),
        _ => None,
    }
}

async fn started(rows: &str) -> (Sandbox, herald_tests::ServiceHandle, herald_tests::ServiceHandle) {
    let sb = sandbox().await;
    sb.sql(&format!("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES {rows}")).await;
    let capture = sb.spawn_capture().await;
    let broadcast = sb.spawn_broadcast().await;
    (sb, capture, broadcast)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_drops_the_entry_in_two_clients_on_separate_connections() {
    let (sb, _capture, _broadcast) = started("(1, 'acme', 'alice', 'A'), (2, 'acme', 'bob', 'B')").await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let clients = [near(node.grpc_addr, &["acme"]), near(node.grpc_addr, &["acme"])];
    for client in &clients {
        assert!(client.wait_live(Duration::from_secs(10)).await, "never live");
        assert_eq!(name_of(client, "alice").await.as_deref(), Some("A"));
        assert_eq!(name_of(client, "bob").await.as_deref(), Some("B"));
        assert_eq!(client.entry_count(), 2, "both answers stored");
        let hits = client.metrics().hits.get();
        assert_eq!(name_of(client, "alice").await.as_deref(), Some("A"));
        assert_eq!(client.metrics().hits.get(), hits + 1, "the second read is served from RAM");
    }
    sb.sql("UPDATE res_users SET name = 'A2' WHERE id = 1").await;
    for client in &clients {
        assert_eventually!(10, async { client.entry_count() == 1 }, "the entry was not dropped");
        assert_eq!(name_of(client, "alice").await.as_deref(), Some("A2"));
        assert_eq!(name_of(client, "bob").await.as_deref(), Some("B"), "bob's entry stays");
        client.close();
    }
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_keeps_tenants_apart() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut client = node.client().await;
    let watch = |tenants: &[&str], token: &str| {
        authed(WatchRequest { tenants: tenants.iter().map(|t| t.to_string()).collect(), ..Default::default() }, token)
    };
    for tenants in [&["globex"][..], &["*"], &["acme", "globex"], &["acme", "*"]] {
        let refused = client.watch(watch(tenants, ACME_TOKEN)).await.expect_err("a tenant-A token watched more");
        assert!(
            matches!(refused.code(), tonic::Code::PermissionDenied | tonic::Code::InvalidArgument),
            "{tenants:?}: {refused:?}"
        );
    }
    let mut acme = client.watch(watch(&["acme"], ACME_TOKEN)).await.unwrap().into_inner();
    let mut every = client.watch(watch(&["*"], BACKEND_TOKEN)).await.unwrap().into_inner();
    for stream in [&mut acme, &mut every] {
        assert!(matches!(stream.message().await.unwrap().unwrap().body, Some(Body::Ready(_))));
    }
    let mut backend = node.client().await;
    for tenant in ["globex", "acme"] {
        let request = herald_proto::v1::InvalidateTagsRequest { tenant: tenant.into(), tags: vec!["t".into()] };
        backend.invalidate_tags(authed(request, BACKEND_TOKEN)).await.unwrap();
    }
    assert_eq!(tenants_seen(&mut every).await, ["globex", "acme"]);
    assert_eq!(tenants_seen(&mut acme).await, ["acme"], "tenant acme's stream carried another tenant's event");
    sb.cleanup().await;
}

/// The tenants of the events a stream carries: until two, or for 3 s.
async fn tenants_seen(stream: &mut tonic::Streaming<herald_proto::v1::WatchMessage>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while seen.len() < 2 {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(m))) => {
                if let Some(Body::Events(e)) = m.body {
                    seen.extend(e.events.iter().map(|e| e.tenant.clone()));
                }
            }
            _ => break,
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_and_the_client_flushes_when_the_nodes_subscription_flaps() {
    let (sb, _capture, _broadcast) = started("(1, 'acme', 'alice', 'A')").await;
    let node_name = herald_tests::unique("flap-");
    let node = sb.spawn_cache_api(Options { node: Some(node_name.clone()), ..Default::default() }).await;
    let mut raw = node.client().await;
    let watch = WatchRequest { tenants: vec!["acme".into()], ..Default::default() };
    let mut stream = raw.watch(authed(watch, ACME_TOKEN)).await.unwrap().into_inner();
    let cache = near(node.grpc_addr, &["acme"]);
    assert!(cache.wait_live(Duration::from_secs(10)).await);
    assert_eq!(name_of(&cache, "alice").await.as_deref(), Some("A"));
    assert_eq!(cache.entry_count(), 1);
    let flushes = cache.metrics().flushes.get();

    // The node's feed drops and comes back faster than any liveness poll
    // (`CLIENT KILL` of its pub/sub connection).
    sb.kill_pubsub_client(&format!("herald-cache-api-{node_name}")).await;
    sb.sql("UPDATE res_users SET name = 'A2' WHERE id = 1").await;

    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("watch carried on");
        match next {
            Ok(Some(message)) => assert!(message.body.is_some()),
            Ok(None) => panic!("the watch ended without saying why"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                break;
            }
        }
    }
    assert_eventually!(10, async { cache.metrics().flushes.get() > flushes }, "the client did not flush");
    assert_eventually!(10, async { name_of(&cache, "alice").await.as_deref() == Some("A2") }, "stale after quiesce");
    assert!(cache.wait_live(Duration::from_secs(10)).await, "the client never watched again");
    cache.close();
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_gets_data_loss() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut raw = node.client().await;
    let watch = WatchRequest { tenants: vec!["acme".into()], ..Default::default() };
    let mut stream = raw.watch(authed(watch, ACME_TOKEN)).await.unwrap().into_inner();
    assert!(matches!(stream.message().await.unwrap().unwrap().body, Some(Body::Ready(_))));
    // Far more than the node buffers for one watcher, while it reads nothing.
    let tag = "x".repeat(200);
    let events: Vec<InvalidationEvent> = (0..20_000)
        .map(|i| InvalidationEvent {
            event_id: format!("e{i}"),
            tenant: "acme".into(),
            tags: vec![tag.clone()],
            ..Default::default()
        })
        .collect();
    herald_core::l1::wire::publish_invalidations(&sb.redis, &sb.keys.l1_channel(), &events).await.unwrap();
    let applied = || async { node.metric("herald_l1_events_applied_total", "").await >= 20_000.0 };
    assert_eventually!(30, applied(), "events not applied");
    let mut seq = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("stream stalled") {
            Ok(Some(message)) => {
                if let Some(Body::Events(e)) = message.body {
                    assert_eq!(e.seq, seq + 1, "seq must increase by one");
                    seq = e.seq;
                }
            }
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    sb.cleanup().await;
}

/// A TCP proxy that stops forwarding (without closing) when told to.
async fn proxy(upstream: SocketAddr, forwarding: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else { continue };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, forwarding.clone()));
            tokio::spawn(pipe(sr, cw, forwarding.clone()));
        }
    });
    addr
}

async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, on: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if on.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Half-open: keep the other side's socket open, say nothing.
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_flushes_within_the_heartbeat_timeout() {
    let (sb, _capture, _broadcast) = started("(1, 'acme', 'alice', 'A')").await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let forwarding = Arc::new(AtomicBool::new(true));
    let via = proxy(node.grpc_addr, forwarding.clone()).await;
    let cache = near(via, &["acme"]);
    assert!(cache.wait_live(Duration::from_secs(10)).await);
    assert_eq!(name_of(&cache, "alice").await.as_deref(), Some("A"));
    assert_eq!(cache.entry_count(), 1);

    forwarding.store(false, Ordering::SeqCst);
    assert_eventually!(10, async { !cache.is_live() }, "still live on a dead connection");
    assert_eq!(cache.entry_count(), 0, "flushed");
    // While it is cut off nothing is served from RAM.
    let hits = cache.metrics().hits.get();
    let _ = tokio::time::timeout(Duration::from_secs(1), name_of(&cache, "alice")).await;
    assert_eq!(cache.metrics().hits.get(), hits);
    cache.close();
    sb.cleanup().await;
}

/// cache-api as a process with fixed ports (so it can be SIGKILLed and
/// restarted where clients look for it).
fn node_config(sb: &Sandbox) -> (Config, SocketAddr) {
    let mut config = sb.config.clone();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.cache.grpc_addr = grpc.to_string();
    config.cache.http_addr = format!("127.0.0.1:{}", free_port());
    config.cache.ops_addr = format!("127.0.0.1:{}", free_port());
    (config, grpc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_makes_the_client_bypass_then_refill_with_nothing_stale() {
    let (sb, _capture, _broadcast) = started("(1, 'acme', 'alice', 'A'), (2, 'acme', 'bob', 'B')").await;
    let (config, grpc) = node_config(&sb);
    let process = ChildService::spawn("herald-cache-api", &config);
    let cache = near(grpc, &["acme"]);
    assert!(cache.wait_live(Duration::from_secs(30)).await, "never live");
    assert_eq!(name_of(&cache, "alice").await.as_deref(), Some("A"));
    assert_eq!(name_of(&cache, "bob").await.as_deref(), Some("B"));

    process.kill().await;
    assert_eventually!(10, async { !cache.is_live() }, "still live without its node");
    assert_eq!(cache.entry_count(), 0);
    // Changed while the node is down: the client must not keep "A".
    sb.sql("UPDATE res_users SET name = 'A2' WHERE id = 1").await;
    assert!(cache.get_resource::<Value>("acme", "user_by_slug", &["alice"]).await.is_err(), "served without a node");

    let process = ChildService::spawn("herald-cache-api", &config);
    assert!(cache.wait_live(Duration::from_secs(30)).await, "never live again");
    assert_eventually!(10, async { name_of(&cache, "alice").await.as_deref() == Some("A2") }, "stale after quiesce");
    assert_eq!(name_of(&cache, "bob").await.as_deref(), Some("B"));
    assert_eq!(cache.entry_count(), 2, "refilled");
    cache.close();
    process.kill().await;
    sb.cleanup().await;
}

/// Watch on one node, for a [`Coherence`] the test drives itself.
struct WatchOn(CacheNode);

impl Source for WatchOn {
    fn open(&self, _rotate: bool) -> futures::future::BoxFuture<'static, Result<Messages, tonic::Status>> {
        let addr = self.0.grpc_addr;
        Box::pin(async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await;
            let channel = channel.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut client = herald_proto::v1::cache_client::CacheClient::new(channel);
            let watch = WatchRequest { tenants: vec!["acme".into()], ..Default::default() };
            let stream = client.watch(authed(watch, ACME_TOKEN)).await?.into_inner();
            Ok(futures::StreamExt::boxed(stream))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_a_lagging_node_is_not_stored() {
    let (sb, _capture, _broadcast) = started("(1, 'acme', 'alice', 'A')").await;
    let a = sb.spawn_cache_api(Options::default()).await;
    let (config, b_grpc) = node_config(&sb);
    let b = ChildService::spawn("herald-cache-api", &config);
    let b_client = || async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{b_grpc}")).unwrap().connect().await;
        channel.ok().map(herald_proto::v1::cache_client::CacheClient::new)
    };
    let get = herald_proto::v1::GetRequest {
        tenant: "acme".into(),
        target: Some(herald_proto::v1::get_request::Target::Resource(herald_proto::v1::ResourceRef {
            resource: "user_by_slug".into(),
            params: vec!["alice".into()],
        })),
        min_commit_lsn: 0,
    };
    // B holds alice in its L1.
    assert_eventually!(
        30,
        async {
            let Ok(Some(mut client)) = tokio::time::timeout(Duration::from_secs(1), b_client()).await else {
                return false;
            };
            client.get(authed(get.clone(), ACME_TOKEN)).await.is_ok_and(|r| r.into_inner().layer == 1)
        },
        "node B never served alice from L1"
    );
    let mut b_conn = b_client().await.expect("connect b");

    // The client follows A.
    let a_client = a.client().await;
    let state = Coherence::new(1 << 20, Duration::from_secs(60), Duration::from_millis(1_500));
    let options = FeedOptions {
        heartbeat_timeout: Duration::from_millis(1_500),
        backoff: (Duration::from_millis(20), Duration::from_millis(200)),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(feed::run(state.clone(), WatchOn(a), options, shutdown.clone()));
    assert_eventually!(10, async { state.is_live() }, "never live on A");

    // B lags: stopped while the row changes and A applies it.
    b.signal("STOP");
    let applied = state.l1().metrics().events_applied.get();
    sb.sql("UPDATE res_users SET name = 'A2' WHERE id = 1").await;
    assert_eventually!(10, async { state.l1().metrics().events_applied.get() > applied }, "A never sent the event");
    b.signal("CONT");
    let ticket = state.ticket();
    let answer = b_conn.get(authed(get.clone(), ACME_TOKEN)).await.unwrap().into_inner();
    let stale = String::from_utf8_lossy(&answer.value).contains("\"A\"");
    let stored = state.fill(
        ticket,
        "alice",
        Answer {
            tenant: "acme",
            global: answer.global,
            value: answer.value.clone(),
            tags: &answer.tags,
            expires_at_ms: answer.expires_at_ms,
            node_id: &answer.node_id,
            generation: answer.generation,
        },
    );
    assert!(!stored, "an answer of node B was stored while watching A (B's answer stale: {stale})");
    // The same answer from A is stored: the refusal is the node check.
    let ticket = state.ticket();
    let mut a_conn = a_client.clone();
    let answer = a_conn.get(authed(get.clone(), ACME_TOKEN)).await.unwrap().into_inner();
    let fill = Answer {
        tenant: "acme",
        global: answer.global,
        value: answer.value.clone(),
        tags: &answer.tags,
        expires_at_ms: answer.expires_at_ms,
        node_id: &answer.node_id,
        generation: answer.generation,
    };
    assert!(state.fill(ticket, "alice", fill), "A's own answer was refused");
    assert!(String::from_utf8_lossy(&state.get("alice").unwrap()).contains("A2"));
    shutdown.cancel();
    b.kill().await;
    sb.cleanup().await;
}
