//! Every HTTP listener bounds how long a client may take to send a request
//! head (slowloris) and how long an idle keep-alive connection stays open,
//! while other clients are served.

use std::net::SocketAddr;
use std::time::Duration;

use herald_tests::assert_eventually;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Sends a request head one byte a second, never finishing it. True when
/// the server closes the connection within `max_bytes` seconds.
async fn dribbled_head_is_dropped(addr: SocketAddr, max_bytes: usize) -> bool {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = b"GET /v1/ws HTTP/1.1\r\nHost: test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut buf = [0u8; 1024];
    for byte in head.iter().take(max_bytes) {
        if stream.write_all(&[*byte]).await.is_err() {
            return true;
        }
        // Whatever the server answers (408 or nothing), the end is a close.
        let read = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        if read.is_ok() {
            return true;
        }
    }
    false
}

/// Sends one complete keep-alive request, reads its response, then waits.
/// True when the server closes the idle connection within `wait`.
async fn idle_keep_alive_is_closed(addr: SocketAddr, path: &str, wait: Duration) -> bool {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let n = stream.read(&mut buf).await.expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 "), "no response");
    let closed = tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    closed.is_ok()
}

/// Whether a plain request on `addr` gets an HTTP response.
async fn served(addr: SocketAddr, path: &str) -> bool {
    herald_tests::http_get(addr, path).await.starts_with("HTTP/1.1 ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_drops_slow_request_heads_and_serves_others() {
    let sb = herald_tests::Sandbox::start_with(|c| {
        herald_tests::gateway::configure(c);
        c.http.header_read_timeout_ms = 1_000;
    })
    .await;
    let gw = sb.spawn_gateway().await;
    let slow = tokio::spawn(dribbled_head_is_dropped(gw.http, 20));
    // Meanwhile others are served, on the public port and the ops port.
    assert_eventually!(5, async { served(gw.http, "/v1/publish").await }, "gateway stopped serving");
    assert!(slow.await.unwrap(), "a head sent one byte a second was never dropped");
    assert!(dribbled_head_is_dropped(gw.ops, 20).await, "the ops port kept a slow head");
    assert!(idle_keep_alive_is_closed(gw.http, "/v1/publish", Duration::from_secs(10)).await, "idle connection kept");
    let mut client =
        herald_tests::gateway::WsClient::connect(&gw, &herald_tests::gateway::team_token("acme", "a")).await;
    assert_eq!(client.subscribe("team:1").await["type"], "subscribed");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_api_drops_slow_request_heads_and_serves_others() {
    let sb = herald_tests::cache_api::sandbox_with(|c| c.http.header_read_timeout_ms = 1_000).await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Default::default()).await;
    let slow = tokio::spawn(dribbled_head_is_dropped(node.http_addr, 20));
    assert_eventually!(5, async { served(node.http_addr, "/openapi.json").await }, "cache-api stopped serving");
    assert!(slow.await.unwrap(), "a head sent one byte a second was never dropped");
    assert!(idle_keep_alive_is_closed(node.http_addr, "/openapi.json", Duration::from_secs(10)).await, "idle kept");
    sb.cleanup().await;
}
