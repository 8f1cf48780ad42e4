//! The atomic operations of explicit keys (Add, Incr) that cache frameworks
//! promise: one winner among racing callers on two nodes, no lost
//! increment, every node's L1 dropping its copy, and the tenant check, over
//! gRPC and HTTP.

use bytes::Bytes;
use herald_cache_api::Options;
use herald_proto::v1::cache_client::CacheClient;
use herald_proto::v1::{AddRequest, GetRequest, IncrRequest, Layer, SetRequest, get_request};
use herald_tests::assert_eventually;
use herald_tests::cache_api::{ACME_TOKEN, GLOBEX_TOKEN, authed, sandbox};
use tonic::transport::Channel;

fn add(key: &str, value: String) -> AddRequest {
    AddRequest { tenant: "acme".into(), key: key.into(), value: value.into(), ttl_ms: 60_000, tags: vec!["t".into()] }
}

fn incr(key: &str, delta: i64) -> IncrRequest {
    IncrRequest { tenant: "acme".into(), key: key.into(), delta }
}

async fn value_of(client: &mut CacheClient<Channel>, key: &str) -> Option<(Bytes, Layer)> {
    let get =
        GetRequest { tenant: "acme".into(), target: Some(get_request::Target::Key(key.into())), min_commit_lsn: 0 };
    let r = client.get(authed(get, ACME_TOKEN)).await.expect("get").into_inner();
    r.found.then(|| (r.value.clone(), r.layer()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_stores_once_among_racing_callers_on_two_nodes() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let a = sb.spawn_cache_api(Options::default()).await;
    let b = sb.spawn_cache_api(Options::default()).await;
    let clients = [a.client().await, b.client().await];

    // A fill token taken before the Add: the Add stamps the key, so the
    // older fill cannot overwrite the added value.
    let miss =
        GetRequest { tenant: "acme".into(), target: Some(get_request::Target::Key("lock".into())), min_commit_lsn: 0 };
    let token = clients[0].clone().get(authed(miss, ACME_TOKEN)).await.unwrap().into_inner().fill_token;

    let racers =
        (0..16).map(|i| {
            let mut c = clients[i % 2].clone();
            async move {
                (i, c.add(authed(add("lock", format!("owner-{i}")), ACME_TOKEN)).await.unwrap().into_inner().stored)
            }
        });
    let results = futures::future::join_all(racers).await;
    let winners: Vec<usize> = results.iter().filter(|(_, stored)| *stored).map(|(i, _)| *i).collect();
    assert_eq!(winners.len(), 1, "racing adds stored {winners:?}");
    let expected = Bytes::from(format!("owner-{}", winners[0]));
    for client in &clients {
        assert_eq!(value_of(&mut client.clone(), "lock").await.map(|v| v.0), Some(expected.clone()));
    }
    let stale = SetRequest {
        tenant: "acme".into(),
        key: "lock".into(),
        value: Bytes::from_static(b"stale fill"),
        ttl_ms: 60_000,
        tags: vec![],
        fill_token: token,
    };
    assert!(!clients[0].clone().set(authed(stale, ACME_TOKEN)).await.unwrap().into_inner().stored);

    // Dropped by its tag on every node, after which an Add stores again.
    let mut cb = clients[1].clone();
    assert_eq!(value_of(&mut cb, "lock").await.map(|v| v.1), Some(Layer::L1));
    let tags = herald_proto::v1::InvalidateTagsRequest { tenant: "acme".into(), tags: vec!["t".into()] };
    clients[0].clone().invalidate_tags(authed(tags, ACME_TOKEN)).await.unwrap();
    assert_eventually!(5, async { value_of(&mut cb.clone(), "lock").await.is_none() }, "node b kept the added key");
    assert!(cb.add(authed(add("lock", "again".into()), ACME_TOKEN)).await.unwrap().into_inner().stored);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_loses_no_increment_and_every_node_sees_the_sum() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let a = sb.spawn_cache_api(Options::default()).await;
    let b = sb.spawn_cache_api(Options::default()).await;
    let mut ca = a.client().await;
    let cb = b.client().await;

    assert!(!ca.incr(authed(incr("hits", 1), ACME_TOKEN)).await.unwrap().into_inner().found);
    assert!(value_of(&mut ca, "hits").await.is_none(), "incr of a missing key stored something");
    assert!(ca.add(authed(add("hits", "0".into()), ACME_TOKEN)).await.unwrap().into_inner().stored);
    // Node b holds the value in L1 before the increments. The Add's own
    // invalidation may still be on its way to b and drop b's first fill,
    // so b's L1 is waited for, not expected at the second read.
    assert_eventually!(
        5,
        async { value_of(&mut cb.clone(), "hits").await.map(|v| v.1) == Some(Layer::L1) },
        "node b never held the added value in L1"
    );

    let racers = (0..40).map(|i| {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        async move { c.incr(authed(incr("hits", 1), ACME_TOKEN)).await.unwrap().into_inner() }
    });
    let mut seen: Vec<i64> = futures::future::join_all(racers).await.iter().map(|r| r.value).collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=40).collect::<Vec<i64>>(), "each increment must see its own sum");
    assert_eventually!(
        5,
        async { value_of(&mut cb.clone(), "hits").await.map(|v| v.0) == Some(Bytes::from_static(b"40")) },
        "node b kept a value from before the increments"
    );
    assert_eq!(ca.incr(authed(incr("hits", -50), ACME_TOKEN)).await.unwrap().into_inner().value, -10);

    // Bad input is refused and changes nothing.
    let mut set = SetRequest {
        tenant: "acme".into(),
        key: "name".into(),
        value: Bytes::from_static(b"alice"),
        ttl_ms: 60_000,
        tags: vec![],
        fill_token: String::new(),
    };
    ca.set(authed(set.clone(), ACME_TOKEN)).await.unwrap();
    let err = ca.incr(authed(incr("name", 1), ACME_TOKEN)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    set.key = "big".into();
    set.value = Bytes::from(i64::MAX.to_string());
    ca.set(authed(set, ACME_TOKEN)).await.unwrap();
    let err = ca.incr(authed(incr("big", 1), ACME_TOKEN)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(value_of(&mut ca, "big").await.map(|v| v.0), Some(Bytes::from(i64::MAX.to_string())));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_incr_over_http_and_only_for_the_tokens_tenant() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut client = node.client().await;

    let r = node.http("POST", "/v1/t/acme/k/n/add?ttl_ms=60000&tag=x", Some(ACME_TOKEN), b"5").await;
    assert_eq!((r.status, r.json()["stored"].as_bool()), (200, Some(true)), "{}", r.text());
    let r = node.http("POST", "/v1/t/acme/k/n/add", Some(ACME_TOKEN), b"6").await;
    assert_eq!((r.status, r.json()["stored"].as_bool()), (409, Some(false)));
    let r = node.http("POST", "/v1/t/acme/k/n/incr", Some(ACME_TOKEN), br#"{"delta":3}"#).await;
    assert_eq!((r.status, r.json()["value"].as_i64()), (200, Some(8)), "{}", r.text());
    let r = node.http("POST", "/v1/t/acme/k/none/incr", Some(ACME_TOKEN), br#"{"delta":3}"#).await;
    assert_eq!((r.status, r.json()["found"].as_bool()), (404, Some(false)));
    let r = node.http("POST", "/v1/t/acme/k/n/incr", Some(ACME_TOKEN), br#"{"delta":"x"}"#).await;
    assert_eq!(r.status, 400);
    let r = node.http("POST", "/v1/t/acme/k/n/add?fill_token=1.2", Some(ACME_TOKEN), b"6").await;
    assert_eq!(r.status, 400, "add takes no fill token");

    // Another tenant's token can neither add nor increment acme's keys.
    for (method, path, body) in
        [("POST", "/v1/t/acme/k/n/add", &b"1"[..]), ("POST", "/v1/t/acme/k/n/incr", &br#"{"delta":1}"#[..])]
    {
        let r = node.http(method, path, Some(GLOBEX_TOKEN), body).await;
        assert_eq!(r.status, 403, "{path}: {}", r.text());
    }
    let err = client.add(authed(add("n", "1".into()), GLOBEX_TOKEN)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = client.incr(authed(incr("n", 1), GLOBEX_TOKEN)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // The same key name in globex is its own key.
    let globex = IncrRequest { tenant: "globex".into(), key: "n".into(), delta: 1 };
    assert!(!client.incr(authed(globex, GLOBEX_TOKEN)).await.unwrap().into_inner().found);
    assert_eq!(value_of(&mut client, "n").await.map(|v| v.0), Some(Bytes::from_static(b"8")));
    sb.cleanup().await;
}

/// Django's contract (and any cache user's): a write is read back by the
/// next call to the same node — the node's own L1 must not answer with the
/// value from before the write while its invalidation travels through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_read_back_at_once_from_the_same_node() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let mut c = node.client().await;
    let set = |value: &'static [u8]| SetRequest {
        tenant: "acme".into(),
        key: "k".into(),
        value: Bytes::from_static(value),
        ttl_ms: 60_000,
        tags: vec!["t".into()],
        fill_token: String::new(),
    };
    for round in 0..20 {
        c.set(authed(set(b"old"), ACME_TOKEN)).await.unwrap();
        // Into the node's L1 (once the previous round's invalidations, which
        // travel through Redis, have all come back).
        assert_eventually!(
            5,
            async { value_of(&mut c.clone(), "k").await.map(|v| v.1) == Some(Layer::L1) },
            "round {round}: never served from L1"
        );
        c.set(authed(set(b"new"), ACME_TOKEN)).await.unwrap();
        assert_eq!(value_of(&mut c, "k").await.map(|v| v.0), Some(Bytes::from_static(b"new")), "round {round}: set");
        let delete = herald_proto::v1::DeleteRequest {
            tenant: "acme".into(),
            target: Some(herald_proto::v1::delete_request::Target::Key("k".into())),
        };
        c.delete(authed(delete, ACME_TOKEN)).await.unwrap();
        assert_eq!(value_of(&mut c, "k").await, None, "round {round}: delete");
        c.add(authed(add("k", "1".into()), ACME_TOKEN)).await.unwrap();
        value_of(&mut c, "k").await;
        c.incr(authed(incr("k", 1), ACME_TOKEN)).await.unwrap();
        assert_eq!(value_of(&mut c, "k").await.map(|v| v.0), Some(Bytes::from_static(b"2")), "round {round}: incr");
        let tags = herald_proto::v1::InvalidateTagsRequest { tenant: "acme".into(), tags: vec!["t".into()] };
        c.invalidate_tags(authed(tags, ACME_TOKEN)).await.unwrap();
        assert_eq!(value_of(&mut c, "k").await, None, "round {round}: invalidate_tags");
    }
    sb.cleanup().await;
}
