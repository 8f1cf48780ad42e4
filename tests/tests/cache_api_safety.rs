//! The cache API's safety properties: a fill that races an invalidation is
//! never kept, tenants never reach each other's data, bad input gets a clear
//! error, secrets are refused at start, and losing Redis degrades to
//! Postgres without serving anything stale.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use herald_cache_api::Options;
use herald_cache_api::cache::FillHook;
use herald_core::keys::{Scope, TenantId};
use herald_proto::v1::{
    DeleteRequest, GetManyRequest, GetRequest, InvalidatePrefixRequest, InvalidateTagsRequest, Layer, ResourceRef,
    SetRequest, WatchRequest, delete_request, get_request,
};
use herald_tests::cache_api::{ACME_TOKEN, BACKEND_TOKEN, CacheNode, GLOBEX_TOKEN, authed, sandbox, sandbox_with};
use herald_tests::{assert_eventually, free_port, start_redis};
use tokio::sync::Notify;
use tonic::Code;

fn name_of(value: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(value).expect("json");
    v["name"].as_str().unwrap_or_default().to_string()
}

/// Pauses the next fill of keys ending in `suffix`, between its database
/// read and its store, until released.
struct Gate {
    suffix: String,
    armed: AtomicBool,
    paused: Notify,
    release: Notify,
}

impl Gate {
    fn hook(self: &Arc<Self>) -> FillHook {
        let gate = self.clone();
        Arc::new(move |key: String| {
            let gate = gate.clone();
            Box::pin(async move {
                if key.ends_with(&gate.suffix) && gate.armed.swap(false, Ordering::SeqCst) {
                    gate.paused.notify_one();
                    gate.release.notified().await;
                }
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_races_an_invalidation_is_never_kept() {
    let sb = sandbox().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (1, 'acme', 'old')").await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let gate = Arc::new(Gate {
        suffix: ":user_by_id:p:1".into(),
        armed: AtomicBool::new(false),
        paused: Notify::new(),
        release: Notify::new(),
    });
    let a = sb.spawn_cache_api(Options { fill_hook: Some(gate.hook()), ..Default::default() }).await;
    let b = sb.spawn_cache_api(Options::default()).await;
    // Node a's applied invalidations, as its watchers see them (after L1
    // applied them; L2 was invalidated before that).
    let watch = WatchRequest {
        tenant: "acme".into(),
        tables: vec![],
        tags: vec!["res_users.id=1".into()],
        ..Default::default()
    };
    let mut applied = a.client().await.watch_invalidations(authed(watch, ACME_TOKEN)).await.unwrap().into_inner();
    gate.armed.store(true, Ordering::SeqCst);
    let reader = {
        let addr = a.grpc_addr;
        tokio::spawn(async move {
            let node = CacheNodeAddr(addr);
            node.get_user(1).await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), gate.paused.notified()).await.expect("the fill never paused");
    // The fill holds 'old' from the database. Now a write commits and its
    // invalidation reaches L2 (broadcast deletes before it publishes) and
    // node a's L1.
    sb.sql("UPDATE res_users SET name = 'new' WHERE id = 1").await;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), applied.message())
            .await
            .expect("the update's invalidation never reached node a")
            .unwrap()
            .unwrap();
        if event.operation() == herald_proto::v1::Operation::Update {
            break;
        }
    }
    gate.release.notify_one();
    let raced = reader.await.unwrap();
    assert_eq!(name_of(&raced.value), "old", "the forced interleaving did not happen");
    assert_eq!(raced.layer(), Layer::Database);

    // Nothing kept the raced value: not L2, not either L1.
    assert!(a.metric("herald_cache_rejected_stale_fills_total", "layer=\"l2\"").await >= 1.0);
    let key = sb.keys.entry(&Scope::Tenant(TenantId::new("acme").unwrap()), "user_by_id", "p:1").unwrap();
    let exists: i64 = sb.redis.next().exists(key).await.unwrap();
    assert_eq!(exists, 0, "the raced fill was stored in L2");
    for node in [&a, &b, &a, &b] {
        let answer = node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap();
        assert_eq!(name_of(&answer.value), "new", "a stale value was served after the race");
    }
    sb.cleanup().await;
}

/// A node reached by address only (for moving into a task).
struct CacheNodeAddr(std::net::SocketAddr);

impl CacheNodeAddr {
    async fn get_user(&self, id: u32) -> herald_proto::v1::GetResponse {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", self.0)).unwrap().connect().await.unwrap();
        let mut client = herald_proto::v1::cache_client::CacheClient::new(channel);
        let request = GetRequest {
            tenant: "acme".into(),
            target: Some(get_request::Target::Resource(ResourceRef {
                resource: "user_by_id".into(),
                params: vec![id.to_string()],
            })),
            min_commit_lsn: 0,
        };
        client.get(authed(request, ACME_TOKEN)).await.unwrap().into_inner()
    }
}

fn resource_get(tenant: &str, resource: &str, params: &[&str]) -> GetRequest {
    GetRequest {
        tenant: tenant.into(),
        target: Some(get_request::Target::Resource(ResourceRef {
            resource: resource.into(),
            params: params.iter().map(|s| s.to_string()).collect(),
        })),
        min_commit_lsn: 0,
    }
}

fn key_get(tenant: &str, key: &str) -> GetRequest {
    GetRequest { tenant: tenant.into(), target: Some(get_request::Target::Key(key.into())), min_commit_lsn: 0 }
}

fn set(tenant: &str, key: &str, value: Bytes) -> SetRequest {
    SetRequest {
        tenant: tenant.into(),
        key: key.into(),
        value,
        ttl_ms: 60_000,
        tags: vec![],
        fill_token: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_token_never_reaches_another_tenant() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (tenant_id, website_slug, name) VALUES ('acme', 'alice', 'Acme Alice'), ('globex', 'alice', 'Globex Alice')")
        .await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut c = node.client().await;

    // Every gRPC operation on globex with acme's token is refused.
    let denied = |r: Result<(), tonic::Status>, what: &str| {
        let code = r.expect_err(what).code();
        assert_eq!(code, Code::PermissionDenied, "{what}");
    };
    denied(
        c.get(authed(resource_get("globex", "user_by_slug", &["alice"]), ACME_TOKEN)).await.map(|_| ()),
        "get resource",
    );
    denied(c.get(authed(key_get("globex", "k"), ACME_TOKEN)).await.map(|_| ()), "get key");
    let many = GetManyRequest { tenant: "globex".into(), items: vec![], min_commit_lsn: 0 };
    denied(c.get_many(authed(many, ACME_TOKEN)).await.map(|_| ()), "get many");
    denied(c.set(authed(set("globex", "k", Bytes::from_static(b"x")), ACME_TOKEN)).await.map(|_| ()), "set");
    let delete = DeleteRequest { tenant: "globex".into(), target: Some(delete_request::Target::Key("k".into())) };
    denied(c.delete(authed(delete, ACME_TOKEN)).await.map(|_| ()), "delete");
    let tags = InvalidateTagsRequest { tenant: "globex".into(), tags: vec!["res_users.website_slug=alice".into()] };
    denied(c.invalidate_tags(authed(tags, ACME_TOKEN)).await.map(|_| ()), "invalidate tags");
    let all = InvalidatePrefixRequest { tenant: "globex".into(), all: true, ..Default::default() };
    denied(c.invalidate_prefix(authed(all, ACME_TOKEN)).await.map(|_| ()), "invalidate prefix");
    let watch = WatchRequest { tenant: "globex".into(), ..Default::default() };
    denied(c.watch_invalidations(authed(watch, ACME_TOKEN)).await.map(|_| ()), "watch");

    // And over HTTP.
    for (method, path, body) in [
        ("GET", "/v1/t/globex/r/user_by_slug?slug=alice", &b""[..]),
        ("DELETE", "/v1/t/globex/r/user_by_slug?slug=alice", b""),
        ("GET", "/v1/t/globex/k/k", b""),
        ("PUT", "/v1/t/globex/k/k", b"x"),
        ("DELETE", "/v1/t/globex/k/k", b""),
        ("POST", "/v1/t/globex/get", br#"{"items":[]}"#),
        ("POST", "/v1/t/globex/invalidate", br#"{"all":true}"#),
    ] {
        let r = node.http(method, path, Some(ACME_TOKEN), body).await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "permission_denied");
    }
    // Without a token, or with a wrong one: unauthenticated.
    assert_eq!(
        c.get(tonic::Request::new(resource_get("acme", "user_by_slug", &["alice"]))).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.get(authed(resource_get("acme", "user_by_slug", &["alice"]), "not-a-token-at-all")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(node.http("GET", "/v1/t/acme/r/user_by_slug?slug=alice", None, b"").await.status, 401);

    // Same names, separate data.
    let acme = node.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap();
    let globex = node.get(GLOBEX_TOKEN, "globex", "user_by_slug", &["alice"]).await.unwrap();
    assert_eq!((name_of(&acme.value), name_of(&globex.value)), ("Acme Alice".into(), "Globex Alice".into()));
    c.set(authed(set("acme", "shared-name", Bytes::from_static(b"acme's")), ACME_TOKEN)).await.unwrap();
    let other = c.get(authed(key_get("globex", "shared-name"), GLOBEX_TOKEN)).await.unwrap().into_inner();
    assert!(!other.found, "globex read acme's key");
    // Acme invalidating its tag leaves globex's entry alone.
    let tags = InvalidateTagsRequest { tenant: "acme".into(), tags: vec!["res_users.website_slug=alice".into()] };
    c.invalidate_tags(authed(tags, ACME_TOKEN)).await.unwrap();
    assert_eventually!(
        5,
        async { node.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap().layer() != Layer::L1 },
        "acme's entry survived its invalidation"
    );
    assert_eq!(node.get(GLOBEX_TOKEN, "globex", "user_by_slug", &["alice"]).await.unwrap().layer(), Layer::L1);
    // The backend token serves every tenant; a tenant token cannot drop
    // global data (none configured here, so it is an unknown resource).
    assert!(node.get(BACKEND_TOKEN, "globex", "user_by_slug", &["alice"]).await.is_ok());
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_breaks_nothing() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (1, 'acme', 'alice', 'Alice')").await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut c = node.client().await;
    let status = |r: Result<tonic::Response<herald_proto::v1::GetResponse>, tonic::Status>| r.unwrap_err();

    for tenant in ["", "a b", "x}y", "t:1", &"t".repeat(65)] {
        let e = status(c.get(authed(resource_get(tenant, "user_by_slug", &["alice"]), BACKEND_TOKEN)).await);
        assert_eq!(e.code(), Code::InvalidArgument, "tenant {tenant:?}");
        assert!(e.message().contains("tenant"), "{}", e.message());
    }
    let e = status(c.get(authed(resource_get("acme", "nope", &[]), ACME_TOKEN)).await);
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("unknown resource \"nope\""), "{}", e.message());
    let e = status(c.get(authed(resource_get("acme", "user_by_slug", &["a", "b"]), ACME_TOKEN)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("takes 1 parameter(s) (slug), got 2"), "{}", e.message());
    let e = status(c.get(authed(resource_get("acme", "user_by_id", &["abc"]), ACME_TOKEN)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("bad parameter"), "{}", e.message());
    let e = status(c.get(authed(key_get("acme", "has space"), ACME_TOKEN)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    let e =
        status(c.get(authed(GetRequest { tenant: "acme".into(), target: None, min_commit_lsn: 0 }, ACME_TOKEN)).await);
    assert_eq!(e.code(), Code::InvalidArgument);

    let oversize = Bytes::from(vec![b'x'; 64 * 1024 + 1]);
    let e = c.set(authed(set("acme", "big", oversize.clone()), ACME_TOKEN)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("over the limit"), "{}", e.message());
    let mut bad_token = set("acme", "k", Bytes::from_static(b"v"));
    bad_token.fill_token = "forged".into();
    assert_eq!(c.set(authed(bad_token, ACME_TOKEN)).await.unwrap_err().code(), Code::InvalidArgument);
    let mut long_ttl = set("acme", "k", Bytes::from_static(b"v"));
    long_ttl.ttl_ms = 365 * 86_400_000;
    assert!(c.set(authed(long_ttl, ACME_TOKEN)).await.unwrap_err().message().contains("max_key_ttl_ms"));

    // HTTP says the same with status codes and a JSON body.
    for (method, path, body, code) in [
        ("GET", "/v1/t/a%20b/r/user_by_slug?slug=x", &b""[..], 400),
        ("GET", "/v1/t/acme/r/nope", b"", 404),
        ("GET", "/v1/t/acme/r/user_by_slug", b"", 400),
        ("GET", "/v1/t/acme/r/user_by_slug?slug=a&colour=red", b"", 400),
        ("GET", "/v1/t/acme/r/user_by_slug?slug=%zz", b"", 400),
        ("POST", "/v1/t/acme/invalidate", b"{not json", 400),
        ("POST", "/v1/t/acme/invalidate", br#"{"tags":["t"],"all":true}"#, 400),
        ("PUT", "/v1/t/acme/k/k?ttl_ms=soon", b"v", 400),
    ] {
        let r = node.http(method, path, Some(ACME_TOKEN), body).await;
        assert_eq!(r.status, code, "{method} {path}: {}", r.text());
        assert!(!r.json()["error"]["message"].as_str().unwrap().is_empty());
    }
    let r = node.http("PUT", "/v1/t/acme/k/big", Some(ACME_TOKEN), &oversize).await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (413, Some("too_large")), "{}", r.text());

    // Nothing broke: the node still answers, and stored nothing bad.
    let ok = node.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap();
    assert_eq!(name_of(&ok.value), "Alice");
    assert!(!c.get(authed(key_get("acme", "big"), ACME_TOKEN)).await.unwrap().into_inner().found);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_selecting_a_secret_is_refused_at_start() {
    let sb = sandbox().await;
    let mut config = sb.config.clone();
    let mut secret = config.cache.resources[1].clone();
    secret.name = "user_login".into();
    secret.sql = "SELECT id, name AS password_hash FROM res_users WHERE tenant_id = $tenant AND id = $1".into();
    config.cache.resources.push(secret.clone());
    let err = sb.start_cache_api(config.clone(), Options::default()).await.join().await.unwrap_err().to_string();
    assert!(err.contains("user_login") && err.contains("looks like a secret"), "{err}");

    // Allowed explicitly, it starts.
    config.cache.resources.last_mut().unwrap().allow_secret_columns = vec!["password_hash".into()];
    let node = sb.start_cache_api(config.clone(), Options::default()).await;
    assert_eventually!(10, async { node.readyz().await.contains("resources: ok") }, "did not start");
    node.stop().await.unwrap();

    // A tag naming a column the query does not select is refused too.
    config.cache.resources.last_mut().unwrap().tags = vec!["res_users.id={missing}".into()];
    let err = sb.start_cache_api(config, Options::default()).await.join().await.unwrap_err().to_string();
    assert!(err.contains("{missing}"), "{err}");
    sb.cleanup().await;
}

async fn name_now(node: &CacheNode) -> (String, Layer) {
    let r = node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.expect("answer while degraded");
    (name_of(&r.value), r.layer())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_answers_come_from_postgres_and_stay_correct() {
    let port = free_port();
    let mut redis = start_redis(port);
    assert_eventually!(
        10,
        async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() },
        "redis did not start"
    );
    let sb = sandbox_with(|c| {
        c.redis.url = format!("redis://127.0.0.1:{port}");
        c.redis.command_timeout_ms = 500;
    })
    .await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (1, 'acme', 'before')").await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    name_now(&node).await;
    assert_eq!(name_now(&node).await, ("before".into(), Layer::L1));

    redis.kill().await.unwrap();
    // Correct answers from Postgres, through a write made while Redis is down.
    assert_eventually!(
        10,
        async { name_now(&node).await.1 == Layer::Database },
        "kept answering from cache without redis"
    );
    sb.sql("UPDATE res_users SET name = 'during' WHERE id = 1").await;
    assert_eq!(name_now(&node).await, ("during".into(), Layer::Database));
    let ready = node.readyz().await;
    assert!(ready.starts_with("HTTP/1.1 200") && ready.contains("redis: degraded"), "{ready}");
    assert_eq!(node.metric("herald_cache_degraded", "").await, 1.0);
    // Explicit keys cannot be stored without Redis: a clear error.
    let e = node.client().await.set(authed(set("acme", "k", Bytes::from_static(b"v")), ACME_TOKEN)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);

    let _redis = start_redis(port);
    assert_eventually!(20, async { node.readyz().await.contains("l1: ok") }, "L1 did not come back");
    assert_eventually!(20, async { name_now(&node).await == ("during".into(), Layer::L1) }, "caching did not resume");
    sb.sql("UPDATE res_users SET name = 'after' WHERE id = 1").await;
    assert_eventually!(10, async { name_now(&node).await.0 == "after" }, "not coherent after redis came back");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_unreachable_hits_are_served_and_misses_are_unavailable() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (1, 'acme', 'cached'), (2, 'acme', 'not cached')").await;
    let node = sb.spawn_cache_api(Options::default()).await;
    node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap();

    // Postgres refuses this database: new connections fail, open ones end.
    let admin = herald_tests::admin_url();
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let db = sb.db_name.clone();
    client.batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false")).await.unwrap();
    client.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&db]).await.unwrap();

    let hit = node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.expect("a hit while postgres is down");
    assert_eq!((name_of(&hit.value), hit.layer()), ("cached".into(), Layer::L1));
    let miss = node.get(ACME_TOKEN, "acme", "user_by_id", &["2"]).await.unwrap_err();
    assert_eq!(miss.code(), Code::Unavailable, "{}", miss.message());
    assert!(miss.message().contains("postgres"), "{}", miss.message());
    assert_eventually!(5, async { node.readyz().await.contains("postgres: degraded") }, "readyz did not say so");

    client.batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true")).await.unwrap();
    assert_eventually!(
        20,
        async {
            node.get(ACME_TOKEN, "acme", "user_by_id", &["2"]).await.is_ok_and(|a| name_of(&a.value) == "not cached")
        },
        "misses did not recover with postgres"
    );
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", node.grpc_addr)).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health.check(HealthCheckRequest { service: "herald.v1.Cache".into() }).await.unwrap().into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("no service list")
    };
    assert!(list.service.iter().any(|s| s.name == "herald.v1.Cache"), "{:?}", list.service);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_resource_query_does_not_show_postgres_text_to_the_caller() {
    let sb = sandbox_with(|c| {
        let mut broken = herald_tests::cache_api::resource(
            "broken",
            "SELECT id, 1 / (id - id) AS ratio FROM res_users WHERE tenant_id = $tenant AND id = $1",
            &["id"],
            herald_core::config::Shape::Row,
            &["res_users.id=$1"],
        );
        broken.negative_ttl_ms = 0;
        c.cache.resources.push(broken);
    })
    .await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (1, 'acme', 'A')").await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let e = node.get(ACME_TOKEN, "acme", "broken", &["1"]).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    assert!(!e.message().contains("division"), "postgres text reached the caller: {}", e.message());
    assert!(e.message().contains("broken") && e.message().contains("error id"), "{}", e.message());
    let r = node.http("GET", "/v1/t/acme/r/broken?id=1", Some(ACME_TOKEN), b"").await;
    assert_eq!(r.status, 500);
    assert!(!r.text().contains("division"), "{}", r.text());
    sb.cleanup().await;
}
