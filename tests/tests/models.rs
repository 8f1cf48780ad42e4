//! Cache models (issue 16, seed 002). Write-through commands: a write
//! returns after its commit and after every live cache node applied the
//! changes up to it, so a read on any node right after sees it without a
//! token; commands are tenant-checked like reads and their parameters
//! checked before anything runs. Write-behind commands: durable in Redis
//! and visible as a pending overlay at once, applied by a writer exactly
//! once in per-key order, through a writer kill, Postgres down and poison
//! commands.

use std::collections::BTreeMap;

use fred::prelude::*;
use herald_cache_api::{Options, progress};
use herald_core::config::{CommandConfig, Config, OverlayConfig, WriteModel};
use herald_core::keys::TenantId;
use herald_proto::v1::{GetResponse, WriteRequest, WriteResponse};
use herald_tests::cache_api::{ACME_TOKEN, BACKEND_TOKEN, CacheNode, GLOBEX_TOKEN, authed, sandbox_with};
use herald_tests::process::ChildService;
use herald_tests::{Sandbox, Source, assert_eventually, free_port, logical};

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

/// The write-through commands, plus two write-behind ones over `user_by_id`:
/// `rename_later(id, name)` and `bump(id, seq)` (counts in `n`, keeps the
/// last seq and every seq in order; `last` must not be negative).
fn behind_commands(c: &mut Config) {
    commands(c, 20_000);
    let overlay = |set: &[(&str, &str)]| OverlayConfig {
        resource: "user_by_id".into(),
        params: BTreeMap::from([("id".to_string(), "$1".to_string())]),
        set: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    c.cache.commands.extend([
        CommandConfig {
            name: "rename_later".into(),
            sql: "UPDATE res_users SET name = $2 WHERE tenant_id = $tenant AND id = $1".into(),
            params: vec!["id".into(), "name".into()],
            tags: vec!["res_users.id=$1".into()],
            model: WriteModel::WriteBehind,
            overlay: Some(overlay(&[("name", "$2")])),
        },
        CommandConfig {
            name: "bump".into(),
            sql: "UPDATE res_users SET n = n + 1, last = $2, seqs = seqs || $2::bigint \
                  WHERE tenant_id = $tenant AND id = $1"
                .into(),
            params: vec!["id".into(), "seq".into()],
            tags: vec!["res_users.id=$1".into()],
            model: WriteModel::WriteBehind,
            overlay: Some(overlay(&[("last", "$2")])),
        },
    ]);
}

/// The columns `bump` writes, and users 1..=`users` of acme.
async fn behind_rows(sb: &Sandbox, users: i64) {
    sb.sql(
        "ALTER TABLE res_users ADD COLUMN n int NOT NULL DEFAULT 0, \
         ADD COLUMN last bigint NOT NULL DEFAULT 0 CHECK (last >= 0), \
         ADD COLUMN seqs bigint[] NOT NULL DEFAULT '{}'",
    )
    .await;
    sb.sql(&format!(
        "INSERT INTO res_users (id, tenant_id, website_slug, name) \
         SELECT i, 'acme', 'u' || i, 'A' || i FROM generate_series(1, {users}) i"
    ))
    .await;
}

/// A node that serves but does not apply write-behind commands.
async fn node_without_writer(sb: &Sandbox) -> CacheNode {
    let mut config = sb.config.clone();
    config.cache.write_behind_writer = false;
    let node = sb.start_cache_api(config, Options::default()).await;
    assert_eventually!(10, async { node.readyz().await.contains("redis: ok") }, "cache-api never saw redis");
    node
}

/// A cache-api process (the writer), on free ports.
fn writer_process(sb: &Sandbox) -> ChildService {
    let mut config = sb.config.clone();
    for addr in [&mut config.cache.grpc_addr, &mut config.cache.http_addr, &mut config.cache.ops_addr] {
        *addr = format!("127.0.0.1:{}", free_port());
    }
    ChildService::spawn("herald-cache-api", &config)
}

fn json(answer: &GetResponse) -> serde_json::Value {
    serde_json::from_slice(&answer.value).unwrap()
}

async fn stream_len(sb: &Sandbox, tenant: &str) -> u64 {
    sb.redis.next().xlen(sb.keys.commands(&TenantId::new(tenant).unwrap())).await.unwrap()
}

async fn applied(sb: &Sandbox) -> i64 {
    sb.scalar_i64("SELECT count(*) FROM herald.applied_commands").await
}

#[tokio::test]
async fn a_write_behind_write_is_read_at_once_as_pending_then_from_postgres() {
    let sb = sandbox_with(behind_commands).await;
    behind_rows(&sb, 1).await;
    let _broadcast = sb.spawn_broadcast().await;
    let _capture = sb.spawn_capture().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    wait_for_watermarks(&sb, 1).await;
    assert_eq!(name(&node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap()), "A1");

    // The test holds the row: the writer cannot apply the command yet.
    let (holder, connection) = tokio_postgres::connect(&sb.config.postgres.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    holder.batch_execute("BEGIN; SELECT * FROM res_users WHERE id = 1 FOR UPDATE").await.unwrap();
    let written = write_command(&node, ACME_TOKEN, "acme", "rename_later", &["1", "B"]).await.unwrap();
    assert!(written.pending && written.command_id.len() == 32, "{written:?}");
    assert_eq!((written.rows_affected, written.commit_lsn), (0, 0));

    let read = node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap();
    assert_eq!((name(&read).as_str(), read.pending, read.found), ("B", true, true), "{read:?}");
    assert_eq!(json(&read)["website_slug"], "u1", "the rest of the row is the base row's");
    assert!(read.tags.is_empty(), "a pending answer is never given to a near cache: {read:?}");
    let response = node.http("GET", "/v1/t/acme/r/user_by_id?id=1", Some(ACME_TOKEN), b"").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!((&response.json()["value"]["name"], &response.json()["pending"]), (&"B".into(), &true.into()));
    // Only the overlaid resource sees it; Postgres does not have it yet.
    assert_eq!(name(&node.get(ACME_TOKEN, "acme", "user_by_slug", &["u1"]).await.unwrap()), "A1");
    assert_eq!(db_name(&sb, 1).await, "A1");
    assert_eq!(stream_len(&sb, "acme").await, 1);

    holder.batch_execute("COMMIT").await.unwrap();
    assert_eventually!(20, async { db_name(&sb, 1).await == "B" }, "the command was never applied");
    // Once capture's event for the commit reached the node, the answer is
    // Postgres's own, no longer pending, and the patch is retired.
    assert_eventually!(
        20,
        async {
            let read = node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap();
            !read.pending && name(&read) == "B"
        },
        "the answer stayed pending"
    );
    let overlay = sb.keys.overlay(&TenantId::new("acme").unwrap(), "user_by_id", "1").unwrap();
    assert_eventually!(
        20,
        async { sb.redis.next().exists::<i64, _>(&overlay).await.unwrap() == 0 },
        "the patch was never retired"
    );
    assert_eq!(stream_len(&sb, "acme").await, 0);
    assert_eq!(applied(&sb).await, 1);
    assert_eq!(node.metric("herald_cache_write_behind_applied_total", "outcome=\"applied\"").await, 1.0);
    assert_eq!(node.metric("herald_cache_write_commands_total", "outcome=\"enqueued\"").await, 1.0);
    sb.cleanup().await;
}

#[tokio::test]
async fn a_writer_killed_mid_stream_applies_every_command_once_in_order() {
    const KEYS: i64 = 3;
    const COMMANDS: i64 = 600;
    let sb = sandbox_with(behind_commands).await;
    behind_rows(&sb, KEYS).await;
    let node = node_without_writer(&sb).await;
    let mut client = node.client().await;
    for seq in 1..=COMMANDS {
        let id = (seq % KEYS + 1).to_string();
        let request = WriteRequest { tenant: "acme".into(), command: "bump".into(), params: vec![id, seq.to_string()] };
        assert!(client.write(authed(request, ACME_TOKEN)).await.unwrap().into_inner().pending);
    }
    assert_eq!(stream_len(&sb, "acme").await, COMMANDS as u64);

    let writer = writer_process(&sb);
    assert_eventually!(60, async { applied(&sb).await >= 20 }, "the writer process never applied a command");
    writer.kill().await;
    let at_kill = applied(&sb).await;
    tracing::info!(at_kill, "writer killed");
    // Until applied (and, without capture here, past it too), every key reads
    // with its last command's value.
    for key in 1..=KEYS {
        let read = node.get(ACME_TOKEN, "acme", "user_by_id", &[&key.to_string()]).await.unwrap();
        let last_seq = (1..=COMMANDS).filter(|s| s % KEYS + 1 == key).max().unwrap();
        assert!(read.pending, "{read:?}");
        assert_eq!(json(&read)["last"], last_seq, "key {key}");
    }

    let _writer = writer_process(&sb);
    assert_eventually!(120, async { stream_len(&sb, "acme").await == 0 }, "the stream was never drained");
    assert_eq!(applied(&sb).await, COMMANDS);
    let client = sb.pool.get().await.unwrap();
    for row in client.query("SELECT id, n, last, seqs FROM res_users ORDER BY id", &[]).await.unwrap() {
        let (id, n, last, seqs): (i64, i32, i64, Vec<i64>) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let expected: Vec<i64> = (1..=COMMANDS).filter(|s| s % KEYS + 1 == id).collect();
        assert_eq!(n as usize, expected.len(), "key {id}: every command exactly once (killed at {at_kill})");
        assert_eq!(seqs, expected, "key {id}: in order");
        assert_eq!(last, *expected.last().unwrap());
    }
    sb.cleanup().await;
}

#[tokio::test]
async fn commands_wait_while_postgres_is_down_and_apply_when_it_returns() {
    let cluster = logical::cluster();
    let sb = Sandbox::start_source(Source::Wal, |c| {
        herald_tests::cache_api::configure(c);
        behind_commands(c);
    })
    .await;
    sb.sql("CREATE SEQUENCE herald_reads").await;
    behind_rows(&sb, 1).await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;

    cluster.stop();
    for seq in 1..=5 {
        let written = write_command(&node, ACME_TOKEN, "acme", "bump", &["1", &seq.to_string()]).await.unwrap();
        assert!(written.pending, "an enqueue needs only Redis: {written:?}");
    }
    assert_eventually!(
        20,
        async { node.metric("herald_cache_write_behind_retries_total", "").await >= 2.0 },
        "the writer never retried"
    );
    assert_eq!(stream_len(&sb, "acme").await, 5, "the commands wait in the stream");

    cluster.start_again();
    assert_eventually!(60, async { stream_len(&sb, "acme").await == 0 }, "the commands never applied");
    let client = sb.pool.get().await.unwrap();
    let row = client.query_one("SELECT n, seqs FROM res_users WHERE id = 1", &[]).await.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, Vec<i64>>(1)), (5, vec![1, 2, 3, 4, 5]));
    sb.cleanup().await;
}

#[tokio::test]
async fn a_poison_command_goes_aside_with_its_reason_and_the_rest_apply() {
    let sb = sandbox_with(behind_commands).await;
    behind_rows(&sb, 1).await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    for seq in ["1", "-1", "2"] {
        write_command(&node, ACME_TOKEN, "acme", "bump", &["1", seq]).await.unwrap();
    }
    assert_eventually!(20, async { stream_len(&sb, "acme").await == 0 }, "the stream was never drained");
    let row = sb.pool.get().await.unwrap().query_one("SELECT n, seqs FROM res_users WHERE id = 1", &[]).await;
    let row = row.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, Vec<i64>>(1)), (2, vec![1, 2]));
    assert_eq!(applied(&sb).await, 2, "the poison command's id is not recorded");

    let dead: Value =
        sb.redis.next().xrange(sb.keys.dead_commands(&TenantId::new("acme").unwrap()), "-", "+", None).await.unwrap();
    let text = format!("{dead:?}");
    assert!(text.contains("bump") && text.contains("-1") && text.contains("check constraint"), "{text}");
    assert_eq!(node.metric("herald_cache_write_behind_poisoned_total", "command=\"bump\"").await, 1.0);
    // Its patch is gone: the overlay shows the last applied command.
    let read = node.get(ACME_TOKEN, "acme", "user_by_id", &["1"]).await.unwrap();
    assert_eq!(json(&read)["last"], 2, "{read:?}");
    sb.cleanup().await;
}

#[tokio::test]
async fn write_behind_commands_and_overlays_stay_in_their_tenant() {
    let sb = sandbox_with(behind_commands).await;
    behind_rows(&sb, 1).await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (2, 'globex', 'gina', 'G')").await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = node_without_writer(&sb).await;

    let err = write_command(&node, ACME_TOKEN, "globex", "rename_later", &["2", "stolen"]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let response = node.http("POST", "/v1/t/globex/w/rename_later", Some(ACME_TOKEN), br#"{"params": [2, "x"]}"#).await;
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(stream_len(&sb, "globex").await, 0);

    // acme's command on globex's row id: its overlay is acme's alone.
    let response = node
        .http("POST", "/v1/t/acme/w/rename_later", Some(ACME_TOKEN), br#"{"params": {"id": 2, "name": "x"}}"#)
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["pending"], true);
    assert_eq!(response.json()["command_id"].as_str().unwrap().len(), 32);
    let theirs = node.get(GLOBEX_TOKEN, "globex", "user_by_id", &["2"]).await.unwrap();
    assert_eq!((name(&theirs).as_str(), theirs.pending), ("G", false), "{theirs:?}");
    let ours = node.get(ACME_TOKEN, "acme", "user_by_id", &["2"]).await.unwrap();
    assert!(ours.pending, "{ours:?}");
    assert_eq!((stream_len(&sb, "acme").await, stream_len(&sb, "globex").await), (1, 0));
    // Applied, it binds acme as $tenant: globex's row is untouched.
    let _writer = sb.spawn_cache_api(Options::default()).await;
    assert_eventually!(20, async { applied(&sb).await == 1 }, "never applied");
    assert_eq!(db_name(&sb, 2).await, "G");
    let theirs = node.get(GLOBEX_TOKEN, "globex", "user_by_id", &["2"]).await.unwrap();
    assert_eq!((name(&theirs).as_str(), theirs.pending), ("G", false), "{theirs:?}");
    sb.cleanup().await;
}
