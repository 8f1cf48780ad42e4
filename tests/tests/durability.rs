//! Durability of the log: with `capture.wait_replicas`, capture deletes
//! outbox rows only after a Redis replica has the events it appended. Runs a
//! real primary and replica (`redis-server` on free ports).

use std::process::Stdio;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use herald_tests::{Sandbox, assert_eventually, free_port, metric};
use tokio::process::{Child, Command};

/// A throwaway `redis-server` without persistence, replicating `primary`
/// when given; killed when dropped (also when stopped).
fn redis_server(port: u16, primary: Option<u16>) -> Child {
    let port = port.to_string();
    // Diskless replication, in the temporary directory: a full resync writes
    // no dump.rdb into the working tree.
    let dir = std::env::temp_dir().display().to_string();
    let mut args = vec!["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    args.extend(["--dir", &dir, "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]);
    let primary = primary.map(|p| p.to_string());
    if let Some(primary) = &primary {
        args.extend(["--replicaof", "127.0.0.1", primary]);
    }
    Command::new("redis-server").args(args).stdout(Stdio::null()).kill_on_drop(true).spawn().expect("redis-server")
}

async fn info_replication(url: &str) -> String {
    let Ok(config) = Config::from_url(url) else { return String::new() };
    let client = Builder::from_config(config).build().expect("client");
    if client.init().await.is_err() {
        return String::new();
    }
    let info = CustomCommand::new_static("INFO", ClusterHash::Random, false);
    let info: String = client.custom(info, vec!["replication"]).await.unwrap_or_default();
    let _ = client.quit().await;
    info
}

fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill").args([signal, &pid]).status().expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_stay_in_the_outbox_until_a_replica_has_their_events() {
    let (primary_port, replica_port) = (free_port(), free_port());
    let _primary = redis_server(primary_port, None);
    let replica = redis_server(replica_port, Some(primary_port));
    let (primary_url, replica_url) =
        (format!("redis://127.0.0.1:{primary_port}"), format!("redis://127.0.0.1:{replica_port}"));
    assert_eventually!(
        20,
        async { info_replication(&replica_url).await.contains("master_link_status:up") },
        "the replica never synced"
    );

    let sb = Sandbox::start_with(|c| {
        c.redis.url = primary_url.clone();
        c.capture.wait_replicas = 1;
        c.capture.wait_timeout_ms = 200;
    })
    .await;
    let capture = sb.spawn_capture().await;

    // (a) With the replica up, writes flow: the replica has the event and
    // the outbox is emptied.
    sb.sql("INSERT INTO res_users (tenant_id, name) VALUES ('acme', 'a')").await;
    assert_eventually!(10, async { sb.scalar_i64("SELECT count(*) FROM herald.outbox").await == 0 }, "not drained");
    let replica_client = Builder::from_config(Config::from_url(&replica_url).unwrap()).build().unwrap();
    replica_client.init().await.unwrap();
    let entries: fred::types::Value = replica_client.xrange(sb.keys.stream(), "-", "+", None).await.unwrap();
    let replica_events =
        herald_core::stream::range_entries(entries).into_iter().filter(|e| e.payload.is_some()).count();
    assert!(replica_events >= 1, "the replica lacks the event capture deleted the row of");
    // A WAIT may time out on a loaded machine even with the replica up (the
    // append is then retried): count from here.
    let unreplicated_before = metric(capture.ops_addr, "herald_capture_unreplicated_total", "").await;

    // (b) With the replica stopped, the primary alone acknowledges the
    // appends: the row must stay in the outbox, however often it is tried.
    signal(&replica, "-STOP");
    sb.sql("INSERT INTO res_users (tenant_id, name) VALUES ('acme', 'b')").await;
    assert_eventually!(
        10,
        async { metric(capture.ops_addr, "herald_capture_unreplicated_total", "").await >= unreplicated_before + 2.0 },
        "capture never found its appends unreplicated"
    );
    assert_eq!(sb.scalar_i64("SELECT count(*) FROM herald.outbox").await, 1, "a row was deleted unreplicated");

    // The replica is back: the row is appended again, acknowledged and deleted.
    signal(&replica, "-CONT");
    assert_eventually!(
        20,
        async { sb.scalar_i64("SELECT count(*) FROM herald.outbox").await == 0 },
        "the row was never drained after the replica came back"
    );
    let events: Vec<_> = sb.stream_events().await.into_iter().filter(|e| e.table == "res_users").collect();
    assert!(events.len() >= 2, "{events:?}");
    let _ = replica_client.quit().await;
    capture.stop().await.unwrap();
    sb.cleanup().await;
}
