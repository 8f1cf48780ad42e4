//! The gateway under hostile or careless clients: sockets that never
//! authenticate, slow request heads, oversize publishes, expired tokens,
//! reserved idempotency keys, floods. Each limit is checked with the input
//! that crosses it, and the node keeps serving others.

use std::time::Duration;

use herald_proto::v1::PublishRequest;
use herald_tests::gateway::{SERVICE_TOKEN, WsClient, configure, grpc_publish, http_publish, mint, team_token};
use herald_tests::{Sandbox, assert_eventually};
use serde_json::json;

async fn sandbox() -> Sandbox {
    Sandbox::start_with(configure).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_only_pings_is_closed_at_the_connect_timeout() {
    let sb = sandbox().await;
    let gw = sb
        .spawn_gateway_with(|c| {
            c.gateway.connect_timeout_ms = 500;
            c.gateway.limits.max_connections = 1;
        })
        .await;
    let mut pinger = WsClient::open(&gw).await;
    // Pings every 200 ms, never a `connect` frame.
    let closed = pinger.ping_until_closed(Duration::from_millis(200)).await;
    assert_eq!(closed.code, 4004, "{closed:?}");
    // Its slot is free: the next client gets in.
    let mut next = None;
    assert_eventually!(
        5,
        async {
            next = WsClient::try_open(&gw).await;
            next.is_some()
        },
        "the slot was not released"
    );
    let mut next = next.unwrap();
    let reply = next.request(json!({"type": "connect", "token": team_token("acme", "next")})).await;
    assert_eq!(reply["type"], "connected", "{reply}");
    assert_eq!(next.subscribe("team:1").await["type"], "subscribed");
    sb.cleanup().await;
}

fn publish_request(channel: &str, data: String) -> PublishRequest {
    PublishRequest { tenant: "acme".into(), channel: channel.into(), data: data.into(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_grpc_publish_is_refused_unread_and_the_gateway_keeps_serving() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway_with(|c| c.gateway.limits.max_publication_bytes = 1024).await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    client.subscribe("team:5").await;
    // Far over twice the publication limit: refused by the decoder.
    let huge = format!("\"{}\"", "x".repeat(64 * 1024));
    let refused = grpc_publish(&gw, SERVICE_TOKEN, publish_request("team:5", huge)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    // Over the publication limit but decodable: refused with the limit named.
    let big = format!("\"{}\"", "x".repeat(1500));
    let refused = grpc_publish(&gw, SERVICE_TOKEN, publish_request("team:5", big)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("limit is 1024"), "{refused:?}");
    // The node still serves.
    let ok = grpc_publish(&gw, SERVICE_TOKEN, publish_request("team:5", r#"{"n":1}"#.into())).await;
    assert_eq!(ok.expect("publish after the refusal").offset, 1);
    assert_eq!(client.next_pub().await["data"]["n"], 1);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_closed_when_its_token_expires() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway_with(|c| c.gateway.jwt_leeway_s = 1).await;
    let short = mint("hs1", "acme", "alice", json!(["team:*"]), 2);
    let mut client = WsClient::connect(&gw, &short).await;
    assert_eq!(client.subscribe("team:1").await["type"], "subscribed");
    let mut other = WsClient::connect(&gw, &team_token("acme", "bob")).await;
    assert_eq!(other.subscribe("team:1").await["type"], "subscribed");
    let (closed, disconnect) = client.closed().await;
    assert_eq!(closed.code, 4502, "{closed:?}");
    assert_eq!(disconnect.expect("a disconnect frame first")["reconnect"], false);
    // The other socket is untouched.
    let (status, _) =
        http_publish(&gw, Some(SERVICE_TOKEN), &json!({"tenant": "acme", "channel": "team:1", "data": 1})).await;
    assert_eq!(status, 200);
    assert_eq!(other.next_pub().await["data"], 1);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_of_broadcast_are_reserved() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    client.subscribe("team:77").await;
    // Broadcast's own keys are `ev:{event_id}:team:{team}`: a service must
    // not be able to pre-empt a row change's publication.
    let body = json!({"tenant": "acme", "channel": "team:77", "data": 1, "idempotency_key": "ev:db:42:team:77"});
    let (status, reply) = http_publish(&gw, Some(SERVICE_TOKEN), &body).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"].as_str().unwrap_or("").contains("reserved prefix"), "{reply}");
    let mut request = publish_request("team:77", "1".into());
    request.idempotency_key = "ev:db:42:team:77".into();
    let refused = grpc_publish(&gw, SERVICE_TOKEN, request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("reserved prefix"), "{refused:?}");
    // Other keys, even ones containing `ev:`, are fine; nothing was published before.
    let body = json!({"tenant": "acme", "channel": "team:77", "data": 2, "idempotency_key": "order-ev:1"});
    assert_eq!(http_publish(&gw, Some(SERVICE_TOKEN), &body).await.0, 200);
    let p = client.next_pub().await;
    assert_eq!((p["offset"].as_u64(), &p["data"]), (Some(1), &json!(2)));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recover_with_a_wrong_epoch_reads_no_history() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    for n in 1..=50 {
        let (status, _) =
            http_publish(&gw, Some(SERVICE_TOKEN), &json!({"tenant": "acme", "channel": "team:3", "data": n})).await;
        assert_eq!(status, 200);
    }
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    let reply = client.subscribe_recover("team:3", 0, "not-the-epoch").await;
    assert_eq!((reply["recovered"].as_bool(), reply["missed"].as_u64()), (Some(false), Some(0)), "{reply}");
    assert_eq!(gw.metric("herald_gateway_recovery_reads_total").await, 0.0, "history was read for a wrong epoch");
    // With the right epoch, exactly what was missed is read.
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    let mut other = WsClient::connect(&gw, &team_token("acme", "bob")).await;
    let reply = other.subscribe_recover("team:3", 45, &epoch).await;
    assert_eq!((reply["recovered"].as_bool(), reply["missed"].as_u64()), (Some(true), Some(5)), "{reply}");
    assert_eq!(gw.metric("herald_gateway_recovery_reads_total").await, 5.0);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_cannot_use_up_the_publish_apis_rate() {
    let sb = sandbox().await;
    let gw = sb
        .spawn_gateway_with(|c| {
            c.gateway.limits.tenant_ops_per_s = 1;
            c.gateway.limits.publish_ops_per_s = 2;
        })
        .await;
    // Untrusted clients of acme use up the tenant's bucket...
    let mut client = WsClient::connect(&gw, &team_token("acme", "mallory")).await;
    let mut refused = false;
    for n in 0..20 {
        let reply = client.subscribe(&format!("team:{n}")).await;
        if reply["code"] == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused, "the clients' bucket never ran out");
    // ...and the app's publish API still gets through, on its own bucket.
    let body = json!({"tenant": "acme", "channel": "team:1", "data": 1});
    let (status, reply) = http_publish(&gw, Some(SERVICE_TOKEN), &body).await;
    assert_eq!(status, 200, "{reply}");
    // Which has its own limit.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(http_publish(&gw, Some(SERVICE_TOKEN), &body).await.0);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_every_allowed_channel_at_connect_is_not_a_flood() {
    let sb = sandbox().await;
    // A command rate far below the subscription limit (the defaults are
    // 50/s and 128): the burst must still cover subscribing to everything.
    let max = 40;
    let gw = sb
        .spawn_gateway_with(|c| {
            c.gateway.limits.connection_commands_per_s = 1;
            c.gateway.limits.max_subscriptions_per_connection = max;
        })
        .await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    for n in 0..max {
        client.send(json!({"type": "subscribe", "id": n + 1, "channel": format!("team:{n}")})).await;
    }
    for _ in 0..max {
        let frame = client.next_frame().await.unwrap_or_else(|closed| panic!("closed: {closed:?}"));
        assert_eq!(frame["type"], "subscribed", "{frame}");
    }
    assert_eq!(client.request(json!({"type": "ping"})).await["type"], "pong");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_sees_the_rate_limit_close_code() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway_with(|c| c.gateway.limits.connection_commands_per_s = 5).await;
    for attempt in 0..3 {
        let mut client = WsClient::connect(&gw, &team_token("acme", "flood")).await;
        // Far more than the burst, written before reading anything: the
        // server closes while the client's frames are still unread.
        client.flood(json!({"type": "ping"}), 5_000).await;
        let (closed, disconnect) = client.closed().await;
        assert_eq!(closed.code, 4003, "attempt {attempt}: {closed:?}");
        assert_eq!(disconnect.expect("a disconnect frame first")["code"], 4003);
    }
    // Others are served meanwhile.
    let mut calm = WsClient::connect(&gw, &team_token("acme", "calm")).await;
    assert_eq!(calm.subscribe("team:1").await["type"], "subscribed");
    sb.cleanup().await;
}
