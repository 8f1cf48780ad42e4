//! The doorbell: an idle capture is woken by writers' NOTIFY (not by its
//! backstop poll), and the busy→idle hand-over loses no wake-up.

use std::time::{Duration, Instant};

use herald_tests::{Sandbox, assert_eventually};

/// A poll so slow that only the doorbell can explain a prompt capture.
const NO_POLL_MS: u64 = 120_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_capture_is_woken_by_the_doorbell() {
    let sb = Sandbox::start_with(|c| c.capture.poll_interval_ms = NO_POLL_MS).await;
    let capture = sb.spawn_capture().await;
    // Let capture go idle on the bell.
    assert_eventually!(10, async { metric(&capture, "herald_capture_busy").await == Some(0) }, "never idle");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    sb.sql("INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'ding')").await;
    assert_eventually!(10, async { sb.stream_event_count().await == 1 }, "doorbell did not wake capture");
    assert!(started.elapsed() < Duration::from_secs(5), "woken by something slower than the doorbell");
    assert!(metric(&capture, "herald_capture_doorbells_total").await >= Some(1));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_to_idle_handover_loses_no_wakeup() {
    let sb = Sandbox::start_with(|c| {
        c.capture.poll_interval_ms = NO_POLL_MS;
        c.capture.linger_ms = 20;
    })
    .await;
    let capture = sb.spawn_capture().await;
    for round in 0..20 {
        // A burst makes capture busy (writers stop ringing) ...
        for i in 0..20 {
            sb.sql(&format!("INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'r{round}-{i}')")).await;
        }
        // ... and a write around the moment it goes idle again must still
        // be captured promptly, by the bell, not by the two-minute poll.
        let pause = Duration::from_millis(5 * (round % 6));
        tokio::time::sleep(pause).await;
        sb.sql(&format!("INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'r{round}-last')")).await;
        let expected = (round + 1) * 21;
        assert_eventually!(
            10,
            async { sb.stream_event_count().await == expected },
            "round {round}: a write was left behind"
        );
    }
    drop(capture);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_writer_transaction_that_skipped_the_bell_is_still_captured() {
    let sb = Sandbox::start_with(|c| {
        c.capture.poll_interval_ms = NO_POLL_MS;
        c.capture.linger_ms = 20;
    })
    .await;
    let capture = sb.spawn_capture().await;
    // Keep capture busy with a steady trickle, and meanwhile open a writer
    // transaction whose statement runs while capture is busy (so it skips
    // the bell), then commit it after the trickle stops.
    let long = sb.pool.get().await.unwrap();
    let trickle = {
        let pool = sb.pool.clone();
        tokio::spawn(async move {
            let c = pool.get().await.unwrap();
            for i in 0..50 {
                c.execute("INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', $1)", &[&format!("t{i}")])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    assert_eventually!(10, async { metric(&capture, "herald_capture_busy").await == Some(1) }, "never busy");
    long.batch_execute("BEGIN; INSERT INTO res_users (tenant_id, website_slug) VALUES ('acme', 'long')").await.unwrap();
    trickle.await.unwrap();
    // Capture lingers, lets its lease expire, then tries to go idle: it
    // must not while our transaction (which skipped the bell) is in flight.
    // Wait well past the lease so an unguarded capture would be asleep.
    tokio::time::sleep(Duration::from_millis(3 * herald_capture::schema::LEASE_MS as u64)).await;
    long.batch_execute("COMMIT").await.unwrap();
    assert_eventually!(
        10,
        async { sb.stream_event_count().await == 51 },
        "the long transaction's change was lost until the poll"
    );
    sb.cleanup().await;
}

async fn metric(service: &herald_tests::ServiceHandle, name: &str) -> Option<i64> {
    let body = herald_tests::http_get(service.ops_addr, "/metrics").await;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok())).map(|v| v as i64)
}
