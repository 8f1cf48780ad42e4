use super::*;
use crate::scope::TenantId;

fn cache() -> L1Cache {
    let l1 = L1Cache::new(&L1Config { max_bytes: 1 << 20, max_ttl_ms: 60_000, heartbeat_timeout_ms: 3_000 });
    l1.set_live(true);
    l1
}

fn tag(t: &str) -> TagKey {
    TagKey::new(Scope::Tenant(TenantId::new("acme").unwrap()), t)
}

fn put(l1: &L1Cache, key: &str, value: &str, tags: &[&str]) -> bool {
    let ticket = l1.begin_fill();
    l1.insert(ticket, key, Bytes::from(value.to_string()), tags.iter().map(|t| tag(t)).collect(), None)
}

#[test]
fn invalidation_drops_every_holder_of_a_tag() {
    let l1 = cache();
    assert!(put(&l1, "a", "1", &["users.id=1", "users.slug=alice"]));
    assert!(put(&l1, "b", "2", &["users.id=1"]));
    assert!(put(&l1, "c", "3", &["users.id=2"]));
    assert_eq!(l1.invalidate(&[tag("users.id=1")]), 2);
    assert_eq!(l1.get("a"), None);
    assert_eq!(l1.get("b"), None);
    assert_eq!(l1.get("c").as_deref(), Some(&b"3"[..]));
}

#[test]
fn tags_are_scoped_by_tenant() {
    let l1 = cache();
    assert!(put(&l1, "a", "1", &["users.id=1"]));
    let other = TagKey::new(Scope::Tenant(TenantId::new("globex").unwrap()), "users.id=1");
    assert_eq!(l1.invalidate(&[other]), 0);
    assert!(l1.get("a").is_some());
}

#[test]
fn fill_that_raced_an_invalidation_is_refused() {
    let l1 = cache();
    let ticket = l1.begin_fill();
    // The source was read here (old value); then the invalidation arrives.
    l1.invalidate(&[tag("users.slug=alice")]);
    let stored = l1.insert(ticket, "alice", Bytes::from_static(b"old"), vec![tag("users.slug=alice")], None);
    assert!(!stored);
    assert_eq!(l1.get("alice"), None);
    assert_eq!(l1.metrics().rejected_stale_fills.get(), 1);
    // An unrelated tag does not refuse a fill.
    let ticket = l1.begin_fill();
    l1.invalidate(&[tag("users.slug=bob")]);
    assert!(l1.insert(ticket, "alice", Bytes::from_static(b"new"), vec![tag("users.slug=alice")], None));
}

#[test]
fn flush_refuses_older_fills_and_not_live_bypasses() {
    let l1 = cache();
    assert!(put(&l1, "a", "1", &["t"]));
    let ticket = l1.begin_fill();
    l1.set_live(false);
    assert_eq!(l1.get("a"), None, "not live: bypassed");
    l1.set_live(true);
    assert_eq!(l1.get("a"), None, "going down flushed everything");
    assert!(!l1.insert(ticket, "a", Bytes::from_static(b"x"), vec![tag("t")], None));
    assert!(put(&l1, "a", "2", &["t"]));
    assert_eq!(l1.get("a").as_deref(), Some(&b"2"[..]));
}

#[test]
fn not_live_refuses_inserts() {
    let l1 = cache();
    l1.set_live(false);
    assert!(!put(&l1, "a", "1", &["t"]));
}

#[test]
fn replaced_entry_keeps_only_its_new_tags() {
    let l1 = cache();
    assert!(put(&l1, "k", "1", &["old"]));
    assert!(put(&l1, "k", "2", &["new"]));
    l1.inner.cache.run_pending_tasks();
    assert_eq!(l1.invalidate(&[tag("old")]), 0);
    assert_eq!(l1.get("k").as_deref(), Some(&b"2"[..]));
    assert_eq!(l1.invalidate(&[tag("new")]), 1);
    assert_eq!(l1.get("k"), None);
}

#[test]
fn bounded_by_bytes() {
    let l1 = L1Cache::new(&L1Config { max_bytes: 64 * 1024, max_ttl_ms: 60_000, heartbeat_timeout_ms: 3_000 });
    l1.set_live(true);
    let value = "x".repeat(1000);
    for i in 0..1000 {
        let _ = put(&l1, &format!("k{i}"), &value, &["t"]);
    }
    l1.inner.cache.run_pending_tasks();
    assert!(l1.inner.cache.weighted_size() <= 64 * 1024, "{}", l1.inner.cache.weighted_size());
    assert!(l1.entry_count() < 100);
}

#[test]
fn ttl_is_capped() {
    let l1 = L1Cache::new(&L1Config { max_bytes: 1 << 20, max_ttl_ms: 50, heartbeat_timeout_ms: 3_000 });
    l1.set_live(true);
    let ticket = l1.begin_fill();
    assert!(l1.insert(ticket, "k", Bytes::from_static(b"v"), vec![], Some(Duration::from_secs(3600))));
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(l1.get("k"), None);
}

#[test]
fn apply_advances_position() {
    let l1 = cache();
    assert!(put(&l1, "a", "1", &["users.id=1"]));
    let event = InvalidationEvent {
        tenant: "acme".into(),
        tags: vec!["users.id=1".into()],
        commit_lsn: 42,
        ..Default::default()
    };
    l1.apply(&event);
    assert_eq!(l1.get("a"), None);
    assert_eq!(l1.applied(), Position { commit_lsn: 42, watermark_lsn: 0, events: 1, generation: 0 });
    l1.apply_watermark(40, 4);
    l1.apply_watermark(30, 3);
    assert_eq!(l1.applied().watermark_lsn, 40, "a watermark never goes back");
    assert_eq!(l1.watermark_time_us(), 4);
}

#[test]
fn a_fill_that_never_ends_cannot_grow_the_bookkeeping_without_bound() {
    let l1 = cache();
    let stuck = l1.begin_fill();
    for i in 0..(RECENT_MAX + 100) {
        l1.invalidate_prefix(&format!("herald:e:t:{{acme}}:kv:p{i}"));
        l1.invalidate(&[tag(&format!("users.id={i}"))]);
    }
    {
        let index = lock(&l1.inner.index);
        assert!(index.recent_prefixes.len() <= RECENT_MAX, "{} prefixes kept", index.recent_prefixes.len());
        assert!(index.recent.len() <= RECENT_MAX, "{} tags kept", index.recent.len());
    }
    // Forgetting is safe: the fill that started before is refused.
    assert!(!l1.insert(stuck, "late", Bytes::from_static(b"v"), vec![tag("other")], None));
    assert!(put(&l1, "fresh", "v", &["other"]), "a fill after the bound is kept as usual");
}

#[test]
fn row_tagged_entries_fall_to_a_table_wide_event() {
    let l1 = cache();
    assert!(put(&l1, "slug:alice", "1", &["users.slug=alice"]));
    assert!(put(&l1, "list", "[1]", &["users"]));
    assert!(put(&l1, "other", "x", &["orders.id=1"]));
    let event = |widened| InvalidationEvent {
        tenant: "acme".into(),
        table: "users".into(),
        tags: vec!["users".into()],
        widened,
        ..Default::default()
    };
    l1.apply(&event(false));
    assert!(l1.get("slug:alice").is_some(), "an ordinary event of the table dropped a row entry");
    assert!(l1.get("list").is_none());
    l1.apply(&event(true));
    assert!(l1.get("slug:alice").is_none(), "a widened event left a row entry");
    assert!(l1.get("other").is_some());
}

#[test]
fn watchers_hear_of_every_flush_in_order() {
    let l1 = cache();
    let mut applied = l1.watch();
    let generation = l1.generation();
    l1.apply(&InvalidationEvent { tenant: "acme".into(), tags: vec!["t".into()], ..Default::default() });
    l1.set_live(false);
    l1.set_live(true);
    assert!(matches!(applied.try_recv(), Ok(Applied::Event(_))));
    assert!(matches!(applied.try_recv(), Ok(Applied::Flushed { generation: g }) if g == generation + 1));
    assert!(applied.try_recv().is_err(), "going live again is no flush");
    assert_eq!(l1.applied().generation, generation + 1);
}

#[test]
fn watchers_hear_of_watermarks_in_order_with_events_and_never_of_one_going_back() {
    let l1 = cache();
    let mut applied = l1.watch();
    l1.apply(&InvalidationEvent { tenant: "acme".into(), tags: vec!["t".into()], ..Default::default() });
    l1.apply_watermark(40, 4);
    l1.apply_watermark(30, 3);
    assert!(matches!(applied.try_recv(), Ok(Applied::Event(_))));
    assert!(matches!(applied.try_recv(), Ok(Applied::Watermark { lsn: 40, pg_time_us: 4 })));
    assert!(
        matches!(applied.try_recv(), Ok(Applied::Watermark { lsn: 40, pg_time_us: 4 })),
        "an older watermark repeats the newest, never goes back"
    );
}
