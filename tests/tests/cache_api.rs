//! The cache API against real Postgres and Redis: read-through, coherence
//! across two nodes through capture and broadcast, explicit keys with
//! version-gated fills, bulk invalidation, and the invalidation watch.

use std::time::Duration;

use bytes::Bytes;
use herald_cache_api::Options;
use herald_proto::v1::{
    DeleteRequest, GetRequest, InvalidatePrefixRequest, InvalidateTagsRequest, Layer, SetRequest, WatchRequest,
    delete_request, get_request,
};
use herald_tests::assert_eventually;
use herald_tests::cache_api::{ACME_TOKEN, BACKEND_TOKEN, CacheNode, authed, sandbox};

fn name_of(value: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(value).expect("json");
    v["name"].as_str().unwrap_or_default().to_string()
}

async fn name_via(node: &CacheNode, slug: &str) -> (String, Layer) {
    let r = node.get(ACME_TOKEN, "acme", "user_by_slug", &[slug]).await.expect("get");
    (name_of(&r.value), r.layer())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_through_miss_then_hit_in_each_layer() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (tenant_id, website_slug, name, team_id) VALUES ('acme', 'alice', 'Alice', 42), ('acme', 'al', 'Al', 42)")
        .await;
    let a = sb.spawn_cache_api(Options::default()).await;
    let b = sb.spawn_cache_api(Options::default()).await;

    let first = a.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap();
    assert!(first.found);
    assert_eq!((name_of(&first.value), first.layer()), ("Alice".into(), Layer::Database));
    assert_eq!(name_via(&a, "alice").await, ("Alice".into(), Layer::L1));
    // The other node finds it in L2, then in its own L1.
    assert_eq!(name_via(&b, "alice").await, ("Alice".into(), Layer::L2));
    assert_eq!(name_via(&b, "alice").await, ("Alice".into(), Layer::L1));

    // Negative entries: no row is cached as "not found".
    let missing = a.get(ACME_TOKEN, "acme", "user_by_slug", &["bob"]).await.unwrap();
    assert!(!missing.found);
    assert_eq!(missing.layer(), Layer::Database);
    let again = a.get(ACME_TOKEN, "acme", "user_by_slug", &["bob"]).await.unwrap();
    assert_eq!((again.found, again.layer()), (false, Layer::L1));

    // Other shapes.
    let members = a.get(ACME_TOKEN, "acme", "team_members", &["42"]).await.unwrap();
    let members: serde_json::Value = serde_json::from_slice(&members.value).unwrap();
    assert_eq!(members.as_array().unwrap().len(), 2);
    let count = a.get(ACME_TOKEN, "acme", "user_count", &[]).await.unwrap();
    assert_eq!(count.value.as_ref(), b"2");
    assert!(a.metric("herald_cache_hits_total", "layer=\"l1\"").await >= 2.0);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_change_drops_the_entry_on_both_nodes() {
    let sb = sandbox().await;
    sb.sql("INSERT INTO res_users (tenant_id, website_slug, name) VALUES ('acme', 'alice', 'Alice')").await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let a = sb.spawn_cache_api(Options::default()).await;
    let b = sb.spawn_cache_api(Options::default()).await;
    for node in [&a, &b, &a, &b] {
        assert_eq!(name_via(node, "alice").await.0, "Alice");
    }
    assert_eq!(name_via(&a, "alice").await.1, Layer::L1);
    assert_eq!(name_via(&b, "alice").await.1, Layer::L1);

    sb.sql("UPDATE res_users SET name = 'Alice II' WHERE website_slug = 'alice'").await;
    for node in [&a, &b] {
        assert_eventually!(10, async { name_via(node, "alice").await.0 == "Alice II" }, "a node kept the old name");
    }

    // A negative entry is dropped by the insert of its key value.
    assert!(!a.get(ACME_TOKEN, "acme", "user_by_slug", &["bob"]).await.unwrap().found);
    assert!(!b.get(ACME_TOKEN, "acme", "user_by_slug", &["bob"]).await.unwrap().found);
    sb.sql("INSERT INTO res_users (tenant_id, website_slug, name) VALUES ('acme', 'bob', 'Bob')").await;
    for node in [&a, &b] {
        assert_eventually!(
            10,
            async { node.get(ACME_TOKEN, "acme", "user_by_slug", &["bob"]).await.unwrap().found },
            "the negative entry survived the insert"
        );
    }
    // A slug rename drops the entry under the old slug.
    sb.sql("UPDATE res_users SET website_slug = 'robert' WHERE website_slug = 'bob'").await;
    for node in [&a, &b] {
        assert_eventually!(
            10,
            async { !node.get(ACME_TOKEN, "acme", "user_by_slug", &["bob"]).await.unwrap().found },
            "the old slug still resolves"
        );
    }
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_on_two_nodes_cost_one_database_query() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (7, 'acme', 'Seven')").await;
    let a = sb.spawn_cache_api(Options::default()).await;
    let b = sb.spawn_cache_api(Options::default()).await;
    let (ca, cb) = (a.client().await, b.client().await);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut client = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        tasks.push(tokio::spawn(async move {
            let request = GetRequest {
                tenant: "acme".into(),
                target: Some(get_request::Target::Resource(herald_proto::v1::ResourceRef {
                    resource: "user_probe".into(),
                    params: vec!["7".into()],
                })),
                min_commit_lsn: 0,
            };
            client.get(authed(request, ACME_TOKEN)).await.map(|r| r.into_inner())
        }));
    }
    for task in tasks {
        let answer = task.await.unwrap().expect("get");
        assert_eq!(name_of(&answer.value), "Seven");
    }
    let reads = sb.scalar_i64("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM herald_reads").await;
    assert_eq!(reads, 1, "200 concurrent misses over two nodes read the database {reads} times");
    let queries = a.metric("herald_cache_db_queries_total", "user_probe").await
        + b.metric("herald_cache_db_queries_total", "user_probe").await;
    assert_eq!(queries, 1.0);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_keys_with_tags_fill_tokens_and_cross_node_sets() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let a = sb.spawn_cache_api(Options::default()).await;
    let b = sb.spawn_cache_api(Options::default()).await;
    let mut ca = a.client().await;
    let get_key = |key: &str| GetRequest {
        tenant: "acme".into(),
        target: Some(get_request::Target::Key(key.into())),
        min_commit_lsn: 0,
    };
    let set = |key: &str, value: &'static [u8], tags: &[&str], token: &str| SetRequest {
        tenant: "acme".into(),
        key: key.into(),
        value: Bytes::from_static(value),
        ttl_ms: 60_000,
        tags: tags.iter().map(|s| s.to_string()).collect(),
        fill_token: token.into(),
    };

    // Miss → token → a fill whose tag was invalidated meanwhile is refused.
    let miss = ca.get(authed(get_key("report/1"), ACME_TOKEN)).await.unwrap().into_inner();
    assert!(!miss.found && !miss.fill_token.is_empty());
    let tags = InvalidateTagsRequest { tenant: "acme".into(), tags: vec!["reports".into()] };
    ca.invalidate_tags(authed(tags, ACME_TOKEN)).await.unwrap();
    let refused = ca.set(authed(set("report/1", b"stale", &["reports"], &miss.fill_token), ACME_TOKEN)).await.unwrap();
    assert!(!refused.into_inner().stored, "a fill raced by an invalidation was stored");
    assert!(!ca.get(authed(get_key("report/1"), ACME_TOKEN)).await.unwrap().into_inner().found);

    // An unraced fill is stored and both nodes serve it.
    let miss = ca.get(authed(get_key("report/1"), ACME_TOKEN)).await.unwrap().into_inner();
    let stored = ca.set(authed(set("report/1", b"v1", &["reports"], &miss.fill_token), ACME_TOKEN)).await.unwrap();
    assert!(stored.into_inner().stored);
    let mut cb = b.client().await;
    let got = cb.get(authed(get_key("report/1"), ACME_TOKEN)).await.unwrap().into_inner();
    assert_eq!((got.value.as_ref(), got.layer()), (&b"v1"[..], Layer::L2));
    // B's first read may have raced the invalidation A's Set published (B's
    // L1 then refuses that fill, as it must); once it arrived, B's L1 holds it.
    assert_eventually!(
        5,
        async {
            let mut cb = cb.clone();
            cb.get(authed(get_key("report/1"), ACME_TOKEN)).await.unwrap().into_inner().layer() == Layer::L1
        },
        "node b never served report/1 from its L1"
    );

    // A Set on one node replaces the value in the other node's L1.
    ca.set(authed(set("report/1", b"v2", &["reports"], ""), ACME_TOKEN)).await.unwrap();
    assert_eventually!(
        5,
        async {
            cb.clone().get(authed(get_key("report/1"), ACME_TOKEN)).await.unwrap().into_inner().value.as_ref() == b"v2"
        },
        "node b kept the old value after a set on node a"
    );
    // Tag invalidation and delete reach every node.
    let tags = InvalidateTagsRequest { tenant: "acme".into(), tags: vec!["reports".into()] };
    assert_eq!(ca.invalidate_tags(authed(tags, ACME_TOKEN)).await.unwrap().into_inner().deleted, 1);
    assert_eventually!(
        5,
        async { !cb.clone().get(authed(get_key("report/1"), ACME_TOKEN)).await.unwrap().into_inner().found },
        "tag invalidation did not reach node b"
    );
    ca.set(authed(set("report/2", b"x", &[], ""), ACME_TOKEN)).await.unwrap();
    assert!(cb.get(authed(get_key("report/2"), ACME_TOKEN)).await.unwrap().into_inner().found);
    let delete = DeleteRequest { tenant: "acme".into(), target: Some(delete_request::Target::Key("report/2".into())) };
    ca.delete(authed(delete, ACME_TOKEN)).await.unwrap();
    assert_eventually!(
        5,
        async { !cb.clone().get(authed(get_key("report/2"), ACME_TOKEN)).await.unwrap().into_inner().found },
        "delete did not reach node b"
    );
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_invalidation_by_resource_key_prefix_and_tenant() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (1, 'acme', 'a', 'A'), (2, 'acme', 'b', 'B'), (3, 'globex', 'a', 'G')")
        .await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut client = node.client().await;
    fill(&node).await;
    assert_eq!(name_via(&node, "a").await.1, Layer::L1);
    let by_resource =
        InvalidatePrefixRequest { tenant: "acme".into(), resource: "user_by_slug".into(), ..Default::default() };
    assert_eq!(client.invalidate_prefix(authed(by_resource, ACME_TOKEN)).await.unwrap().into_inner().deleted, 2);
    assert_eventually!(5, async { name_via(&node, "a").await.1 == Layer::Database }, "resource entries survived");
    assert_eq!(node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap().layer(), Layer::L1);
    let globex = node.get(BACKEND_TOKEN, "globex", "user_by_slug", &["a"]).await.unwrap();
    assert_eq!((name_of(&globex.value), globex.layer()), ("G".into(), Layer::L1), "another tenant's entry was dropped");

    fill(&node).await;
    let all = InvalidatePrefixRequest { tenant: "acme".into(), all: true, ..Default::default() };
    assert!(client.invalidate_prefix(authed(all, ACME_TOKEN)).await.unwrap().into_inner().deleted >= 3);
    assert_eventually!(
        5,
        async { node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap().layer() == Layer::Database },
        "tenant-wide invalidation left entries"
    );
    assert_eq!(node.get(BACKEND_TOKEN, "globex", "user_by_slug", &["a"]).await.unwrap().layer(), Layer::L1);

    let neither = InvalidatePrefixRequest { tenant: "acme".into(), ..Default::default() };
    let err = client.invalidate_prefix(authed(neither, ACME_TOKEN)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_only_the_tenants_invalidations() {
    let sb = sandbox().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'a'), (2, 'globex', 'g')").await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut client = node.client().await;
    let watch =
        WatchRequest { tenant: "acme".into(), tables: vec!["res_users".into()], tags: vec![], ..Default::default() };
    let mut stream = client.watch_invalidations(authed(watch, ACME_TOKEN)).await.unwrap().into_inner();
    sb.sql("UPDATE res_users SET name = 'x' WHERE id = 2").await;
    sb.sql("UPDATE res_users SET name = 'y' WHERE id = 1").await;
    let event =
        tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("no event").unwrap().unwrap();
    assert_eq!(event.tenant, "acme", "a watcher of acme saw another tenant's event");
    assert!(event.tags.contains(&"res_users.id=1".to_string()));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_api_and_openapi_document() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (1, 'acme', 'a b', 'Spaced')").await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let r = node.http("GET", "/v1/t/acme/r/user_by_slug?slug=a%20b", Some(ACME_TOKEN), b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["found"].as_bool(), v["value"]["name"].as_str(), v["layer"].as_str()),
        (Some(true), Some("Spaced"), Some("database"))
    );
    let r = node.http("GET", "/v1/t/acme/r/user_by_slug?p=a+b", Some(ACME_TOKEN), b"").await;
    assert_eq!(r.json()["layer"], "l1");

    let r = node.http("GET", "/v1/t/acme/k/greeting", Some(ACME_TOKEN), b"").await;
    assert_eq!(r.status, 404);
    let token = r.header("x-herald-fill-token").expect("fill token").to_string();
    let r = node
        .http(
            "PUT",
            &format!("/v1/t/acme/k/greeting?ttl_ms=60000&tag=hello&fill_token={token}"),
            Some(ACME_TOKEN),
            b"hi",
        )
        .await;
    assert_eq!((r.status, r.json()["stored"].as_bool()), (200, Some(true)));
    let r = node.http("GET", "/v1/t/acme/k/greeting", Some(ACME_TOKEN), b"").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hi"[..]));
    let r = node
        .http(
            "POST",
            "/v1/t/acme/get",
            Some(ACME_TOKEN),
            br#"{"items":[{"resource":"user_by_id","params":["1"]},{"key":"greeting"},{"resource":"nope"}]}"#,
        )
        .await;
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["value"]["name"], "Spaced");
    assert_eq!(results[1]["value_base64"], "aGk=");
    assert_eq!(results[2]["error"]["code"], "unknown_resource");
    let r = node.http("POST", "/v1/t/acme/invalidate", Some(ACME_TOKEN), br#"{"tags":["hello"]}"#).await;
    assert_eq!(r.json()["deleted"], 1);
    let r = node.http("DELETE", "/v1/t/acme/r/user_by_slug?slug=a%20b", Some(ACME_TOKEN), b"").await;
    assert_eq!(r.status, 200);

    let r = node.http("GET", "/openapi.json", None, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["openapi"], "3.1.0");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_reads_through_until_the_position_is_applied() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, name) VALUES (1, 'acme', 'One')").await;
    let node = sb.spawn_cache_api(Options::default()).await;
    node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap();
    assert_eq!(node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap().layer(), Layer::L1);
    // A position no invalidation has reached: only Postgres may answer.
    let request = GetRequest {
        tenant: "acme".into(),
        target: Some(get_request::Target::Resource(herald_proto::v1::ResourceRef {
            resource: "user_by_id".into(),
            params: vec!["1".into()],
        })),
        min_commit_lsn: u64::MAX / 2,
    };
    let answer = node.client().await.get(authed(request, ACME_TOKEN)).await.unwrap().into_inner();
    assert_eq!(answer.layer(), Layer::Database);
    let r = node.http("GET", "/v1/t/acme/r/user_by_id?id=1", Some(ACME_TOKEN), b"").await;
    assert_eq!(r.json()["layer"], "l1");
    sb.cleanup().await;
}

async fn fill(node: &CacheNode) {
    for slug in ["a", "b"] {
        node.get(ACME_TOKEN, "acme", "user_by_slug", &[slug]).await.unwrap();
    }
    node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap();
    node.get(BACKEND_TOKEN, "globex", "user_by_slug", &["a"]).await.unwrap();
}
