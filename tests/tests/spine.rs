//! The spine end to end: a committed change drops the stale entries on every
//! L1 holder and in L2, through real Postgres triggers, capture, the Redis
//! stream, broadcast and pub/sub.

use bytes::Bytes;
use herald_core::keys::{Scope, TagKey, TenantId};
use herald_core::l2::L2;
use herald_proto::v1::Operation;
use herald_tests::{Sandbox, Source, assert_eventually, http_get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_drops_the_entry_in_two_independent_l1_subscribers() {
    update_drops_the_entry_in_two_independent_l1_subscribers_on(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_drops_the_entry_in_two_independent_l1_subscribers_from_the_wal() {
    update_drops_the_entry_in_two_independent_l1_subscribers_on(Source::Wal).await;
}

async fn update_drops_the_entry_in_two_independent_l1_subscribers_on(source: Source) {
    let sb = Sandbox::start_source(source, |_| {}).await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let (a, b) = (sb.l1().await, sb.l1().await);
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (7, 'acme', 'alice', 'Alice')").await;
    // Let the insert's invalidation pass before filling.
    assert_eventually!(
        10,
        async { a.cache.applied().events >= 1 && b.cache.applied().events >= 1 },
        "insert not applied"
    );

    for l1 in [&a, &b] {
        assert!(l1.put("acme", "user:7", "Alice", &["res_users.id=7"]));
        assert!(l1.put("acme", "slug:alice", "7", &["res_users.website_slug=alice"]));
        assert!(l1.put("acme", "unrelated", "x", &["res_users.id=8"]));
    }
    sb.sql("UPDATE res_users SET name = 'Alicia' WHERE id = 7").await;
    for l1 in [&a, &b] {
        assert_eventually!(10, async { !l1.has("user:7") && !l1.has("slug:alice") }, "stale entry survived");
        assert!(l1.has("unrelated"), "an entry of another row was dropped");
    }
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slug_rename_drops_old_and_new_values_and_insert_drops_negative_entry() {
    slug_rename_drops_old_and_new_values_and_insert_drops_negative_entry_on(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slug_rename_drops_old_and_new_values_and_insert_drops_negative_entry_from_the_wal() {
    slug_rename_drops_old_and_new_values_and_insert_drops_negative_entry_on(Source::Wal).await;
}

async fn slug_rename_drops_old_and_new_values_and_insert_drops_negative_entry_on(source: Source) {
    let sb = Sandbox::start_source(source, |_| {}).await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, callsign) VALUES (100, 'acme', 'alice', 'K1ABC')")
        .await;
    assert_eventually!(10, async { l1.cache.applied().events >= 1 }, "insert not applied");

    assert!(l1.put("acme", "slug:alice", "1", &["res_users.website_slug=alice"]));
    // A negative entry: "no user has slug alice2" depends on that lookup value.
    assert!(l1.put("acme", "slug:alice2", "none", &["res_users.website_slug=alice2"]));
    assert!(l1.put("acme", "slug:bob", "none", &["res_users.website_slug=bob"]));
    assert!(l1.put("acme", "call:K1ABC", "1", &["res_users.callsign=K1ABC"]));

    sb.sql("UPDATE res_users SET website_slug = 'alice2' WHERE id = 100").await;
    assert_eventually!(10, async { !l1.has("slug:alice") && !l1.has("slug:alice2") }, "rename left a stale entry");
    assert!(l1.has("slug:bob"));
    assert!(!l1.has("call:K1ABC"), "every tag of the changed row is dropped, unchanged key values included");

    sb.sql("INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'bob')").await;
    assert_eventually!(10, async { !l1.has("slug:bob") }, "insert did not drop the negative entry");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_never_cross_tenants() {
    invalidations_never_cross_tenants_on(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_never_cross_tenants_from_the_wal() {
    invalidations_never_cross_tenants_on(Source::Wal).await;
}

async fn invalidations_never_cross_tenants_on(source: Source) {
    let sb = Sandbox::start_source(source, |_| {}).await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    // Same id and slug in two tenants' scopes.
    assert!(l1.put("acme", "acme:slug:alice", "1", &["res_users.website_slug=alice"]));
    assert!(l1.put("globex", "globex:slug:alice", "1", &["res_users.website_slug=alice"]));
    let l2 = L2::new(sb.redis.clone(), sb.keys.clone());
    let scope = |t: &str| Scope::Tenant(TenantId::new(t).unwrap());
    let key_a = sb.keys.entry(&scope("acme"), "slug", "alice").unwrap();
    let key_g = sb.keys.entry(&scope("globex"), "slug", "alice").unwrap();
    for (key, tenant) in [(&key_a, "acme"), (&key_g, "globex")] {
        let tag = TagKey::new(scope(tenant), "res_users.website_slug=alice");
        l2.store(key, Bytes::from_static(b"1"), &[tag], None).await.unwrap();
    }

    sb.sql("INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'alice')").await;
    assert_eventually!(10, async { !l1.has("acme:slug:alice") }, "acme entry not invalidated");
    assert_eventually!(10, async { l2.get(&key_a).await.unwrap().is_none() }, "acme L2 entry not deleted");
    assert!(l1.has("globex:slug:alice"), "tenant acme's write dropped tenant globex's L1 entry");
    assert!(l2.get(&key_g).await.unwrap().is_some(), "tenant acme's write deleted tenant globex's L2 entry");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_the_contract_and_unwatched_updates_emit_nothing() {
    events_carry_the_contract_and_unwatched_updates_emit_nothing_on(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_the_contract_and_unwatched_updates_emit_nothing_from_the_wal() {
    events_carry_the_contract_and_unwatched_updates_emit_nothing_on(Source::Wal).await;
}

async fn events_carry_the_contract_and_unwatched_updates_emit_nothing_on(source: Source) {
    let sb = Sandbox::start_source(source, |_| {}).await;
    sb.sql(
        "INSERT INTO res_users (id, tenant_id, team_id, website_slug, name) VALUES (5, 'acme', 42, 'eve', 'Eve');
         SET herald.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
         UPDATE res_users SET team_id = 43 WHERE id = 5;
         RESET herald.traceparent;
         UPDATE res_users SET updated_at = now() WHERE id = 5;
         DELETE FROM res_users WHERE id = 5;",
    )
    .await;
    let _capture = sb.spawn_capture().await;
    assert_eventually!(
        10,
        async { sb.stream_event_count().await == 3 },
        "expected insert, update, delete (not the unwatched update)"
    );
    let events = sb.stream_events().await;
    let ops: Vec<Operation> = events.iter().map(|e| e.operation()).collect();
    assert_eq!(ops, [Operation::Insert, Operation::Update, Operation::Delete]);
    let update = &events[1];
    assert_eq!(update.tenant, "acme");
    assert_eq!(update.table, "res_users");
    assert_eq!(update.ids, ["5"]);
    assert_eq!(update.teams.iter().map(String::as_str).collect::<std::collections::BTreeSet<_>>(), ["42", "43"].into());
    for tag in ["res_users", "res_users.id=5", "res_users.website_slug=eve"] {
        assert!(update.tags.iter().any(|t| t == tag), "missing tag {tag}: {:?}", update.tags);
    }
    assert!(update.txid > 0 && update.commit_lsn > 0 && update.commit_time_us > 0);
    assert!(update.captured_time_us >= update.commit_time_us);
    // The WAL source has no statement trigger to read the setting from.
    if source == Source::Outbox {
        assert!(update.traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{}", update.traceparent);
    }
    assert!(events[0].traceparent.is_empty());
    assert_eventually!(
        10,
        async { sb.scalar_i64("SELECT count(*) FROM herald.outbox").await == 0 },
        "drained rows are deleted"
    );
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_statements_are_split_into_bounded_chunks_per_tenant() {
    large_statements_are_split_into_bounded_chunks_per_tenant_on(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_statements_are_split_into_bounded_chunks_per_tenant_from_the_wal() {
    large_statements_are_split_into_bounded_chunks_per_tenant_on(Source::Wal).await;
}

async fn large_statements_are_split_into_bounded_chunks_per_tenant_on(source: Source) {
    let sb = Sandbox::start_source(source, |c| c.capture.chunk_rows = 100).await;
    sb.sql(
        "INSERT INTO res_users (tenant_id, website_slug) SELECT 't' || (g % 2), 's' || g FROM generate_series(1, 450) g",
    )
    .await;
    let _capture = sb.spawn_capture().await;
    let ids_seen = || async {
        sb.stream_events().await.iter().flat_map(|e| e.ids.clone()).collect::<std::collections::BTreeSet<_>>().len()
    };
    assert_eventually!(10, async { ids_seen().await == 450 }, "not every row was captured");
    let events = sb.stream_events().await;
    // The trigger writes 5 outbox rows of at most 100 rows; capture splits
    // each by tenant: at least 3 events per tenant, none over the bound.
    assert!(events.len() >= 6, "{} events", events.len());
    assert!(events.iter().all(|e| e.ids.len() <= 100));
    assert!(events.iter().all(|e| e.tenant == "t0" || e.tenant == "t1"));
    let mut ids: Vec<String> = events.iter().flat_map(|e| e.ids.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 450, "every row appears in exactly the events of its chunk");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_drops_the_table_in_every_tenant_and_l2() {
    truncate_drops_the_table_in_every_tenant_and_l2_on(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_drops_the_table_in_every_tenant_and_l2_from_the_wal() {
    truncate_drops_the_table_in_every_tenant_and_l2_on(Source::Wal).await;
}

async fn truncate_drops_the_table_in_every_tenant_and_l2_on(source: Source) {
    let sb = Sandbox::start_source(source, |_| {}).await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    assert!(l1.put("acme", "a", "1", &["res_users.id=1"]));
    assert!(l1.put("globex", "g", "1", &["res_users"]));
    let l2 = L2::new(sb.redis.clone(), sb.keys.clone());
    let scope = Scope::Tenant(TenantId::new("globex").unwrap());
    let key = sb.keys.entry(&scope, "count", "all").unwrap();
    l2.store(&key, Bytes::from_static(b"3"), &[TagKey::new(scope, "res_users")], None).await.unwrap();

    sb.sql("TRUNCATE res_users").await;
    assert_eventually!(10, async { !l1.has("a") && !l1.has("g") }, "truncate left L1 entries");
    assert_eventually!(10, async { l2.get(&key).await.unwrap().is_none() }, "truncate left the L2 entry");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_report_health_readiness_and_metrics() {
    ops_endpoints_report_health_readiness_and_metrics_on(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_report_health_readiness_and_metrics_from_the_wal() {
    ops_endpoints_report_health_readiness_and_metrics_on(Source::Wal).await;
}

async fn ops_endpoints_report_health_readiness_and_metrics_on(source: Source) {
    let sb = Sandbox::start_source(source, |_| {}).await;
    let capture = sb.spawn_capture().await;
    let broadcast = sb.spawn_broadcast().await;
    sb.sql("INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'm')").await;
    for addr in [capture.ops_addr, broadcast.ops_addr] {
        assert_eventually!(
            10,
            async { http_get(addr, "/readyz").await.starts_with("HTTP/1.1 200") },
            "{addr} never ready"
        );
        assert!(http_get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    }
    assert_eventually!(
        10,
        async { http_get(broadcast.ops_addr, "/metrics").await.contains("herald_broadcast_events_applied_total 1") },
        "broadcast metrics do not count the applied event"
    );
    assert!(http_get(capture.ops_addr, "/metrics").await.contains("herald_capture_events_appended_total 1"));
    sb.cleanup().await;
}
