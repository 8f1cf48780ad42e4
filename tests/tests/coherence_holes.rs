//! Holes in the coherence promise found in review (issue 10): table-wide
//! events that missed row-tagged entries, watchers that could miss a flush,
//! and a bulk invalidation that reached the gateway's state. Each test was
//! written against the failing code first.

use std::time::Duration;

use fred::prelude::*;
use herald_cache_api::Options;
use herald_core::channel::{self, Channel, HistoryOptions};
use herald_core::keys::TenantId;
use herald_proto::v1::{DeleteRequest, Layer, ResourceRef, WatchRequest, delete_request};
use herald_tests::cache_api::{ACME_TOKEN, CacheNode, authed, sandbox, sandbox_with};
use herald_tests::{Sandbox, assert_eventually};

/// Waits until broadcast applied `n` more events than `before`.
async fn applied_events(node: &CacheNode) -> f64 {
    node.metric("herald_l1_events_applied_total", "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_drops_row_tagged_entries_from_l2() {
    let sb = sandbox().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (1, 'acme', 'alice', 'A')").await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    // Two nodes: one warms L2, the other has never seen the entry in L1.
    let warm = sb.spawn_cache_api(Options::default()).await;
    let cold = sb.spawn_cache_api(Options::default()).await;
    assert!(warm.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap().found);
    assert_eq!(cold.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap().layer(), Layer::L2);
    cold.stop().await.unwrap();

    let before = applied_events(&warm).await;
    sb.sql("TRUNCATE res_users").await;
    assert_eventually!(10, async { applied_events(&warm).await > before }, "truncate not applied");

    let cold = sb.spawn_cache_api(Options::default()).await;
    let after = cold.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap();
    assert!(!after.found, "a truncated row was served from {:?}", after.layer());
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_widened_update_drops_row_tagged_entries_from_l1_and_l2() {
    let sb = sandbox_with(|c| c.capture.max_event_bytes = 4096).await;
    let slug = |i: usize| format!("{i:03}-{}", "s".repeat(56));
    let values: Vec<String> = (1..=100).map(|i| format!("({i}, 'acme', '{}', 'old')", slug(i))).collect();
    sb.sql(&format!("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES {}", values.join(", "))).await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let first = slug(1);
    assert_eventually!(
        10,
        async { node.get(ACME_TOKEN, "acme", "user_by_slug", &[&first]).await.unwrap().layer() == Layer::L1 },
        "entry never reached L1"
    );

    let before = applied_events(&node).await;
    sb.sql("UPDATE res_users SET name = 'new'").await;
    assert_eventually!(10, async { applied_events(&node).await > before }, "update not applied");
    assert!(sb.stream_events().await.iter().any(|e| e.widened), "the update's event was not widened");

    let value = node.get(ACME_TOKEN, "acme", "user_by_slug", &[&first]).await.unwrap();
    let row: serde_json::Value = serde_json::from_slice(&value.value).unwrap();
    assert_eq!(row["name"], "new", "stale value served from {:?}", value.layer());
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_the_nodes_subscription_flaps() {
    let sb = sandbox().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'a')").await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node_name = herald_tests::unique("flap-");
    let node = sb.spawn_cache_api(Options { node: Some(node_name.clone()), ..Default::default() }).await;
    let mut client = node.client().await;
    let watch = WatchRequest { tenant: "acme".into(), tables: vec![], tags: vec![], ..Default::default() };
    let mut stream = client.watch_invalidations(authed(watch, ACME_TOKEN)).await.unwrap().into_inner();

    // The node's feed drops and comes back faster than any liveness poll.
    sb.kill_pubsub_client(&format!("herald-cache-api-{node_name}")).await;
    sb.sql("UPDATE res_users SET name = 'x' WHERE id = 1").await;

    // Whatever arrives, the stream must not carry on as if nothing was lost.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("watch neither ended nor …")
        {
            Ok(Some(event)) => assert!(!event.tags.is_empty(), "unexpected event {event:?}"),
            Ok(None) => panic!("the watch ended without saying why"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                break;
            }
        }
    }
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_an_undecodable_l1_message_flushes_the_node() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut client = node.client().await;
    let watch = WatchRequest { tenant: "acme".into(), tables: vec![], tags: vec![], ..Default::default() };
    let mut stream = client.watch_invalidations(authed(watch, ACME_TOKEN)).await.unwrap().into_inner();

    let flushes = node.metric("herald_l1_flushes_total", "").await;
    let _: i64 = sb.redis.next().publish(sb.keys.l1_channel(), vec![0xffu8, 0xff, 0xff]).await.unwrap();
    assert_eventually!(10, async { node.metric("herald_l1_flushes_total", "").await > flushes }, "no flush");

    let ended = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("the watch carried on");
    let status = ended.expect_err("the watch must end with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_filtered_watch_sees_the_apis_own_invalidations() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut client = node.client().await;
    let watch =
        WatchRequest { tenant: "acme".into(), tables: vec!["res_users".into()], tags: vec![], ..Default::default() };
    let mut stream = client.watch_invalidations(authed(watch, ACME_TOKEN)).await.unwrap().into_inner();

    let delete = DeleteRequest {
        tenant: "acme".into(),
        target: Some(delete_request::Target::Resource(ResourceRef {
            resource: "user_by_slug".into(),
            params: vec!["alice".into()],
        })),
    };
    client.delete(authed(delete, ACME_TOKEN)).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watcher filtering by table never saw the API's Delete")
        .unwrap()
        .unwrap();
    assert!(event.tags.iter().any(|t| t.contains("user_by_slug")), "{event:?}");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_whole_tenant_keeps_its_gateway_state() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let acme = TenantId::new("acme").unwrap();
    let team = Channel::parse("team:1").unwrap();
    let history = HistoryOptions { size: 10, ttl_s: 600 };
    let first = channel::publish(&sb.redis, &sb.keys, &acme, &team, history, b"{}", Some(("k1", 600))).await.unwrap();
    assert!(!first.duplicate);

    let r = node.http("POST", "/v1/t/acme/invalidate", Some(ACME_TOKEN), br#"{"all":true}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let again = channel::publish(&sb.redis, &sb.keys, &acme, &team, history, b"{}", Some(("k1", 600))).await.unwrap();
    assert!(again.duplicate, "an idempotent publish was published again after a cache invalidation");
    assert_eq!((again.offset, again.epoch.as_str()), (first.offset, first.epoch.as_str()));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_marks_stay_bounded_and_still_refuse_older_fills() {
    use herald_core::keys::{KV_SEGMENT, Scope};
    use herald_core::l2::L2;
    let sb = Sandbox::start().await;
    let l2 = L2::new(sb.redis.clone(), sb.keys.clone());
    let acme = Scope::Tenant(TenantId::new("acme").unwrap());
    let entry = sb.keys.entry(&acme, KV_SEGMENT, "zz").unwrap();
    let token = l2.begin_fill(&acme, None).await.unwrap().token;
    for i in 0..1_000 {
        let prefix = sb.keys.entry(&acme, KV_SEGMENT, &format!("p{i}")).unwrap();
        l2.invalidate_prefix(&acme, &prefix).await.unwrap();
    }
    let marks: i64 = sb.redis.next().hlen(sb.keys.prefix_marks(&acme)).await.unwrap();
    assert!(marks <= 256, "{marks} prefix marks kept");
    // The marks collapsed into one of the whole scope: a fill that started
    // before them is still refused, even for a key no prefix named.
    let stored = l2.store_gated(&acme, &entry, "v".into(), &[], None, &token, None).await.unwrap();
    assert!(!stored, "a fill older than a collapsed prefix mark was stored");
    sb.cleanup().await;
}
