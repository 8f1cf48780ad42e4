//! The WAL source under faults, with real processes and a real logical
//! cluster (one per test process): every commit reaches the stream, once
//! confirmed never lost; rolled-back work emits nothing; old images ride
//! renames, deletes and team moves; a lost slot flushes every cache.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use herald_core::config::OldImages;
use herald_core::keys::{Scope, TagKey, TenantId};
use herald_core::l2::L2;
use herald_proto::v1::{InvalidationEvent, Operation};
use herald_tests::process::ChildService;
use herald_tests::{Sandbox, Source, assert_eventually, logical};

async fn wal_sandbox() -> Sandbox {
    Sandbox::start_source(Source::Wal, |_| {}).await
}

/// Commits `n` single-row inserts from `writers` connections, retrying a
/// statement whose connection the server dropped (a restart); counts commits.
async fn burst(sb: &Sandbox, n: u64, writers: u64, committed: Arc<AtomicU64>) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = sb.config.postgres.url.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            let mut client = None;
            while i < n {
                if client.as_ref().is_none_or(|c: &tokio_postgres::Client| c.is_closed()) {
                    client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((c, connection)) => {
                            tokio::spawn(connection);
                            Some(c)
                        }
                        Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                }
                let sql =
                    format!("INSERT INTO res_users (id, tenant_id, website_slug) VALUES ({}, 'acme', 'b{i}')", i + 1);
                match client.as_ref().expect("connected").batch_execute(&sql).await {
                    Ok(()) => {
                        committed.fetch_add(1, Ordering::SeqCst);
                        i += writers;
                    }
                    // Not committed (or committed just before the crash: the
                    // retry then fails on the key and the row counts once).
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                        committed.fetch_add(1, Ordering::SeqCst);
                        i += writers;
                    }
                    Err(_) => client = None,
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

async fn ids_in_stream(sb: &Sandbox) -> BTreeSet<String> {
    sb.stream_events().await.into_iter().flat_map(|e| e.ids).collect()
}

/// Events of table res_users with a given operation, in stream order.
async fn events(sb: &Sandbox, op: Operation) -> Vec<InvalidationEvent> {
    sb.stream_events().await.into_iter().filter(|e| e.operation() == op).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_images_from_replica_identity_full_ride_renames_deletes_and_team_moves() {
    old_images_ride_renames_deletes_and_team_moves_and_a_rollback_emits_nothing(OldImages::ReplicaIdentity).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_images_from_triggers_ride_renames_deletes_and_team_moves() {
    old_images_ride_renames_deletes_and_team_moves_and_a_rollback_emits_nothing(OldImages::Triggers).await;
}

async fn old_images_ride_renames_deletes_and_team_moves_and_a_rollback_emits_nothing(old_images: OldImages) {
    let sb = Sandbox::start_source(Source::Wal, |c| c.capture.old_images = old_images).await;
    let _capture = sb.spawn_capture().await;
    sb.sql(
        "INSERT INTO res_users (id, tenant_id, team_id, website_slug, callsign) VALUES (1, 'acme', 7, 'alice', 'K1')",
    )
    .await;
    sb.sql("BEGIN; INSERT INTO res_users (id, tenant_id, website_slug) VALUES (2, 'acme', 'ghost'); ROLLBACK").await;
    sb.sql("UPDATE res_users SET website_slug = 'alice2' WHERE id = 1").await;
    sb.sql("UPDATE res_users SET team_id = 8 WHERE id = 1").await;
    sb.sql("UPDATE res_users SET updated_at = now() WHERE id = 1").await; // unwatched: nothing
    sb.sql("UPDATE res_users SET name = 'A' WHERE id = 1").await;
    sb.sql("DELETE FROM res_users WHERE id = 1").await;
    sb.sql("TRUNCATE res_users").await;
    assert_eventually!(30, async { !events(&sb, Operation::Truncate).await.is_empty() }, "truncate not captured");

    let all = sb.stream_events().await;
    let ops: Vec<Operation> = all.iter().map(|e| e.operation()).collect();
    use Operation::*;
    assert_eq!(ops, [Insert, Update, Update, Update, Delete, Truncate], "{all:#?}");
    assert!(all.iter().all(|e| !e.ids.contains(&"2".to_string())), "the rolled-back insert was captured");
    let rename = &all[1];
    assert!(rename.tags.contains(&"res_users.website_slug=alice".into()), "{rename:?}");
    assert!(rename.tags.contains(&"res_users.website_slug=alice2".into()), "{rename:?}");
    let team_move = &all[2];
    assert_eq!(
        team_move.teams.iter().collect::<BTreeSet<_>>(),
        ["7", "8"].iter().map(|s| s.to_string()).collect::<Vec<_>>().iter().collect()
    );
    let delete = &all[4];
    assert_eq!(delete.tenant, "acme");
    assert!(
        delete.tags.contains(&"res_users.website_slug=alice2".into())
            && delete.tags.contains(&"res_users.callsign=K1".into())
    );
    assert!(all[5].all_tenants);
    // Exact commit positions, in commit order, with deterministic ids.
    let lsns: Vec<u64> = all.iter().map(|e| e.commit_lsn).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "{lsns:?}");
    assert!(all[0].event_id.starts_with(&format!("{}:", sb.db_name)) && all[0].event_id.contains('/'));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_killed_mid_burst_then_restarted_loses_no_commit() {
    const N: u64 = 1_500;
    let sb = wal_sandbox().await;
    let capture = ChildService::spawn("herald-capture", &sb.config);
    let committed = Arc::new(AtomicU64::new(0));
    let writers = {
        let committed = committed.clone();
        let sb = &sb;
        async move { burst(sb, N, 4, committed).await }
    };
    let killer = async {
        assert_eventually!(60, async { sb.stream_event_count().await >= 100 }, "capture never appended");
        capture.kill().await;
    };
    tokio::join!(writers, killer);
    assert_eq!(committed.load(Ordering::SeqCst), N);
    let _capture = ChildService::spawn("herald-capture", &sb.config);
    assert_eventually!(60, async { ids_in_stream(&sb).await.len() as u64 == N }, "commits lost after the kill");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_after_the_active_capture_is_killed() {
    const N: u64 = 1_200;
    let sb = wal_sandbox().await;
    let active = ChildService::spawn("herald-capture", &sb.config);
    assert_eventually!(30, async { sb.scalar_i64(&slot_active(&sb)).await == 1 }, "nobody streams the slot");
    let standby = sb.spawn_capture().await;
    let committed = Arc::new(AtomicU64::new(0));
    let writers = burst(&sb, N, 4, committed.clone());
    let killer = async {
        assert_eventually!(60, async { sb.stream_event_count().await >= 100 }, "capture never appended");
        active.kill().await;
    };
    tokio::join!(writers, killer);
    assert_eventually!(60, async { ids_in_stream(&sb).await.len() as u64 == N }, "the standby did not take over");
    assert_eq!(herald_tests::metric(standby.ops_addr, "herald_capture_standby", "").await, 0.0);
    sb.cleanup().await;
}

fn slot_active(sb: &Sandbox) -> String {
    format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}' AND active", sb.config.capture.slot)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_then_capture_resumes_from_the_slot() {
    const N: u64 = 1_500;
    let sb = wal_sandbox().await;
    let _capture = sb.spawn_capture().await;
    let committed = Arc::new(AtomicU64::new(0));
    let writers = burst(&sb, N, 4, committed.clone());
    let restart = async {
        assert_eventually!(60, async { sb.stream_event_count().await >= 100 }, "capture never appended");
        tokio::task::block_in_place(|| logical::cluster().restart());
    };
    tokio::join!(writers, restart);
    // Every row the writers saw committed — after a crash restart, those in
    // the table — is in the stream.
    let rows = sb.scalar_i64("SELECT count(*) FROM res_users").await as u64;
    assert!(rows >= N, "{rows} rows");
    assert_eventually!(90, async { ids_in_stream(&sb).await.len() as u64 >= rows }, "commits lost over the restart");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_capture_is_down_flushes_l1_and_l2_then_service_resumes() {
    let sb = wal_sandbox().await;
    let capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'alice')").await;
    assert_eventually!(30, async { l1.cache.applied().events >= 1 }, "insert not applied");
    capture.stop().await.expect("capture stops");

    // Entries that an invalidation in the gap would have dropped.
    assert!(l1.put("acme", "user:1", "Alice", &["res_users.id=1"]));
    assert!(l1.put("globex", "user:9", "G", &["res_users.id=9"]));
    let l2 = L2::new(sb.redis.clone(), sb.keys.clone());
    let scope = Scope::Tenant(TenantId::new("acme").unwrap());
    let key = sb.keys.entry(&scope, "user", "1").unwrap();
    l2.store(&key, Bytes::from_static(b"Alice"), &[TagKey::new(scope.clone(), "res_users.id=1")], None).await.unwrap();
    let admin = {
        let (c, connection) = tokio_postgres::connect(&sb.admin, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        c
    };
    admin.execute("SELECT pg_drop_replication_slot($1)", &[&sb.config.capture.slot]).await.unwrap();
    sb.sql("UPDATE res_users SET name = 'lost' WHERE id = 1").await; // falls into the gap

    let capture = sb.spawn_capture().await;
    assert_eventually!(30, async { !l1.has("user:1") && !l1.has("user:9") }, "L1 kept entries across a lost slot");
    assert_eventually!(10, async { l2.get(&key).await.unwrap().is_none() }, "L2 kept an entry across a lost slot");
    assert_eq!(herald_tests::metric(capture.ops_addr, "herald_capture_flush_everything_total", "").await, 1.0);
    // Normal service afterwards.
    assert!(l1.put("acme", "user:1", "Alice", &["res_users.id=1"]));
    sb.sql("UPDATE res_users SET name = 'B' WHERE id = 1").await;
    assert_eventually!(30, async { !l1.has("user:1") }, "no invalidation after the slot was recreated");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_while_capture_runs_changes_nothing_and_a_dropped_key_column_is_named() {
    let sb = wal_sandbox().await;
    let capture = sb.spawn_capture().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'a')").await;
    sb.sql("ALTER TABLE res_users ADD COLUMN nickname text").await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, nickname) VALUES (2, 'acme', 'b', 'bee')").await;
    sb.sql("UPDATE res_users SET website_slug = 'a2' WHERE id = 1").await;
    // The inserts' ids alone satisfy the count: wait for the update too.
    assert_eventually!(
        30,
        async { ids_in_stream(&sb).await.len() == 2 && !events(&sb, Operation::Update).await.is_empty() },
        "changes after ALTER TABLE lost"
    );
    let renamed = events(&sb, Operation::Update).await;
    assert!(renamed[0].tags.contains(&"res_users.website_slug=a".to_string()), "{renamed:?}");

    // A key column Herald needs disappears: an error naming it, never a
    // silent drop (capture does not confirm past it).
    sb.sql("ALTER TABLE res_users DROP COLUMN callsign CASCADE").await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (3, 'acme', 'c')").await;
    assert_eventually!(
        30,
        async { herald_tests::metric(capture.ops_addr, "herald_capture_errors_total", "").await >= 1.0 },
        "no error"
    );
    assert!(!ids_in_stream(&sb).await.contains("3"));
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_row_update_arrives_in_chunks_with_bounded_capture_memory() {
    const ROWS: i64 = 200_000;
    let sb = wal_sandbox().await;
    sb.sql(&format!(
        "INSERT INTO res_users (id, tenant_id, website_slug) SELECT g, 'acme', 's' || g FROM generate_series(1, {ROWS}) g"
    ))
    .await;
    let capture = ChildService::spawn("herald-capture", &sb.config);
    assert_eventually!(120, async { ids_in_stream(&sb).await.len() as i64 == ROWS }, "insert not delivered");
    let before = sb.stream_event_count().await;
    sb.sql("UPDATE res_users SET name = 'x'").await;
    assert_eventually!(
        180,
        async { sb.stream_event_count().await - before >= (ROWS as u64).div_ceil(500) },
        "update not delivered"
    );
    let update_ids: BTreeSet<String> = events(&sb, Operation::Update).await.into_iter().flat_map(|e| e.ids).collect();
    assert_eq!(update_ids.len() as i64, ROWS);
    let peak_kb = peak_rss_kb(capture.pid().expect("pid"));
    // 200,000 images held at once would be well over 100 MB of strings and
    // events; capture flushes every few thousand.
    assert!(peak_kb < 150 * 1024, "capture peaked at {peak_kb} kB");
    capture.kill().await;
    sb.cleanup().await;
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_status_shows_the_slot_and_uninstall_drops_it() {
    let sb = wal_sandbox().await;
    sb.install().await; // again: nothing changes, no error
    let slot = &sb.config.capture.slot;
    let status = herald_capture::status::status(&sb.config).await.expect("status");
    assert_eq!(status.source, Some(herald_capture::source::Source::Wal));
    let (name, state) = status.slot.clone().expect("slot status");
    assert!(name == *slot && state.exists && state.active_pid.is_none());
    let text = status.render();
    assert!(text.contains("retained wal:") && text.contains("no capture is reading"), "{text}");
    let print = herald_capture::install::sql(&sb.config, herald_capture::source::Source::Wal, &Default::default());
    assert!(print.contains("ALTER PUBLICATION") && print.contains("pg_create_logical_replication_slot"));

    let (mut client, connection) =
        tokio_postgres::connect(&sb.config.postgres.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let identity = async |client: &tokio_postgres::Client| -> (String, i64) {
        let row = client
            .query_one(
                "SELECT relreplident::text, (SELECT count(*) FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal) \
                 FROM pg_class c WHERE oid = 'res_users'::regclass",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    // Old images from the stream (the default): FULL, no trigger at all.
    assert_eq!(identity(&client).await, ("f".to_string(), 0));

    // Old images from triggers: the identity Herald changed is put back,
    // and the update trigger compares integers and strings as their types
    // (no output function on every UPDATE). --print shows the same.
    let mut triggers = sb.config.clone();
    triggers.capture.old_images = OldImages::Triggers;
    herald_capture::install::install(&mut client, &triggers).await.expect("install with triggers");
    assert_eq!(identity(&client).await, ("d".to_string(), 2));
    let installed: String = client
        .query_one("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'herald_capture_wal_upd'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(installed.contains("old.id IS DISTINCT FROM new.id"), "{installed}");
    assert!(installed.contains("(old.tenant_id COLLATE \"C\") IS DISTINCT FROM"), "{installed}");
    let catalog = herald_capture::install::column_types(&client, &triggers).await.unwrap();
    let print = herald_capture::install::sql(&triggers, herald_capture::source::Source::Wal, &catalog);
    assert!(print.contains("OLD.\"id\" IS DISTINCT FROM NEW.\"id\""), "{print}");

    // Back to FULL; a table removed from the config gets its identity back;
    // uninstall puts back every identity Herald changed.
    sb.install().await;
    assert_eq!(identity(&client).await, ("f".to_string(), 0));
    let mut without = sb.config.clone();
    without.tables.clear();
    herald_capture::install::install(&mut client, &without).await.expect("install without tables");
    assert_eq!(identity(&client).await, ("d".to_string(), 0));
    sb.install().await;
    assert_eq!(identity(&client).await, ("f".to_string(), 0));
    let kept = herald_capture::install::uninstall(&mut client, &sb.config, false).await.expect("uninstall");
    assert!(kept.slot_kept && kept.removed_triggers == 0, "{kept:?}");
    assert_eq!(identity(&client).await, ("d".to_string(), 0));
    let dropped = herald_capture::install::uninstall(&mut client, &sb.config, true).await.expect("uninstall");
    assert!(dropped.slot_dropped);
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[slot])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
    // Writers are unaffected by the removed triggers and publication.
    sb.sql("INSERT INTO res_users (tenant_id) VALUES ('acme'); DELETE FROM res_users").await;
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_primary_key_is_captured_with_full_and_refused_with_triggers() {
    let sb = wal_sandbox().await;
    sb.sql("ALTER TABLE res_users DROP CONSTRAINT res_users_pkey").await;
    sb.install().await; // FULL needs no key
    let _capture = sb.spawn_capture().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug) VALUES (1, 'acme', 'a')").await;
    sb.sql("UPDATE res_users SET website_slug = 'b' WHERE id = 1; DELETE FROM res_users").await;
    assert_eventually!(30, async { !events(&sb, Operation::Delete).await.is_empty() }, "delete not captured");
    let (mut client, connection) =
        tokio_postgres::connect(&sb.config.postgres.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // Triggers would put DEFAULT back, and without a key every UPDATE fails.
    let mut triggers = sb.config.clone();
    triggers.capture.old_images = OldImages::Triggers;
    let error = herald_capture::install::install(&mut client, &triggers).await.unwrap_err().to_string();
    assert!(error.contains("no replica identity") && error.contains("res_users"), "{error}");
    sb.sql("INSERT INTO res_users (id, tenant_id) VALUES (2, 'acme'); UPDATE res_users SET name = 'x'").await;
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_an_outbox_install_to_the_wal_loses_no_write() {
    let admin = tokio::task::spawn_blocking(|| logical::cluster().admin_url()).await.unwrap();
    let mut sb = Sandbox::start_at(admin, Source::Outbox, |_| {}).await;
    sb.sql("INSERT INTO res_users (id, tenant_id) VALUES (1, 'acme')").await; // left in the outbox
    sb.config.capture.source = herald_core::config::CaptureSource::Wal;
    sb.config.capture.slot = herald_tests::unique("herald_s_");
    // Writers keep writing while the install switches sources.
    let writer = {
        let url = sb.config.postgres.url.clone();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            for id in 2..=300 {
                client
                    .execute("INSERT INTO res_users (id, tenant_id) VALUES ($1, 'acme')", &[&(id as i64)])
                    .await
                    .unwrap();
            }
        })
    };
    sb.install().await;
    writer.await.unwrap();
    let _capture = sb.spawn_capture().await;
    assert_eventually!(30, async { ids_in_stream(&sb).await.len() == 300 }, "writes lost in the switch");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watched_table_on_a_busy_database_pins_no_wal() {
    let sb = wal_sandbox().await;
    let capture = sb.spawn_capture().await;
    sb.sql("CREATE TABLE busy (id bigserial PRIMARY KEY, v text)").await;
    for _ in 0..20 {
        sb.sql("INSERT INTO busy (v) SELECT repeat('x', 100) FROM generate_series(1, 500)").await;
    }
    let written = sb.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    let slot = sb.config.capture.slot.clone();
    let confirmed = || async {
        sb.scalar_i64(&format!(
            "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
    };
    assert_eventually!(30, async { confirmed().await >= written }, "the slot's position stays behind the WAL");
    assert_eq!(sb.stream_event_count().await, 0, "writes of an unwatched table made events");
    assert!(herald_tests::metric(capture.ops_addr, "herald_capture_confirmed_lsn", "").await >= written as f64);
    sb.cleanup().await;
}
