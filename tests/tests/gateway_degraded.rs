//! The gateway while Redis is down (the test's own Redis server, killed and
//! restarted): delivery continues locally, `/readyz` says so, and history
//! and cross-node delivery resume when Redis is back.

use std::process::Stdio;

use herald_tests::gateway::{SERVICE_TOKEN, WsClient, configure, http_publish, team_token};
use herald_tests::{Sandbox, assert_eventually};
use serde_json::json;
use tokio::process::{Child, Command};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server on PATH")
}

async fn redis_answers(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_local_delivery_and_history_resumes_after() {
    let port = free_port();
    let mut redis = start_redis(port);
    assert_eventually!(10, async { redis_answers(port).await }, "redis did not start");
    let sb = Sandbox::start_with(|c| {
        configure(c);
        c.redis.url = format!("redis://127.0.0.1:{port}");
        c.redis.command_timeout_ms = 500;
    })
    .await;
    let gw = sb.spawn_gateway().await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    assert_eq!(client.subscribe("team:1").await["degraded"], json!(null));
    let publish = |n: u64| json!({"tenant": "acme", "channel": "team:1", "data": {"n": n}});
    assert_eq!(http_publish(&gw, Some(SERVICE_TOKEN), &publish(1)).await.0, 200);
    assert_eq!(client.next_pub().await["offset"], 1);

    redis.kill().await.unwrap();
    assert_eventually!(10, async { gw.readyz().await.contains("redis: not ready") }, "readyz still ready");
    // The publish API still reaches this node's sockets, flagged local-only.
    let (status, body) = http_publish(&gw, Some(SERVICE_TOKEN), &publish(2)).await;
    assert_eq!((status, body["local_only"].as_bool()), (202, Some(true)), "{body}");
    let p = client.next_pub().await;
    assert_eq!((p["offset"].as_u64(), p["data"]["n"].as_u64()), (Some(0), Some(2)));
    // A subscribe while Redis is down works, degraded.
    let mut late = WsClient::connect(&gw, &team_token("acme", "bob")).await;
    let reply = late.subscribe("team:1").await;
    assert_eq!(reply["degraded"], true, "{reply}");

    // Back (empty): the subscription, history and cross-node path resume.
    let _redis = start_redis(port);
    assert_eventually!(20, async { gw.readyz().await.starts_with("HTTP/1.1 200") }, "readyz never recovered");
    let (status, body) = http_publish(&gw, Some(SERVICE_TOKEN), &publish(3)).await;
    assert_eq!(status, 200, "{body}");
    let p = client.next_pub().await;
    assert_eq!((p["offset"].as_u64(), p["data"]["n"].as_u64()), (Some(1), Some(3)), "new epoch starts at 1");
    // The subscription made during the outage had no position: instead of
    // continuing as if nothing was missed, it is asked to resubscribe.
    let frame = late.next_frame().await.unwrap();
    assert_eq!((frame["type"].as_str(), frame["resubscribe"].as_bool()), (Some("unsubscribed"), Some(true)), "{frame}");
    let epoch = body["epoch"].as_str().unwrap().to_string();
    let reply = late.subscribe_recover("team:1", 0, &epoch).await;
    assert_eq!((reply["recovered"].as_bool(), reply["missed"].as_u64()), (Some(true), Some(1)), "{reply}");
    assert_eq!(late.next_pub().await["data"]["n"], 3);
    let mut recovering = WsClient::connect(&gw, &team_token("acme", "carol")).await;
    let reply = recovering.subscribe_recover("team:1", 0, &epoch).await;
    assert_eq!((reply["recovered"].as_bool(), reply["missed"].as_u64()), (Some(true), Some(1)), "{reply}");
    sb.cleanup().await;
}
