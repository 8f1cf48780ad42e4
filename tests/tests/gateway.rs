//! The WebSocket gateway against real Redis (and, end to end, real Postgres,
//! capture and broadcast), with real sockets and two gateway instances where
//! fan-out across nodes matters.

use herald_core::channel::{self, Channel, HistoryOptions};
use herald_core::keys::TenantId;
use herald_proto::v1::PublishRequest;
use herald_tests::gateway::{
    ACME_SERVICE_TOKEN, GatewayHandle, SERVICE_TOKEN, WsClient, configure, grpc_publish, http_publish, mint, team_token,
};
use herald_tests::{Sandbox, assert_eventually};
use serde_json::json;

async fn sandbox() -> Sandbox {
    Sandbox::start_with(configure).await
}

async fn publish(gw: &GatewayHandle, tenant: &str, channel: &str, data: serde_json::Value) -> serde_json::Value {
    let (status, body) =
        http_publish(gw, Some(SERVICE_TOKEN), &json!({"tenant": tenant, "channel": channel, "data": data})).await;
    assert_eq!(status, 200, "publish failed: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reaches_subscribers_on_both_instances() {
    let sb = sandbox().await;
    let (a, b) = (sb.spawn_gateway().await, sb.spawn_gateway().await);
    let mut on_a = WsClient::connect(&a, &team_token("acme", "alice")).await;
    let mut on_b = WsClient::connect(&b, &team_token("acme", "bob")).await;
    for client in [&mut on_a, &mut on_b] {
        let reply = client.subscribe("team:42").await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
    }

    // HTTP on gateway A, then gRPC on gateway B.
    let first = publish(&a, "acme", "team:42", json!({"n": 1})).await;
    let second = grpc_publish(
        &b,
        SERVICE_TOKEN,
        PublishRequest {
            tenant: "acme".into(),
            channel: "team:42".into(),
            data: r#"{"n":2}"#.into(),
            ..Default::default()
        },
    )
    .await
    .expect("grpc publish");
    assert_eq!((first["offset"].as_u64(), second.offset), (Some(1), 2));
    assert_eq!(first["epoch"].as_str(), Some(second.epoch.as_str()));

    for client in [&mut on_a, &mut on_b] {
        for n in 1..=2 {
            let p = client.next_pub().await;
            assert_eq!(
                (p["channel"].as_str(), p["offset"].as_u64(), p["data"]["n"].as_u64()),
                (Some("team:42"), Some(n), Some(n))
            );
            assert_eq!(p["epoch"].as_str(), Some(second.epoch.as_str()));
        }
    }
    assert_eventually!(5, async { a.metric("herald_gateway_deliveries_total").await >= 2.0 }, "deliveries not counted");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_reach_each_others_channels() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    let mut acme = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    let mut globex = WsClient::connect(&gw, &team_token("globex", "mallory")).await;
    assert_eq!(acme.subscribe("team:1").await["type"], "subscribed");
    // The same channel name in tenant B's token is tenant B's channel.
    assert_eq!(globex.subscribe("team:1").await["type"], "subscribed");

    let a1 = publish(&gw, "acme", "team:1", json!({"secret": "acme"})).await;
    publish(&gw, "globex", "team:1", json!({"secret": "globex"})).await;
    assert_eq!(acme.next_pub().await["data"]["secret"], "acme");
    let p = globex.next_pub().await;
    assert_eq!(p["data"]["secret"], "globex", "globex got: {p}");
    assert_eq!(p["offset"], 1, "globex's channel has its own offsets");

    // Recovering with tenant A's position reads tenant B's history only.
    let mut globex2 = WsClient::connect(&gw, &team_token("globex", "mallory")).await;
    let reply = globex2.subscribe_recover("team:1", 0, a1["epoch"].as_str().unwrap()).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    let reply = globex2.request(json!({"type": "unsubscribe", "channel": "team:1"})).await;
    assert_eq!(reply["type"], "unsubscribed");
    // Names that would escape the tenant are not channel names.
    for bad in ["{acme}:team:1", "team:1}", "t:{acme}:ch:team:1", "team:*"] {
        let reply = globex2.subscribe(bad).await;
        assert_eq!((reply["type"].as_str(), reply["code"].as_u64()), (Some("error"), Some(400)), "{bad}: {reply}");
    }
    // A token limited to team:1 cannot subscribe to team:2.
    let mut narrow = WsClient::connect(&gw, &mint("hs1", "acme", "n", json!(["team:1"]), 600)).await;
    let reply = narrow.subscribe("team:2").await;
    assert_eq!((reply["type"].as_str(), reply["code"].as_u64()), (Some("error"), Some(403)), "{reply}");
    assert_eq!(narrow.subscribe("repo:1").await["code"], 404, "unknown namespace");

    // A service token scoped to acme cannot publish to globex.
    let body = json!({"tenant": "globex", "channel": "team:1", "data": {"x": 1}});
    assert_eq!(http_publish(&gw, Some(ACME_SERVICE_TOKEN), &body).await.0, 403);
    let grpc = grpc_publish(
        &gw,
        ACME_SERVICE_TOKEN,
        PublishRequest { tenant: "globex".into(), channel: "team:1".into(), data: "1".into(), ..Default::default() },
    )
    .await;
    assert_eq!(grpc.unwrap_err().code(), tonic::Code::PermissionDenied);
    // And its keys carry the tenant as a hash tag.
    let mut keys: Vec<String> = Vec::new();
    {
        use fred::prelude::*;
        let pattern = format!("{}:*:ch:team:1:hist", sb.keys.prefix());
        let mut cursor = "0".to_string();
        loop {
            let (next, page): (String, Vec<String>) =
                sb.redis.next().scan_page(cursor.as_str(), pattern.as_str(), Some(1000), None).await.unwrap();
            keys.extend(page);
            if next == "0" {
                break;
            }
            cursor = next;
        }
    }
    keys.sort();
    assert_eq!(
        keys,
        [
            format!("{}:t:{{acme}}:ch:team:1:hist", sb.keys.prefix()),
            format!("{}:t:{{globex}}:ch:team:1:hist", sb.keys.prefix())
        ]
    );
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_their_codes() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    let channels = json!(["team:*"]);
    // alg "none", no signature.
    let unsigned = "eyJhbGciOiJub25lIiwia2lkIjoiaHMxIn0.eyJ0ZW5hbnQiOiJhY21lIiwic3ViIjoidSIsImV4cCI6OTk5OTk5OTk5OX0.";
    let cases = [
        ("expired", mint("hs1", "acme", "u", channels.clone(), -120), 4502),
        ("unsigned", unsigned.to_string(), 4501),
        ("wrong key", mint("wrong", "acme", "u", channels.clone(), 600), 4501),
        ("unknown kid", mint("nope", "acme", "u", channels.clone(), 600), 4501),
        ("garbage", "not-a-jwt".to_string(), 4501),
        ("bad tenant", mint("hs1", "a:b", "u", channels.clone(), 600), 4503),
    ];
    for (what, token, code) in cases {
        let mut client = WsClient::open(&gw).await;
        client.send(json!({"type": "connect", "token": token})).await;
        let (closed, disconnect) = client.closed().await;
        assert_eq!(closed.code, code, "{what}: {closed:?}");
        let disconnect = disconnect.unwrap_or_else(|| panic!("{what}: no disconnect frame"));
        assert_eq!(disconnect["reconnect"], false, "{what}");
    }
    // Key rotation: both HS256 keys and the RS256 key are accepted.
    for kid in ["hs1", "hs2", "rs1"] {
        let mut client = WsClient::connect(&gw, &mint(kid, "acme", "u", channels.clone(), 600)).await;
        assert_eq!(client.subscribe("team:1").await["type"], "subscribed", "{kid}");
    }
    // A malformed frame after connecting closes with the bad-request code.
    let mut client = WsClient::connect(&gw, &team_token("acme", "u")).await;
    client.send_raw(tokio_tungstenite::tungstenite::Message::text("{not json")).await;
    assert_eq!(client.closed().await.0.code, 4500);
    // An oversize frame closes with the too-big code.
    let mut client = WsClient::connect(&gw, &team_token("acme", "u")).await;
    let huge = json!({"type": "ping", "pad": "x".repeat(200_000)});
    client.send(huge).await;
    assert_eq!(client.closed().await.0.code, 4504);
    assert_eventually!(5, async { gw.metric("herald_gateway_closes_total").await >= 8.0 }, "closes not counted");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_its_offset_receives_exactly_the_missed_messages() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    let token = team_token("acme", "alice");
    let mut client = WsClient::connect(&gw, &token).await;
    client.subscribe("team:7").await;
    for n in 1..=2 {
        publish(&gw, "acme", "team:7", json!({"n": n})).await;
    }
    let mut last = json!(null);
    for _ in 1..=2 {
        last = client.next_pub().await;
    }
    let (offset, epoch) = (last["offset"].as_u64().unwrap(), last["epoch"].as_str().unwrap().to_string());
    assert_eq!(offset, 2);
    client.close().await;

    for n in 3..=5 {
        publish(&gw, "acme", "team:7", json!({"n": n})).await;
    }
    let mut client = WsClient::connect(&gw, &token).await;
    let reply = client.subscribe_recover("team:7", offset, &epoch).await;
    // `offset` is where the replay starts (safe to store), `head` its end.
    assert_eq!(
        (reply["recovered"].as_bool(), reply["missed"].as_u64(), reply["offset"].as_u64(), reply["head"].as_u64()),
        (Some(true), Some(3), Some(2), Some(5)),
        "{reply}"
    );
    for n in 3..=5 {
        let p = client.next_pub().await;
        assert_eq!((p["offset"].as_u64(), p["data"]["n"].as_u64()), (Some(n), Some(n)));
    }
    // Live delivery continues right after, without a duplicate.
    publish(&gw, "acme", "team:7", json!({"n": 6})).await;
    assert_eq!(client.next_pub().await["offset"], 6);

    // A wrong epoch, or a position history no longer reaches: not recovered.
    let mut other = WsClient::connect(&gw, &token).await;
    let reply = other.subscribe_recover("team:7", 2, "00000000").await;
    assert_eq!((reply["recovered"].as_bool(), reply["missed"].as_u64()), (Some(false), Some(0)), "{reply}");
    let mut trimmed = WsClient::connect(&gw, &token).await;
    {
        use fred::prelude::*;
        let ck =
            channel::ChannelKeys::new(&sb.keys, &TenantId::new("acme").unwrap(), &Channel::parse("team:7").unwrap());
        let _: i64 = sb.redis.next().xtrim(ck.history(), ("MAXLEN", 2)).await.unwrap();
    }
    let reply = trimmed.subscribe_recover("team:7", 2, &epoch).await;
    assert_eq!(reply["recovered"], false, "history starts at 5 now: {reply}");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_on_the_live_path_is_filled_from_history() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    client.subscribe("team:9").await;
    publish(&gw, "acme", "team:9", json!({"n": 1})).await;
    assert_eq!(client.next_pub().await["offset"], 1);

    // Offset 2 goes to history but its pub/sub message is lost.
    let tenant = TenantId::new("acme").unwrap();
    let ch = Channel::parse("team:9").unwrap();
    let ck = channel::ChannelKeys::new(&sb.keys, &tenant, &ch);
    {
        use fred::prelude::*;
        let _: i64 = sb.redis.next().hincrby(ck.meta(), "offset", 1).await.unwrap();
        let _: String = sb.redis.next().xadd(ck.history(), false, None, "2-0", ("d", r#"{"n":2}"#)).await.unwrap();
    }
    let history = HistoryOptions { size: 100, ttl_s: 300 };
    channel::publish(&sb.redis, &sb.keys, &tenant, &ch, history, br#"{"n":3}"#, None).await.unwrap();
    for n in 2..=3 {
        let p = client.next_pub().await;
        assert_eq!((p["offset"].as_u64(), p["data"]["n"].as_u64()), (Some(n), Some(n)));
    }
    assert_eventually!(5, async { gw.metric("herald_gateway_gaps_total").await >= 1.0 }, "gap not counted");

    // A gap history cannot fill: the subscriber is told to resubscribe.
    {
        use fred::prelude::*;
        let _: i64 = sb.redis.next().hincrby(ck.meta(), "offset", 1).await.unwrap();
    }
    channel::publish(&sb.redis, &sb.keys, &tenant, &ch, history, br#"{"n":5}"#, None).await.unwrap();
    let frame = client.next_frame().await.unwrap();
    assert_eq!((frame["type"].as_str(), frame["resubscribe"].as_bool()), (Some("unsubscribed"), Some(true)), "{frame}");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_closed_while_a_fast_one_gets_everything() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway_with(|c| c.gateway.limits.max_queue_bytes = 128 * 1024).await;
    let mut fast = WsClient::connect(&gw, &team_token("acme", "fast")).await;
    let mut slow = WsClient::connect(&gw, &team_token("acme", "slow")).await;
    fast.subscribe("team:3").await;
    slow.subscribe("team:3").await;

    // The slow client reads nothing while 16 KB publications go out until
    // the gateway gives up on it: more than the kernel's socket buffers and
    // the 128 KB queue hold. The publisher keeps pace with the fast client
    // (at most 4 publications ahead), as a reader keeping up would.
    let tenant = TenantId::new("acme").unwrap();
    let ch = Channel::parse("team:3").unwrap();
    let history = HistoryOptions { size: 10, ttl_s: 300 };
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(16 * 1024));
    let (received_tx, mut received) = tokio::sync::watch::channel(0u64);
    // The fast client reads in order until the end marker.
    let reader = tokio::spawn(async move {
        let mut expected = 1;
        loop {
            let p = fast.next_pub().await;
            assert_eq!(p["offset"].as_u64(), Some(expected), "fast client missed or reordered");
            if p["data"]["end"] == json!(true) {
                return expected;
            }
            received_tx.send_replace(expected);
            expected += 1;
        }
    });
    let mut sent = 0u64;
    let mut slow_seen_at = None;
    while sent < 4000 {
        received.wait_for(|n| n + 4 >= sent).await.expect("fast reader alive");
        channel::publish(&sb.redis, &sb.keys, &tenant, &ch, history, payload.as_bytes(), None).await.unwrap();
        sent += 1;
        if slow_seen_at.is_none()
            && sent.is_multiple_of(25)
            && gw.metric("herald_gateway_slow_closes_total").await >= 1.0
        {
            slow_seen_at = Some(sent);
        }
        // Twenty more after the slow close: the fast one is unaffected.
        if slow_seen_at.is_some_and(|at| sent >= at + 20) {
            break;
        }
    }
    assert!(slow_seen_at.is_some(), "the slow client was never closed ({sent} publications)");
    channel::publish(&sb.redis, &sb.keys, &tenant, &ch, history, br#"{"end":true}"#, None).await.unwrap();
    assert_eq!(reader.await.expect("fast client got everything in order"), sent + 1);
    let (closed, disconnect) = slow.closed().await;
    assert_eq!(closed.code, 4001, "{closed:?}");
    assert_eq!(disconnect.map(|d| d["reconnect"].clone()), Some(json!(true)));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_update_reaches_a_websocket_client_end_to_end() {
    let sb = sandbox().await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let gw = sb.spawn_gateway().await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    let mut other_team = WsClient::connect(&gw, &team_token("acme", "bob")).await;
    client.subscribe("team:42").await;
    other_team.subscribe("team:43").await;

    sb.sql("INSERT INTO res_users (id, tenant_id, team_id, name) VALUES (7, 'acme', 42, 'Alice')").await;
    sb.sql("UPDATE res_users SET name = 'Alicia' WHERE id = 7").await;
    let insert = client.next_pub().await;
    assert_eq!(insert["data"], json!({"type": "change", "table": "res_users", "op": "insert", "ids": ["7"]}));
    let update = client.next_pub().await;
    assert_eq!(update["data"], json!({"type": "change", "table": "res_users", "op": "update", "ids": ["7"]}));
    assert_eq!(update["offset"], 2);

    // Moving the row to team 43 tells both teams.
    sb.sql("UPDATE res_users SET team_id = 43 WHERE id = 7").await;
    assert_eq!(client.next_pub().await["data"]["op"], "update");
    let moved = other_team.next_pub().await;
    assert_eq!((moved["channel"].as_str(), moved["data"]["ids"][0].as_str()), (Some("team:43"), Some("7")));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_api_rejects_bad_input_and_honours_idempotency_keys() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway_with(|c| c.gateway.limits.max_publication_bytes = 1024).await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    client.subscribe("team:5").await;
    let ok = json!({"tenant": "acme", "channel": "team:5", "data": {"n": 1}, "idempotency_key": "order-17"});
    let cases = [
        (None, ok.clone(), 401),
        (Some("not-a-service-token-at-all"), ok.clone(), 401),
        (Some(SERVICE_TOKEN), json!({"tenant": "a:b", "channel": "team:5", "data": 1}), 400),
        (Some(SERVICE_TOKEN), json!({"tenant": "acme", "channel": "team 5", "data": 1}), 400),
        (Some(SERVICE_TOKEN), json!({"tenant": "acme", "channel": "repo:5", "data": 1}), 404),
        (Some(SERVICE_TOKEN), json!({"tenant": "acme", "channel": "team:5", "data": "x".repeat(2000)}), 413),
        (Some(SERVICE_TOKEN), json!({"tenant": "acme", "channel": "team:5", "data": 1, "idempotency_key": "a b"}), 400),
        (Some(SERVICE_TOKEN), json!({"tenant": "acme", "channel": "team:5"}), 400),
    ];
    for (token, body, status) in cases {
        let (got, reply) = http_publish(&gw, token, &body).await;
        assert_eq!(got, status, "{body}: {reply}");
        assert!(reply["error"].is_string(), "errors say why: {reply}");
    }
    let (status, first) = http_publish(&gw, Some(SERVICE_TOKEN), &ok).await;
    assert_eq!((status, first["duplicate"].as_bool()), (200, Some(false)));
    let (status, again) = http_publish(&gw, Some(SERVICE_TOKEN), &ok).await;
    assert_eq!((status, again["duplicate"].as_bool(), &again["offset"]), (200, Some(true), &first["offset"]));
    publish(&gw, "acme", "team:5", json!({"n": 2})).await;
    // Nothing bad was published, and the retry not twice.
    assert_eq!(client.next_pub().await["data"]["n"], 1);
    assert_eq!(client.next_pub().await["data"]["n"], 2);
    let grpc = grpc_publish(
        &gw,
        SERVICE_TOKEN,
        PublishRequest {
            tenant: "acme".into(),
            channel: "team:5".into(),
            data: "{not json".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(grpc.unwrap_err().code(), tonic::Code::InvalidArgument);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_who_is_subscribed_across_instances() {
    let sb = sandbox().await;
    let (a, b) = (sb.spawn_gateway().await, sb.spawn_gateway().await);
    let mut alice = WsClient::connect(&a, &team_token("acme", "alice")).await;
    let mut bob = WsClient::connect(&b, &team_token("acme", "bob")).await;
    alice.subscribe("team:8").await;
    bob.subscribe("team:8").await;
    let users = |reply: &serde_json::Value| {
        let mut users: Vec<String> =
            reply["clients"].as_array().unwrap().iter().map(|c| c["user"].as_str().unwrap().to_string()).collect();
        users.sort();
        users
    };
    let reply = alice.request(json!({"type": "presence", "channel": "team:8"})).await;
    assert_eq!(users(&reply), ["alice", "bob"], "{reply}");
    bob.close().await;
    let mut alice = alice;
    assert_eventually!(
        10,
        async { users(&alice.request(json!({"type": "presence", "channel": "team:8"})).await) == ["alice"] },
        "bob still present after leaving"
    );
    let reply = alice.request(json!({"type": "presence", "channel": "alerts:1"})).await;
    assert_eq!(reply["code"], 404, "presence is off for alerts: {reply}");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_sockets_to_reconnect_with_jitter() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    client.subscribe("team:1").await;
    let ops = gw.ops;
    let stop = tokio::spawn(gw.stop());
    let (closed, disconnect) = client.closed().await;
    assert_eq!(closed.code, 4000, "{closed:?}");
    let disconnect = disconnect.expect("disconnect frame");
    assert_eq!(disconnect["reconnect"], true);
    let after = disconnect["reconnect_after_ms"].as_u64().expect("advice");
    assert!(after < 2000, "jitter within gateway.reconnect_jitter_ms: {after}");
    stop.await.unwrap().expect("clean shutdown");
    assert_eq!(herald_tests::http_get(ops, "/healthz").await, "", "ops server stopped");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_limits_refuse_connections_and_commands() {
    let sb = sandbox().await;
    let gw = sb
        .spawn_gateway_with(|c| {
            c.gateway.limits.max_connections = 1;
            c.gateway.limits.connection_commands_per_s = 2;
            c.gateway.limits.max_subscriptions_per_connection = 1;
        })
        .await;
    let mut first = WsClient::connect(&gw, &team_token("acme", "a")).await;
    let refused = tokio_tungstenite::connect_async(gw.ws_url()).await;
    let status = match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        other => panic!("second socket was not refused: {:?}", other.map(|_| ())),
    };
    assert_eq!(status, 503);
    // A burst of commands over the connection's bucket (burst 2 × 2 + 1)
    // closes it.
    for _ in 0..10 {
        first.send(json!({"type": "ping"})).await;
    }
    assert_eq!(first.closed().await.0.code, 4003);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_after_the_ping_timeout() {
    let sb = sandbox().await;
    let gw = sb
        .spawn_gateway_with(|c| {
            c.gateway.limits.ping_interval_ms = 100;
            c.gateway.limits.ping_timeout_ms = 300;
        })
        .await;
    let mut silent = WsClient::connect(&gw, &team_token("acme", "silent")).await;
    // Not reading means not answering pings.
    assert_eventually!(
        10,
        async { gw.metric("herald_gateway_closes_total{code=\"4002\"}").await >= 1.0 },
        "silent socket not closed"
    );
    // The client library answers the queued pings as it reads them, into a
    // socket the server has closed: it may see a broken pipe before the
    // close frame. Either way the socket is gone.
    let (closed, _) = silent.closed().await;
    assert!([4002, 1006].contains(&closed.code), "{closed:?}");
    assert_eventually!(5, async { gw.metric("herald_gateway_sockets").await == 0.0 }, "socket still counted");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_rate_limited_per_node() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway_with(|c| c.gateway.limits.connections_per_s = 1).await;
    let _first = WsClient::connect(&gw, &team_token("acme", "a")).await;
    // The bucket holds one connection per second: of a few more attempts in
    // a row, some are refused with 429 (however slow this machine is).
    let mut statuses = Vec::new();
    for _ in 0..5 {
        match tokio_tungstenite::connect_async(gw.ws_url()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => statuses.push(response.status().as_u16()),
            Ok(_) => statuses.push(101),
            Err(other) => panic!("unexpected: {other}"),
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(gw.metric("herald_gateway_refused_connections_total").await >= 1.0);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_event_publishes_its_team_change_once() {
    use herald_proto::Message as _;
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    let mut client = WsClient::connect(&gw, &team_token("acme", "alice")).await;
    client.subscribe("team:77").await;
    let event = herald_proto::v1::InvalidationEvent {
        event_id: "db:42".into(),
        tenant: "acme".into(),
        table: "res_users".into(),
        operation: herald_proto::v1::Operation::Update as i32,
        ids: vec!["5".into()],
        tags: vec!["res_users.id=5".into(), "res_users".into()],
        teams: vec!["77".into()],
        ..Default::default()
    };
    let entry = || herald_core::stream::Entry {
        id: "1-1".into(),
        payload: Some(bytes::Bytes::from(event.encode_to_vec())),
        watermark: None,
    };
    let applier = herald_broadcast::apply::Applier::new(
        sb.redis.clone(),
        sb.keys.clone(),
        "broadcast".into(),
        herald_broadcast::metrics::Metrics::default(),
    )
    .with_team_channels(Some(HistoryOptions { size: 100, ttl_s: 300 }));
    // Applied, then applied again as after a crash before the XACK.
    applier.apply(vec![entry()]).await.unwrap();
    applier.apply(vec![entry()]).await.unwrap();
    publish(&gw, "acme", "team:77", json!({"after": true})).await;
    let first = client.next_pub().await;
    assert_eq!(first["data"], json!({"type": "change", "table": "res_users", "op": "update", "ids": ["5"]}));
    let second = client.next_pub().await;
    assert_eq!((second["offset"].as_u64(), &second["data"]), (Some(2), &json!({"after": true})), "published twice");
    sb.cleanup().await;
}

/// A channel position kept the way `docs/gateway-protocol.md` tells a
/// client to: from `subscribed`, then from every `pub`.
#[derive(Debug, Clone)]
struct Stored {
    offset: u64,
    epoch: String,
}

impl Stored {
    fn apply(&mut self, frame: &serde_json::Value) {
        let offset = frame["offset"].as_u64().expect("an offset");
        if offset != 0 {
            self.offset = offset;
            self.epoch = frame["epoch"].as_str().expect("an epoch").to_string();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropped_during_a_recovery_replay_loses_nothing() {
    let sb = sandbox().await;
    let gw = sb.spawn_gateway().await;
    let token = team_token("acme", "alice");
    let mut stored = Stored { offset: 0, epoch: String::new() };
    let mut first = WsClient::connect(&gw, &token).await;
    stored.apply(&first.subscribe("team:9").await);
    for n in 1..=2 {
        publish(&gw, "acme", "team:9", json!(n)).await;
        stored.apply(&first.next_pub().await);
    }
    first.close().await;
    for n in 3..=40 {
        publish(&gw, "acme", "team:9", json!(n)).await;
    }

    // Dropped right after the reply, before any replayed publication.
    let mut second = WsClient::connect(&gw, &token).await;
    let reply = second.subscribe_recover("team:9", stored.offset, &stored.epoch).await;
    assert_eq!((reply["recovered"].as_bool(), reply["missed"].as_u64()), (Some(true), Some(38)), "{reply}");
    assert_eq!(reply["head"], 40, "{reply}");
    stored.apply(&reply);
    drop(second);

    // Dropped in the middle of the replay.
    let mut third = WsClient::connect(&gw, &token).await;
    let reply = third.subscribe_recover("team:9", stored.offset, &stored.epoch).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    stored.apply(&reply);
    let mut received = Vec::new();
    for _ in 0..10 {
        let p = third.next_pub().await;
        received.push(p["data"].as_u64().unwrap());
        stored.apply(&p);
    }
    drop(third);

    // The last reconnect gets the rest: nothing lost, nothing twice.
    let mut last = WsClient::connect(&gw, &token).await;
    let reply = last.subscribe_recover("team:9", stored.offset, &stored.epoch).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    stored.apply(&reply);
    for _ in 0..reply["missed"].as_u64().unwrap() {
        let p = last.next_pub().await;
        received.push(p["data"].as_u64().unwrap());
        stored.apply(&p);
    }
    assert_eq!(received, (3..=40).collect::<Vec<u64>>());
    assert_eq!(stored.offset, 40);
    sb.cleanup().await;
}
