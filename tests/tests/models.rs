//! Cache models (issue 16, seed 002): write-through commands. A write
//! returns after its commit and after every live cache node applied the
//! changes up to it, so a read on any node right after sees it without a
//! token; commands are tenant-checked like reads and their parameters
//! checked before anything runs.

use herald_cache_api::{Options, progress};
use herald_core::config::{CommandConfig, Config, WriteModel};
use herald_proto::v1::{GetResponse, WriteRequest, WriteResponse};
use herald_tests::cache_api::{ACME_TOKEN, BACKEND_TOKEN, CacheNode, GLOBEX_TOKEN, authed, sandbox_with};
use herald_tests::{Sandbox, assert_eventually};

/// `rename_user(id, name)`: renames one of the tenant's users.
fn commands(c: &mut Config, write_wait_ms: u64) {
    c.cache.commands = vec![
        CommandConfig {
            name: "rename_user".into(),
            sql: "UPDATE res_users SET name = $2 WHERE tenant_id = $tenant AND id = $1".into(),
            params: vec!["id".into(), "name".into()],
            tags: vec!["res_users.id=$1".into()],
            model: WriteModel::WriteThrough,
            overlay: None,
        },
        CommandConfig {
            name: "move_user".into(),
            sql: "UPDATE res_users SET website_slug = $2 WHERE tenant_id = $tenant AND id = $1".into(),
            params: vec!["id".into(), "slug".into()],
            tags: vec!["res_users.id=$1".into(), "res_users.website_slug=$2".into()],
            model: WriteModel::WriteThrough,
            overlay: None,
        },
    ];
    c.cache.write_wait_ms = write_wait_ms;
}

async fn write(node: &CacheNode, token: &str, tenant: &str, params: &[&str]) -> Result<WriteResponse, tonic::Status> {
    write_command(node, token, tenant, "rename_user", params).await
}

async fn write_command(
    node: &CacheNode,
    token: &str,
    tenant: &str,
    command: &str,
    params: &[&str],
) -> Result<WriteResponse, tonic::Status> {
    let request = WriteRequest {
        tenant: tenant.into(),
        command: command.into(),
        params: params.iter().map(|s| s.to_string()).collect(),
    };
    node.client().await.write(authed(request, token)).await.map(|r| r.into_inner())
}

fn name(answer: &GetResponse) -> String {
    let row: serde_json::Value = serde_json::from_slice(&answer.value).unwrap();
    row["name"].as_str().unwrap_or_default().to_string()
}

async fn db_name(sb: &Sandbox, id: i64) -> String {
    let client = sb.pool.get().await.unwrap();
    client.query_one("SELECT name FROM res_users WHERE id = $1", &[&id]).await.unwrap().get(0)
}

/// Until both nodes recorded a watermark (capture and broadcast work).
async fn wait_for_watermarks(sb: &Sandbox, nodes: usize) {
    let key = sb.keys.node_watermarks();
    assert_eventually!(
        20,
        async {
            let recorded = progress::read(&sb.redis, &key).await.unwrap_or_default();
            recorded.iter().filter(|n| n.lsn > 0).count() >= nodes
        },
        "the nodes never recorded a watermark"
    );
}

#[tokio::test]
async fn a_write_through_one_node_is_read_on_another_without_a_token() {
    // Generous: the wait is bounded, and only a broken pipeline misses it.
    let sb = sandbox_with(|c| commands(c, 20_000)).await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (1, 'acme', 'alice', 'A')").await;
    let _broadcast = sb.spawn_broadcast().await;
    let _capture = sb.spawn_capture().await;
    let a = sb.spawn_cache_api(Options::default()).await;
    let b = sb.spawn_cache_api(Options::default()).await;
    wait_for_watermarks(&sb, 2).await;
    for node in [&a, &b] {
        for (resource, param) in [("user_by_slug", "alice"), ("user_by_id", "1")] {
            assert_eq!(name(&node.get(ACME_TOKEN, "acme", resource, &[param]).await.unwrap()), "A");
        }
    }

    let written = write(&a, ACME_TOKEN, "acme", &["1", "A2"]).await.unwrap();
    assert_eq!((written.rows_affected, written.wait_reached), (1, true), "{written:?}");
    assert!(written.commit_lsn > 0);
    for (resource, param) in [("user_by_slug", "alice"), ("user_by_id", "1")] {
        assert_eq!(name(&b.get(ACME_TOKEN, "acme", resource, &[param]).await.unwrap()), "A2", "{resource} on B");
    }

    // Over HTTP, through B, read on A; parameters by name or in order.
    let response =
        b.http("POST", "/v1/t/acme/w/rename_user", Some(ACME_TOKEN), br#"{"params": {"id": 1, "name": "A3"}}"#).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!((&body["rows_affected"], &body["wait_reached"]), (&1.into(), &true.into()), "{body}");
    assert!(body["commit_lsn"].as_str().unwrap().contains('/'), "{body}");
    assert_eq!(name(&a.get(ACME_TOKEN, "acme", "user_by_slug", &["alice"]).await.unwrap()), "A3");
    let response = a.http("POST", "/v1/t/acme/w/rename_user", Some(ACME_TOKEN), br#"{"params": ["1", "A4"]}"#).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(name(&b.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap()), "A4");

    // A node that stopped is no longer waited for.
    b.stop().await.unwrap();
    let written = write(&a, ACME_TOKEN, "acme", &["1", "A5"]).await.unwrap();
    assert!(written.wait_reached, "{written:?}");
    assert_eq!(a.metric("herald_cache_write_commands_total", "outcome=\"reached\"").await, 3.0, "writes through A");
    sb.cleanup().await;
}

#[tokio::test]
async fn commands_are_tenant_checked_and_bad_parameters_refused() {
    let sb = sandbox_with(|c| commands(c, 300)).await;
    sb.sql(
        "INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES \
         (1, 'acme', 'alice', 'A'), (2, 'globex', 'gina', 'G')",
    )
    .await;
    // Without capture no watermark comes: the writes below wait 300 ms.
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;

    // A token bound to acme may not write for globex, over either transport.
    let err = write(&node, ACME_TOKEN, "globex", &["2", "stolen"]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let response = node.http("POST", "/v1/t/globex/w/rename_user", Some(ACME_TOKEN), br#"{"params": [2, "x"]}"#).await;
    assert_eq!(response.status, 403, "{}", response.text());
    let err = write(&node, GLOBEX_TOKEN, "acme", &["1", "stolen"]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(write(&node, "", "acme", &["1", "x"]).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    // Its own tenant's command cannot reach another tenant's row: Herald
    // binds $tenant.
    let written = write(&node, ACME_TOKEN, "acme", &["2", "stolen"]).await.unwrap();
    assert_eq!(written.rows_affected, 0);
    // A trusted token names the tenant it writes for.
    assert_eq!(write(&node, BACKEND_TOKEN, "globex", &["2", "G2"]).await.unwrap().rows_affected, 1);
    assert_eq!(db_name(&sb, 2).await, "G2");

    let bad_grpc = [
        (vec!["1"], "takes 2 parameter(s) (id, name), got 1"),
        (vec!["one", "x"], "bad parameter 1 (\"id\")"),
        (vec!["99999999999999999999", "x"], "bad parameter 1"),
    ];
    // A tag the cache would refuse is refused before anything commits.
    let long = "s".repeat(300);
    let err = write_command(&node, ACME_TOKEN, "acme", "move_user", &["1", &long]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("cache.max_tag_bytes"), "{}", err.message());
    let slug = sb.pool.get().await.unwrap().query_one("SELECT website_slug FROM res_users WHERE id = 1", &[]).await;
    assert_eq!(slug.unwrap().get::<_, String>(0), "alice", "a refused write committed");
    for (params, expected) in bad_grpc {
        let err = write(&node, ACME_TOKEN, "acme", &params).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(expected), "{expected}: {}", err.message());
    }
    let bad_http: [(&str, &[u8], &str); 6] = [
        ("rename_user", br#"{"params": {"id": 1}}"#, "\"name\" is missing"),
        ("rename_user", br#"{"params": {"id": 1, "name": "x", "role": "admin"}}"#, "no parameter \"role\""),
        ("rename_user", br#"{"params": {"id": 1, "name": null}}"#, "expected a string, number or boolean"),
        ("rename_user", br#"{"params": [1, "x"], "extra": 1}"#, "unknown field \"extra\""),
        ("rename_user", b"not json", "request body"),
        ("drop_tables", br#"{"params": []}"#, "unknown command \"drop_tables\""),
    ];
    for (command, body, expected) in bad_http {
        let response = node.http("POST", &format!("/v1/t/acme/w/{command}"), Some(ACME_TOKEN), body).await;
        assert_eq!(response.status, 400, "{}", response.text());
        let message = response.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(expected), "{expected}: {message}");
    }
    assert_eq!(db_name(&sb, 1).await, "A", "a refused write changed the row");
    assert_eq!(db_name(&sb, 2).await, "G2");
    sb.cleanup().await;
}

#[tokio::test]
async fn a_write_says_when_the_nodes_did_not_catch_up() {
    let sb = sandbox_with(|c| commands(c, 500)).await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (1, 'acme', 'alice', 'A')").await;
    let broadcast = sb.spawn_broadcast().await;
    let _capture = sb.spawn_capture().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    wait_for_watermarks(&sb, 1).await;
    broadcast.kill().await;

    let written = write(&node, ACME_TOKEN, "acme", &["1", "A2"]).await.unwrap();
    assert_eq!((written.rows_affected, written.wait_reached), (1, false), "{written:?}");
    assert_eq!(db_name(&sb, 1).await, "A2", "the write committed");
    // The answer's position still gives read-your-writes.
    let read = node.get_at(ACME_TOKEN, "acme", "user_by_slug", &["alice"], written.commit_lsn).await.unwrap();
    assert_eq!(name(&read), "A2");
    sb.cleanup().await;
}
