//! A Redis server restart (the test's own server, on its own port, with no
//! persistence): writes made while it is down wait in the outbox, L1 holders
//! flush and resubscribe, the stream and consumer group are recreated, and
//! the system is coherent afterwards.

use std::time::Duration;

use herald_tests::{Sandbox, assert_eventually, free_port, start_redis};

async fn redis_answers(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_invalidation() {
    let port = free_port();
    let mut redis = start_redis(port);
    assert_eventually!(10, async { redis_answers(port).await }, "redis did not start");
    let sb = Sandbox::start_with(|c| {
        c.redis.url = format!("redis://127.0.0.1:{port}");
        c.redis.command_timeout_ms = 1_000;
    })
    .await;
    let _capture = sb.spawn_capture().await;
    let broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'a')").await;
    assert_eventually!(10, async { l1.cache.applied().events >= 1 }, "insert not applied");
    assert!(l1.put("acme", "user:1", "old", &["res_users.id=1"]));

    redis.kill().await.unwrap();
    // Written while Redis is down: it must wait in the outbox, not vanish.
    sb.sql("UPDATE res_users SET name = 'changed while redis was down' WHERE id = 1").await;
    assert_eventually!(10, async { !l1.cache.is_live() }, "L1 kept serving without its subscription");
    assert!(!l1.has("user:1"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sb.scalar_i64("SELECT count(*) FROM herald.outbox").await, 1, "the change waits in the outbox");

    // Same port, empty server: stream and group are gone.
    let _redis = start_redis(port);
    assert_eventually!(10, async { redis_answers(port).await }, "redis did not restart");
    assert_eventually!(
        20,
        async { sb.scalar_i64("SELECT count(*) FROM herald.outbox").await == 0 },
        "capture did not append after the restart"
    );
    assert_eventually!(20, async { l1.cache.is_live() }, "L1 did not resubscribe");
    // The change made during the outage is applied (at-least-once). Whether
    // this L1 sees it depends on whether it resubscribed first; if not, it
    // flushed when it lost its subscription, which is just as coherent.
    assert_eventually!(
        20,
        async { herald_tests::metric(broadcast.ops_addr, "herald_broadcast_events_applied_total", "").await >= 2.0 },
        "the outage's change was never applied"
    );

    // Coherent afterwards.
    assert!(l1.put("acme", "user:1", "v2", &["res_users.id=1"]));
    sb.sql("UPDATE res_users SET name = 'after' WHERE id = 1").await;
    assert_eventually!(10, async { !l1.has("user:1") }, "not coherent after the restart");
    sb.cleanup().await;
}
