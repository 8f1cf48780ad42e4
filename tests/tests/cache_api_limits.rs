//! The cache API's limits: every request's work is bounded (GetMany answer
//! size, tags per request, database reads and watch streams per tenant), a
//! tenant at its limit gets a clear error while the others keep being
//! served; and the start-up and explicit-key windows where a node answered
//! "not cached" are closed.

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use herald_cache_api::Options;
use herald_core::config::Shape;
use herald_proto::v1::cache_client::CacheClient;
use herald_proto::v1::{
    GetItem, GetManyRequest, GetRequest, InvalidateTagsRequest, Layer, ResourceRef, SetRequest, WatchRequest, get_item,
    get_request,
};
use herald_tests::cache_api::{ACME_TOKEN, CacheNode, GLOBEX_TOKEN, authed, resource, sandbox, sandbox_with};
use herald_tests::{assert_eventually, free_port, start_redis};
use tonic::Code;

fn name_of(value: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(value).expect("json");
    v["name"].as_str().unwrap_or_default().to_string()
}

fn set(tenant: &str, key: &str, value: Bytes, tags: Vec<String>) -> SetRequest {
    SetRequest { tenant: tenant.into(), key: key.into(), value, ttl_ms: 60_000, tags, fill_token: String::new() }
}

fn key_get(tenant: &str, key: &str) -> GetRequest {
    GetRequest { tenant: tenant.into(), target: Some(get_request::Target::Key(key.into())), min_commit_lsn: 0 }
}

/// A client that accepts answers larger than tonic's default 4 MiB.
async fn big_client(node: &CacheNode) -> CacheClient<tonic::transport::Channel> {
    node.client().await.max_decoding_message_size(64 * 1024 * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_answers_up_to_its_size_limit_and_refuses_only_the_items_past_it() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let cap = sb.config.cache.max_get_many_bytes;
    let mut c = big_client(&node).await;
    let value = Bytes::from(vec![b'v'; 60_000]);
    for i in 0..100 {
        c.set(authed(set("acme", &format!("big{i}"), value.clone(), vec![]), ACME_TOKEN)).await.unwrap();
    }

    // gRPC: 100 × 60 KB is over the cap; the answer is OK, its first items
    // carry values and the ones past the cap a clear per-item error.
    let items =
        (0..100).map(|i| GetItem { target: Some(get_item::Target::Key(format!("big{i}"))) }).collect::<Vec<_>>();
    let many = GetManyRequest { tenant: "acme".into(), items, min_commit_lsn: 0 };
    let results = c.get_many(authed(many, ACME_TOKEN)).await.expect("GetMany over the cap").into_inner().results;
    assert_eq!(results.len(), 100);
    let answered: Vec<_> = results.iter().filter_map(|r| r.response.as_ref()).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.response.is_none()).collect();
    assert!(!answered.is_empty() && !refused.is_empty(), "{} answered, {} refused", answered.len(), refused.len());
    assert!(answered.iter().all(|a| a.found && a.value == value));
    assert!(answered.iter().map(|a| a.value.len()).sum::<usize>() <= cap);
    for r in &refused {
        assert_eq!(r.code, Code::ResourceExhausted as i32, "{}", r.error);
        assert!(r.error.contains("cache.max_get_many_bytes"), "{}", r.error);
    }
    // Answered items come first: the cap cuts the list, it does not pick.
    assert!(results.iter().take(answered.len()).all(|r| r.response.is_some()));

    // HTTP: 256 × one non-JSON key (base64 in the answer) stays under the cap.
    let binary = vec![0xFF; 60_000];
    let r = node.http("PUT", "/v1/t/acme/k/bin", Some(ACME_TOKEN), &binary).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = serde_json::json!({ "items": vec![serde_json::json!({ "key": "bin" }); 256] }).to_string();
    let r = node.http("POST", "/v1/t/acme/get", Some(ACME_TOKEN), body.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body.len() <= cap + 64 * 1024, "HTTP GetMany answered {} bytes, over the cap of {cap}", r.body.len());
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 256);
    assert_eq!(results[0]["found"], true);
    assert_eq!(results[255]["error"]["code"], "resource_exhausted", "{}", results[255]);

    // The node keeps serving, small GetManys included.
    let one = GetManyRequest {
        tenant: "acme".into(),
        items: vec![GetItem { target: Some(get_item::Target::Key("big1".into())) }],
        min_commit_lsn: 0,
    };
    let results = c.get_many(authed(one, ACME_TOKEN)).await.unwrap().into_inner().results;
    assert!(results[0].response.as_ref().is_some_and(|a| a.found));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_long_tags_are_refused_with_the_limit_named() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let (max_tags, max_bytes) = (sb.config.cache.max_tags_per_request, sb.config.cache.max_tag_bytes);
    let mut c = node.client().await;
    let many: Vec<String> = (0..=max_tags).map(|i| format!("t{i}")).collect();
    let long = vec!["x".repeat(max_bytes + 1)];

    for (tags, limit) in [(many.clone(), "cache.max_tags_per_request"), (long.clone(), "cache.max_tag_bytes")] {
        let e = c.set(authed(set("acme", "k", Bytes::from_static(b"v"), tags.clone()), ACME_TOKEN)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(limit), "{}", e.message());
        let request = InvalidateTagsRequest { tenant: "acme".into(), tags: tags.clone() };
        let e = c.invalidate_tags(authed(request, ACME_TOKEN)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(limit), "{}", e.message());

        let query: String = tags.iter().map(|t| format!("&tag={t}")).collect();
        let r = node.http("PUT", &format!("/v1/t/acme/k/k?ttl_ms=1000{query}"), Some(ACME_TOKEN), b"v").await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains(limit), "{}", r.text());
        let body = serde_json::json!({ "tags": tags }).to_string();
        let r = node.http("POST", "/v1/t/acme/invalidate", Some(ACME_TOKEN), body.as_bytes()).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains(limit), "{}", r.text());
    }
    assert!(!c.get(authed(key_get("acme", "k"), ACME_TOKEN)).await.unwrap().into_inner().found);

    // At the limits everything works, for this tenant and the others.
    let mut at_limit: Vec<String> = (1..max_tags).map(|i| format!("t{i}")).collect();
    at_limit.push("y".repeat(max_bytes));
    let stored = c.set(authed(set("acme", "k", Bytes::from_static(b"v"), at_limit.clone()), ACME_TOKEN)).await;
    assert!(stored.unwrap().into_inner().stored);
    let request = InvalidateTagsRequest { tenant: "acme".into(), tags: at_limit };
    assert_eq!(c.invalidate_tags(authed(request, ACME_TOKEN)).await.unwrap().into_inner().deleted, 1);
    let globex = c.set(authed(set("globex", "k", Bytes::from_static(b"g"), vec![]), GLOBEX_TOKEN)).await;
    assert!(globex.unwrap().into_inner().stored);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_bypassing_the_cache_cannot_take_every_database_read() {
    let sb = sandbox_with(|c| {
        c.cache.max_concurrent_fills = 4;
        c.cache.max_fills_per_tenant = 2;
        c.cache.fill_permit_timeout_ms = 300;
        c.cache.query_timeout_ms = 2_000;
        // Blocks while the test holds advisory lock 4242.
        c.cache.resources.push(resource(
            "locked_user",
            "SELECT u.id, u.name FROM res_users u, (SELECT pg_advisory_xact_lock_shared(4242)) l \
             WHERE u.tenant_id = $tenant AND u.id = $1",
            &["id"],
            Shape::Row,
            &["res_users.id=$1"],
        ));
    })
    .await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (1, 'acme', 'A'), (2, 'globex', 'G')").await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let (locker, connection) = tokio_postgres::connect(&sb.config.postgres.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker.batch_execute("SELECT pg_advisory_lock(4242)").await.unwrap();

    // Acme reads around the cache (a read-your-writes position no node has
    // reached), as many at once as it likes.
    let mut acme = Vec::new();
    for _ in 0..8 {
        let mut c = node.client().await;
        acme.push(tokio::spawn(async move {
            let request = GetRequest {
                tenant: "acme".into(),
                target: Some(get_request::Target::Resource(ResourceRef {
                    resource: "locked_user".into(),
                    params: vec!["1".into()],
                })),
                min_commit_lsn: u64::MAX,
            };
            c.get(authed(request, ACME_TOKEN)).await
        }));
    }
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%4242%'";
    assert_eventually!(10, async { sb.scalar_i64(waiting).await >= 2 }, "acme's reads never reached postgres");

    // Globex is still answered while acme's reads are stuck.
    let globex = tokio::time::timeout(Duration::from_secs(30), node.get(GLOBEX_TOKEN, "globex", "user_by_id", &["2"]))
        .await
        .expect("globex waited behind acme's reads")
        .expect("globex's read failed");
    assert_eq!(name_of(&globex.value), "G");

    // Acme's reads end with clear errors: over its share they waited
    // `fill_permit_timeout_ms`, the stuck ones hit `query_timeout_ms`.
    let mut messages = Vec::new();
    for task in acme {
        let result = tokio::time::timeout(Duration::from_secs(30), task).await.expect("an acme read hung").unwrap();
        let e = result.expect_err("an acme read got past the lock");
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        messages.push(e.message().to_string());
    }
    assert!(messages.iter().any(|m| m.contains("cache.max_fills_per_tenant")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("cache.query_timeout_ms")), "{messages:?}");
    locker.batch_execute("SELECT pg_advisory_unlock(4242)").await.unwrap();
    let a = node.get(ACME_TOKEN, "acme", "locked_user", &["1"]).await.unwrap();
    assert_eq!(name_of(&a.value), "A");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_take_every_watch_stream() {
    let sb = sandbox_with(|c| c.cache.max_watchers_per_tenant = 3).await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut c = node.client().await;
    let watch = |tenant: &str| WatchRequest { tenant: tenant.into(), ..Default::default() };
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(c.watch_invalidations(authed(watch("acme"), ACME_TOKEN)).await.unwrap().into_inner());
    }
    let e = c.watch_invalidations(authed(watch("acme"), ACME_TOKEN)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("cache.max_watchers_per_tenant"), "{}", e.message());
    let _globex = c.watch_invalidations(authed(watch("globex"), GLOBEX_TOKEN)).await.expect("globex could not watch");
    // A closed stream gives its place back.
    streams.pop();
    assert_eventually!(
        10,
        async { c.clone().watch_invalidations(authed(watch("acme"), ACME_TOKEN)).await.is_ok() },
        "a closed watch stream kept its place"
    );
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_without_fill_token_replaces_the_value_in_one_redis_step() {
    let port = free_port();
    let _redis = start_redis(port);
    assert_eventually!(
        10,
        async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() },
        "redis did not start"
    );
    let sb = sandbox_with(|c| c.redis.url = format!("redis://127.0.0.1:{port}")).await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut c = node.client().await;
    c.set(authed(set("acme", "k1", Bytes::from_static(b"one"), vec!["t".into()]), ACME_TOKEN)).await.unwrap();

    // This Redis is the test's own: log every command, then Set again.
    let admin = sb.redis.next();
    let config = |name: &'static str, value: &'static str| {
        admin.custom::<Value, _>(fred::cmd!("CONFIG"), vec!["SET", name, value])
    };
    config("slowlog-max-len", "100000").await.unwrap();
    config("slowlog-log-slower-than", "0").await.unwrap();
    let _: Value = admin.custom(fred::cmd!("SLOWLOG"), vec!["RESET"]).await.unwrap();
    c.set(authed(set("acme", "k1", Bytes::from_static(b"two"), vec!["t".into()]), ACME_TOKEN)).await.unwrap();
    let log: Value = admin.custom(fred::cmd!("SLOWLOG"), vec!["GET", "-1"]).await.unwrap();
    // Each entry: [id, time, µs, [command, args…], client, name].
    let scripts = log
        .into_array()
        .into_iter()
        .filter_map(|entry| entry.into_array().into_iter().nth(3))
        .map(|args| args.into_array().into_iter().filter_map(|a| a.into_string()).collect::<Vec<_>>())
        .filter(|args| {
            args.first().is_some_and(|c| c.eq_ignore_ascii_case("eval") || c.eq_ignore_ascii_case("evalsha"))
        })
        .filter(|args| args.iter().any(|a| a.contains("kv:k1")))
        .count();
    assert_eq!(scripts, 1, "the Set ran {scripts} scripts: a Get between them answers \"not cached\"");
    let got = c.get(authed(key_get("acme", "k1"), ACME_TOKEN)).await.unwrap().into_inner();
    assert_eq!(got.value.as_ref(), b"two");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_its_first_request_with_redis_known() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    for i in 0..3 {
        let node = sb.spawn_cache_api_unchecked(Options::default()).await;
        let mut c = node.client().await;
        let key = format!("fresh{i}");
        let stored = c.set(authed(set("acme", &key, Bytes::from_static(b"v"), vec![]), ACME_TOKEN)).await;
        assert!(stored.expect("a fresh node refused a Set").into_inner().stored);
        let got = c.get(authed(key_get("acme", &key), ACME_TOKEN)).await.unwrap().into_inner();
        assert!(got.found, "a fresh node answered not cached");
        node.stop().await.unwrap();
    }
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_parameters_are_invalidated_like_canonical_ones() {
    let sb = sandbox().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (1, 'acme', 'A')").await;
    let _capture = sb.spawn_capture().await;
    let broadcast = sb.spawn_broadcast().await;
    // The insert's own invalidation must not race the fills below.
    assert_eventually!(
        10,
        async { herald_tests::metric(broadcast.ops_addr, "herald_broadcast_events_applied_total", "").await >= 1.0 },
        "the insert was not applied"
    );
    let node = sb.spawn_cache_api(Options::default()).await;
    for p in ["01", " 1", "+1"] {
        node.get(ACME_TOKEN, "acme", "user_by_id", &[p]).await.unwrap();
        let cached = node.get(ACME_TOKEN, "acme", "user_by_id", &[p]).await.unwrap();
        assert_eq!((name_of(&cached.value), cached.layer()), ("A".into(), Layer::L1), "{p:?}");
    }
    sb.sql("UPDATE res_users SET name = 'B' WHERE id = 1").await;
    for p in ["01", " 1", "+1", "1"] {
        assert_eventually!(
            10,
            async { name_of(&node.get(ACME_TOKEN, "acme", "user_by_id", &[p]).await.unwrap().value) == "B" },
            "user_by_id {p:?} kept the old name"
        );
    }
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_on_a_parameter_without_canonical_text_is_refused_at_start() {
    let sb = sandbox().await;
    let mut config = sb.config.clone();
    // `$1` is read as a timestamp: `2026-01-01` and `2026-01-01 00:00` are
    // the same value with different tags.
    config.cache.resources.push(resource(
        "users_since",
        "SELECT id FROM res_users WHERE tenant_id = $tenant AND id > extract(epoch FROM $1::timestamptz)",
        &["since"],
        Shape::Rows,
        &["since=$1"],
    ));
    let err = sb.start_cache_api(config, Options::default()).await.join().await.unwrap_err().to_string();
    assert!(err.contains("users_since") && err.contains("since=$1") && err.contains("canonical"), "{err}");
    sb.cleanup().await;
}
