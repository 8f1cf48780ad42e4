//! Faults with real components: processes killed with SIGKILL, tasks aborted
//! mid-flight, Redis connections killed, concurrent captures, malformed rows
//! and stream entries. Invalidation is at-least-once: duplicates are
//! allowed, losses are not.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use fred::prelude::*;
use herald_tests::process::ChildService;
use herald_tests::{Sandbox, assert_eventually};

/// Commits `n` single-row inserts from `writers` concurrent connections;
/// returns how many committed.
async fn burst(pool: &deadpool_postgres::Pool, n: u64, writers: u64, committed: Arc<AtomicU64>) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let pool = pool.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            let client = pool.get().await.expect("pg");
            let mut i = w;
            while i < n {
                client
                    .execute(
                        "INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', $1)",
                        &[&format!("burst-{i}")],
                    )
                    .await
                    .expect("insert");
                committed.fetch_add(1, Ordering::SeqCst);
                i += writers;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

/// Distinct row ids over every event in the stream.
async fn ids_in_stream(sb: &Sandbox) -> BTreeSet<String> {
    sb.stream_events().await.into_iter().flat_map(|e| e.ids).collect()
}

async fn outbox_empty(sb: &Sandbox) -> bool {
    sb.scalar_i64("SELECT count(*) FROM herald.outbox").await == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_process_killed_mid_burst_then_restarted_loses_nothing() {
    const HALF: u64 = 800;
    let sb = Sandbox::start_with(|c| c.capture.batch_size = 20).await;
    let capture = ChildService::spawn("herald-capture", &sb.config);
    let committed = Arc::new(AtomicU64::new(0));
    let first_half = {
        let (committed, pool) = (committed.clone(), sb.pool.clone());
        tokio::spawn(async move { burst(&pool, HALF, 4, committed).await })
    };
    // SIGKILL while capture is draining the first half.
    assert_eventually!(30, async { sb.stream_event_count().await >= 100 }, "capture never appended");
    capture.kill().await;
    first_half.await.unwrap();
    // The second half commits while no capture runs: it waits in the outbox.
    burst(&sb.pool, HALF, 4, committed.clone()).await;
    assert!(!outbox_empty(&sb).await);

    let restarted = ChildService::spawn("herald-capture", &sb.config);
    assert_eventually!(60, async { outbox_empty(&sb).await }, "restarted capture did not drain the outbox");
    // burst() names rows burst-{i} for i < n, so both halves insert HALF rows each.
    assert_eq!(committed.load(Ordering::SeqCst), 2 * HALF);
    assert_eq!(ids_in_stream(&sb).await.len() as u64, 2 * HALF, "every committed insert reaches the stream");
    restarted.kill().await;
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_task_aborted_mid_batch_then_restarted_loses_nothing() {
    const N: u64 = 600;
    let sb = Sandbox::start_with(|c| c.capture.batch_size = 10).await;
    let committed = Arc::new(AtomicU64::new(0));
    burst(&sb.pool, N, 3, committed).await;
    let capture = sb.spawn_capture().await;
    assert_eventually!(30, async { sb.stream_event_count().await >= 50 }, "capture never appended");
    capture.kill().await; // aborted wherever it stood, maybe between XADD and COMMIT
    assert!(!outbox_empty(&sb).await);
    let _capture = sb.spawn_capture().await;
    assert_eventually!(30, async { outbox_empty(&sb).await }, "restarted capture did not drain");
    assert_eq!(ids_in_stream(&sb).await.len() as u64, N);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_captures_draining_at_once_lose_nothing() {
    const N: u64 = 1200;
    let sb = Sandbox::start_with(|c| c.capture.batch_size = 25).await;
    let _a = sb.spawn_capture().await;
    let _b = sb.spawn_capture().await;
    burst(&sb.pool, N, 6, Arc::new(AtomicU64::new(0))).await;
    assert_eventually!(30, async { outbox_empty(&sb).await }, "outbox not drained");
    assert_eq!(ids_in_stream(&sb).await.len() as u64, N);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_outbox_rows_are_dead_lettered_and_the_batch_still_applies() {
    let sb = Sandbox::start().await;
    sb.sql(
        "INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'before');
         INSERT INTO herald.outbox (table_name, op, rows) VALUES ('no_such_table', 'U', '{acme,1,NULL,a,b}');
         INSERT INTO herald.outbox (table_name, op, rows) VALUES ('res_users', 'X', '{acme,1,NULL,a,b}');
         INSERT INTO herald.outbox (table_name, op, rows) VALUES ('res_users', 'U', '{\"bad tenant!\",1,NULL,a,b}');
         INSERT INTO herald.outbox (table_name, op, rows) VALUES ('res_users', 'U', '{acme,1}');
         INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'after');",
    )
    .await;
    let capture = sb.spawn_capture().await;
    assert_eventually!(10, async { outbox_empty(&sb).await }, "outbox not drained");
    let events = sb.stream_events().await;
    assert_eq!(events.len(), 2, "the two good rows were appended");
    assert_eq!(sb.scalar_i64("SELECT count(*) FROM herald.dead_letter").await, 4);
    let client = sb.pool.get().await.unwrap();
    let reasons: Vec<String> = client
        .query("SELECT reason FROM herald.dead_letter ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(reasons[0].contains("unknown table"), "{reasons:?}");
    assert!(reasons[1].contains("unknown op"), "{reasons:?}");
    assert!(reasons[2].contains("tenant"), "{reasons:?}");
    assert!(reasons[3].contains("rows of 5"), "{reasons:?}");
    assert_eventually!(
        5,
        async { http_get_metrics(capture.ops_addr).await.contains("herald_capture_dead_lettered_total 4") },
        "dead letters are counted"
    );
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_read_but_never_acknowledged_are_claimed_and_applied() {
    let sb = Sandbox::start().await;
    let _capture = sb.spawn_capture().await;
    let l1 = sb.l1_unchecked();
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'a'), (2, 'acme', 'b')").await;
    assert_eventually!(10, async { sb.stream_event_count().await == 1 }, "not captured");
    // A broadcast consumer that reads the entry and dies before acknowledging.
    assert!(sb.read_without_ack("crashed-consumer").await, "the dead consumer read the entry");

    // A live broadcast must claim it and apply it.
    let broadcast = sb.spawn_broadcast().await;
    assert_eventually!(10, async { l1.cache.is_live() }, "l1 not live");
    assert!(l1.put("acme", "user:1", "stale", &["res_users.id=1"]));
    assert_eventually!(10, async { !l1.has("user:1") }, "the pending entry was never claimed and applied");
    assert_eventually!(10, async { pending(&sb).await == 0 }, "claimed entry not acknowledged");
    assert!(http_get_metrics(broadcast.ops_addr).await.contains("herald_broadcast_claimed_total 1"));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broadcast_re_reads_its_own_pending_entries_at_once() {
    // Claiming from dead consumers is far away: only the restarted
    // instance's own identity can bring the entry back in time.
    let mut sb = Sandbox::start_with(|c| c.broadcast.claim_idle_ms = 600_000).await;
    sb.config.broadcast.consumer = Some(herald_tests::unique("broadcast-"));
    let consumer = sb.config.broadcast.consumer.clone().unwrap();
    let _capture = sb.spawn_capture().await;
    let l1 = sb.l1_unchecked();
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'a')").await;
    assert_eventually!(10, async { sb.stream_event_count().await == 1 }, "not captured");
    // The instance read the entry, then was killed before acknowledging it.
    assert!(sb.read_without_ack(&consumer).await, "the entry was not read");

    // The same instance, restarted as a new process.
    let restarted = ChildService::spawn("herald-broadcast", &sb.config);
    assert_eventually!(10, async { pending(&sb).await == 0 }, "the restarted instance left its own pending entry");
    assert_eventually!(10, async { l1.cache.applied().events >= 1 }, "the pending entry's invalidation never arrived");
    restarted.kill().await;
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_killed_mid_burst_then_replaced_applies_everything() {
    const N: u64 = 400;
    let sb = Sandbox::start_with(|c| c.broadcast.read_count = 5).await;
    let _capture = sb.spawn_capture().await;
    let broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    burst(&sb.pool, N, 4, Arc::new(AtomicU64::new(0))).await;
    broadcast.kill().await;
    let _replacement = sb.spawn_broadcast().await;
    assert_eventually!(30, async { outbox_empty(&sb).await && pending(&sb).await == 0 }, "events left unapplied");
    // One event per insert statement; each reached L1 at least once.
    assert_eventually!(10, async { l1.cache.applied().events >= N }, "not every event was applied");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_subscriber_connection_flushes_resubscribes_and_stays_coherent() {
    let sb = Sandbox::start().await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    assert!(l1.put("acme", "kept-before-kill", "v", &["res_users.id=99"]));
    let flushes = l1.cache.metrics().flushes.get();

    sb.kill_pubsub_client(&l1.client_name).await;

    assert_eventually!(10, async { l1.cache.metrics().flushes.get() > flushes }, "lost subscription did not flush");
    assert_eventually!(10, async { l1.cache.is_live() }, "never resubscribed");
    assert!(!l1.has("kept-before-kill"), "an entry from before the gap survived");

    // Coherent afterwards.
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (5, 'acme', 'x')").await;
    assert_eventually!(10, async { l1.cache.applied().events >= 1 }, "insert not applied");
    assert!(l1.put("acme", "user:5", "x", &["res_users.id=5"]));
    sb.sql("UPDATE res_users SET name = 'changed' WHERE id = 5").await;
    assert_eventually!(10, async { !l1.has("user:5") }, "not coherent after resubscribing");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_heartbeats_make_l1_flush_and_bypass_until_broadcast_returns() {
    let sb = Sandbox::start().await;
    let broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    assert!(l1.put("acme", "k", "v", &["res_users.id=1"]));
    broadcast.stop().await.unwrap();
    assert_eventually!(5, async { !l1.cache.is_live() }, "L1 kept serving without heartbeats");
    assert!(!l1.has("k"));
    assert!(!l1.put("acme", "k", "v", &["res_users.id=1"]), "fills are refused while not live");
    let _broadcast = sb.spawn_broadcast().await;
    assert_eventually!(5, async { l1.cache.is_live() }, "L1 did not come back");
    assert!(!l1.has("k"), "the entry from before the outage was flushed");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_entries_go_to_the_dead_stream_and_the_rest_applies() {
    let sb = Sandbox::start().await;
    let _capture = sb.spawn_capture().await;
    let broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    assert!(l1.put("acme", "user:3", "v", &["res_users.id=3"]));
    let _: String = sb
        .redis
        .next()
        .xadd(sb.log().stream_of("acme"), false, None, "*", vec![("e", Bytes::from_static(b"\xff\xff not protobuf"))])
        .await
        .unwrap();
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (3, 'acme', 'c')").await;
    assert_eventually!(10, async { !l1.has("user:3") }, "the good event after the bad one was not applied");
    let dead: u64 = sb.redis.next().xlen(sb.keys.dead_stream()).await.unwrap();
    assert_eq!(dead, 1);
    assert_eventually!(5, async { pending(&sb).await == 0 }, "the bad entry must be acknowledged too");
    assert!(http_get_metrics(broadcast.ops_addr).await.contains("herald_broadcast_malformed_total 1"));
    sb.cleanup().await;
}

async fn pending(sb: &Sandbox) -> i64 {
    let summary: Value = sb
        .redis
        .next()
        .xpending(sb.log().stream_of("acme"), sb.config.broadcast.group.as_str(), ())
        .await
        .unwrap_or(Value::Null);
    match summary {
        Value::Array(parts) => parts.first().and_then(|v| v.as_i64()).unwrap_or(0),
        _ => 0,
    }
}

async fn http_get_metrics(addr: std::net::SocketAddr) -> String {
    herald_tests::http_get(addr, "/metrics").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_reconnects_after_its_postgres_connections_are_terminated() {
    let sb = Sandbox::start_with(|c| c.capture.poll_interval_ms = 120_000).await;
    let capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'a')").await;
    assert_eventually!(10, async { l1.cache.applied().events >= 1 }, "first insert not applied");

    // Every other session on the sandbox database: capture's pool and its
    // LISTEN connection (our own pool reconnects by itself).
    let admin = {
        let (client, connection) =
            tokio_postgres::connect(&herald_tests::admin_url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    };
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&sb.db_name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 2, "capture's pool and doorbell connections were terminated ({killed})");

    // The doorbell must come back: the backstop poll is two minutes away, so
    // only a re-established LISTEN can deliver the next change in time.
    assert!(l1.put("acme", "user:1", "v", &["res_users.id=1"]));
    assert_eventually!(
        15,
        async { herald_tests::http_get(capture.ops_addr, "/readyz").await.starts_with("HTTP/1.1 200") },
        "capture never became ready again"
    );
    sb.sql("UPDATE res_users SET name = 'after' WHERE id = 1").await;
    assert_eventually!(15, async { !l1.has("user:1") }, "no invalidation after postgres connections were terminated");
    sb.cleanup().await;
}
