//! Herald on a real Redis Cluster (3 masters, 3 replicas, started by the
//! test itself): keys land where the slot check says, the partitioned log
//! keeps per-tenant order across masters, TRUNCATE sweeps every master, and
//! a master that dies (SIGKILL, its replica promoted) or hands over
//! (`CLUSTER FAILOVER`) in the middle of a write burst loses no
//! invalidation, and gateway channels deliver and recover every
//! publication once across a failover.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use herald_core::channel::{Channel, ChannelKeys};
use herald_core::keys::{self, KeySpace, Scope, TagKey, TenantId};
use herald_core::l1::Applied;
use herald_core::l2::L2;
use herald_tests::gateway::{GatewayHandle, SERVICE_TOKEN, WsClient, http_publish, team_token};
use herald_tests::redis_cluster::RedisCluster;
use herald_tests::{Sandbox, assert_eventually, cluster_settings};

/// Tenants whose scopes are served by different masters, at least one per
/// master, and whose events fall in every partition.
fn tenants_everywhere(cluster: &RedisCluster, partitions: u16) -> Vec<String> {
    let map = cluster.slot_map();
    let master_of = |slot: u16| map.iter().find(|(lo, hi, _)| (*lo..=*hi).contains(&slot)).map(|m| m.2);
    let mut masters = HashSet::new();
    let mut parts = HashSet::new();
    let mut chosen = Vec::new();
    for i in 0..1000 {
        let tenant = format!("t{i}");
        let master = master_of(keys::slot(&format!("{{{tenant}}}")));
        let part = keys::partition_of(&tenant, partitions);
        if masters.insert(master) | parts.insert(part) || chosen.len() < 4 {
            chosen.push(tenant);
        }
        if masters.len() == 3 && parts.len() == usize::from(partitions) && chosen.len() >= 4 {
            break;
        }
    }
    chosen
}

async fn cluster_sandbox(cluster: &RedisCluster) -> Sandbox {
    let url = cluster.url();
    Sandbox::start_with(|c| cluster_settings(c, url)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_family_lands_where_the_slot_check_says_and_truncate_sweeps_every_master() {
    let cluster = RedisCluster::shared();
    let sb = cluster_sandbox(cluster).await;
    let l2 = L2::new(sb.redis.clone(), sb.keys.clone());
    let tenants = tenants_everywhere(cluster, 3);
    for tenant in &tenants {
        let scope = Scope::Tenant(TenantId::new(tenant).unwrap());
        let entry = sb.keys.entry(&scope, "user_by_id", "1").unwrap();
        let tags = [TagKey::new(scope.clone(), "res_users.id=1")];
        // Every script of L2 runs (a CROSSSLOT would fail it) ...
        l2.store(&entry, Bytes::from_static(b"v"), &tags, None).await.unwrap();
        let lease = sb.keys.lease(&entry);
        let begun = l2
            .begin_fill(
                &scope,
                Some(&herald_core::l2::Lease { entry: &entry, key: &lease, owner: "o", ttl: Duration::from_secs(5) }),
            )
            .await
            .unwrap();
        assert!(begun.entry.is_some());
        let kv = sb.keys.entry(&scope, keys::KV_SEGMENT, "k").unwrap();
        assert!(l2.store_gated(&scope, &kv, Bytes::from_static(b"x"), &tags, None, &begun.token, None).await.unwrap());
        // ... and every key it wrote is on the master the slot check names.
        let written = [
            entry.clone(),
            kv,
            sb.keys.tag_set(&tags[0]),
            sb.keys.tag_set(&TagKey::new(scope.clone(), "res_users.*")),
            sb.keys.fill_epoch(&scope),
        ];
        let slot = keys::one_slot(&written).unwrap();
        assert_eq!(slot, keys::slot(&format!("{{{tenant}}}")));
        let master = cluster.master_of(slot);
        for key in &written {
            let exists = std::process::Command::new("redis-cli")
                .args(["-p", &master.to_string(), "exists", key])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&exists.stdout).trim(), "1", "{key} is not on master {master}");
        }
        let channel = herald_core::channel::Channel::parse("team:1").unwrap();
        let tenant_id = TenantId::new(tenant).unwrap();
        let history = herald_core::channel::HistoryOptions { size: 10, ttl_s: 60 };
        herald_core::channel::publish(&sb.redis, &sb.keys, &tenant_id, &channel, history, b"{}", Some(("k", 60)))
            .await
            .unwrap();
    }
    for i in 0..3u16 {
        let stream = sb.keys.stream_partition(i, 3);
        assert_eq!(keys::slot(&sb.keys.l1_partition_channel(i, 3)), keys::slot(&stream));
    }
    // TRUNCATE of a tenant table (review F9): every tenant's entries go, on
    // every master.
    l2.invalidate_all_scopes(&["res_users.*".to_string()]).await.unwrap();
    for tenant in &tenants {
        let scope = Scope::Tenant(TenantId::new(tenant).unwrap());
        let entry = sb.keys.entry(&scope, "user_by_id", "1").unwrap();
        assert_eq!(l2.get(&entry).await.unwrap(), None, "{tenant}: an entry survived the truncate sweep");
    }
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_tenants_on_different_masters_all_arrive_in_per_tenant_order() {
    let cluster = RedisCluster::shared();
    let sb = cluster_sandbox(cluster).await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    let mut applied = l1.cache.watch();
    // Broadcast trims what every group has acknowledged; a group that reads
    // nothing keeps every entry for the order check below.
    for stream in sb.log().streams() {
        herald_core::redis::ensure_group(&sb.redis, stream, "order-check").await.unwrap();
    }
    let tenants = tenants_everywhere(cluster, 3);
    let per_tenant = 20;
    // One writer per tenant, each insert its own transaction: ids grow in
    // commit order within a tenant.
    let writers = tenants.iter().map(|tenant| {
        let sb = &sb;
        async move {
            for _ in 0..per_tenant {
                sb.sql(&format!("INSERT INTO res_users (tenant_id, name) VALUES ('{tenant}', 'x')")).await;
            }
        }
    });
    futures::future::join_all(writers).await;
    let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let want = tenants.len() * per_tenant;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.values().map(Vec::len).sum::<usize>() < want {
        match tokio::time::timeout_at(deadline, applied.recv()).await {
            Ok(Ok(Applied::Event(event))) => {
                // Delivery is at least once: a batch whose append or WAIT
                // failed is appended again. Order is judged on first arrivals.
                let ids = seen.entry(event.tenant.clone()).or_default();
                for id in event.ids.iter().map(|id| id.parse::<i64>().unwrap()) {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            Ok(Ok(Applied::Watermark { .. })) => {}
            Ok(Ok(Applied::Flushed { .. })) => panic!("the l1 holder flushed: it could have missed events"),
            Ok(Err(e)) => panic!("watch: {e}"),
            Err(_) => panic!("only {seen:?} of {want} events arrived"),
        }
    }
    // The order to keep is capture's: a tenant's events in its partition's
    // stream. (The outbox source appends in outbox order, which need not
    // be id order across writer connections; the log must not reorder it.)
    let mut appended: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for event in sb.stream_events().await {
        let ids = appended.entry(event.tenant.clone()).or_default();
        for id in event.ids.iter().map(|id| id.parse::<i64>().unwrap()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    for tenant in &tenants {
        let ids = &seen[tenant];
        assert_eq!(ids.len(), per_tenant, "{tenant}: {ids:?}");
        assert_eq!(ids, &appended[tenant], "{tenant}: applied out of the stream's order");
    }
    sb.cleanup().await;
}

/// What kind of master change happens in the middle of the burst.
#[derive(Clone, Copy, Debug)]
enum MasterChange {
    Killed,
    FailedOver,
}

/// Rows of tenants on every master get an L2 and an L1 entry; then each row
/// is updated once, one transaction each, and halfway through the master of
/// partition 0 (and of some tenants' entries) goes away. After quiesce no
/// entry of any updated row may be left in L2 or in L1.
async fn no_invalidation_is_lost_when_a_master_changes(change: MasterChange) {
    let cluster = RedisCluster::start(3);
    let url = cluster.url();
    // Heartbeats must not be what brings L1 back: a holder has to see the
    // slot that changed master by itself (redis.topology_check_ms).
    let sb = Sandbox::start_with(|c| {
        cluster_settings(c, url);
        c.l1.heartbeat_timeout_ms = 600_000;
    })
    .await;
    let capture = sb.spawn_capture().await;
    let broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    let l2 = L2::new(sb.redis.clone(), sb.keys.clone());
    let tenants = tenants_everywhere(&cluster, 3);
    let rows_per_tenant = 40i64;
    let mut rows = Vec::new();
    for (t, tenant) in tenants.iter().enumerate() {
        for r in 0..rows_per_tenant {
            let id = t as i64 * 1000 + r + 1;
            sb.sql(&format!("INSERT INTO res_users (id, tenant_id, name) VALUES ({id}, '{tenant}', 'v1')")).await;
            rows.push((tenant.clone(), id));
        }
    }
    assert_eventually!(30, async { sb.scalar_i64("SELECT count(*) FROM herald.outbox").await == 0 }, "inserts");
    assert_eventually!(30, async { sb.log_acknowledged().await }, "inserts not applied");
    for (tenant, id) in &rows {
        let scope = Scope::Tenant(TenantId::new(tenant).unwrap());
        let tag = format!("res_users.id={id}");
        let entry = sb.keys.entry(&scope, "user_by_id", &id.to_string()).unwrap();
        l2.store(&entry, Bytes::from_static(b"v1"), &[TagKey::new(scope, tag.as_str())], None).await.unwrap();
        assert!(l1.put(tenant, &entry, "v1", &[tag.as_str()]));
    }

    let generation = l1.cache.generation();
    let victim = cluster.master_of(keys::slot(&sb.keys.stream_partition(0, 3)));
    let replica = cluster.replica_of(victim);
    let half = rows.len() / 2;
    for (i, (_, id)) in rows.iter().enumerate() {
        if i == half {
            match change {
                MasterChange::Killed => cluster.kill(victim),
                MasterChange::FailedOver => cluster.failover(replica),
            }
        }
        sb.sql(&format!("UPDATE res_users SET name = 'v2' WHERE id = {id}")).await;
    }
    cluster.wait_master(replica);
    if let MasterChange::Killed = change {
        // The promoted master has no replica, so WAIT 1 cannot succeed and
        // the outbox holds the backlog (by design) until one rejoins.
        cluster.restart(victim);
    }

    // Quiesce: the outbox drained, every partition acknowledged.
    assert_eventually!(60, async { sb.scalar_i64("SELECT count(*) FROM herald.outbox").await == 0 }, "outbox");
    assert_eventually!(
        60,
        async { sb.log_acknowledged().await },
        "broadcast never caught up after the {change:?} master"
    );
    let entries: Vec<String> = rows
        .iter()
        .map(|(tenant, id)| {
            sb.keys.entry(&Scope::Tenant(TenantId::new(tenant).unwrap()), "user_by_id", &id.to_string()).unwrap()
        })
        .collect();
    let mut stale = Vec::new();
    for entry in &entries {
        if l2.get(entry).await.unwrap().is_some() {
            stale.push(entry.clone());
        }
    }
    assert!(
        stale.is_empty(),
        "{change:?}: {} stale L2 entries after quiesce: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    // L1: the holder flushed and subscribed again when partition 0's slot
    // changed master, long before a heartbeat (600 s) could have told it.
    assert_eventually!(
        20,
        async { l1.cache.generation() != generation && l1.cache.is_live() },
        "{change:?}: l1 was not flushed and live again (generation {} → {})",
        generation,
        l1.cache.generation()
    );
    assert_eventually!(
        20,
        async { !entries.iter().any(|e| l1.has(e)) },
        "{change:?}: {} stale L1 entries after quiesce: {:?}",
        entries.iter().filter(|e| l1.has(e)).count(),
        entries.iter().filter(|e| l1.has(e)).take(5).collect::<Vec<_>>()
    );
    capture.stop().await.unwrap();
    broadcast.stop().await.unwrap();
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_sigkilled_mid_burst_loses_no_invalidation() {
    no_invalidation_is_lost_when_a_master_changes(MasterChange::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_under_load_loses_no_invalidation() {
    no_invalidation_is_lost_when_a_master_changes(MasterChange::FailedOver).await;
}

#[test]
fn partitions_of_a_three_partition_log_are_on_three_masters() {
    let cluster = RedisCluster::shared();
    let ks = KeySpace::new("any").unwrap();
    let masters: HashSet<u16> = (0..3).map(|i| cluster.master_of(keys::slot(&ks.stream_partition(i, 3)))).collect();
    assert_eq!(masters.len(), 3, "an evenly sliced cluster carries one partition per master");
}

/// Publishes `n` on acme's `channel` through `gw`, retrying (same
/// idempotency key, so at most one publication) while the cluster settles.
async fn publish_once(gw: &GatewayHandle, channel: &str, n: u64) {
    let body =
        serde_json::json!({"tenant": "acme", "channel": channel, "data": {"n": n}, "idempotency_key": format!("n{n}")});
    for _ in 0..50 {
        let (status, reply) = http_publish(gw, Some(SERVICE_TOKEN), &body).await;
        if status == 200 {
            return;
        }
        tracing::info!(status, %reply, "publish refused while the cluster settles; retrying");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("publication {n} never accepted");
}

/// Reads `expected` publications from `client`: exactly these offsets (each
/// carrying `n` = its offset), in order.
async fn expect_pubs(client: &mut WsClient, expected: std::ops::RangeInclusive<u64>, who: &str) {
    for n in expected {
        let p = client.next_pub().await;
        assert_eq!((p["offset"].as_u64(), p["data"]["n"].as_u64()), (Some(n), Some(n)), "{who}: {p}");
    }
}

/// A channel's master hands over (`CLUSTER FAILOVER`) between publications:
/// a subscriber that stays connected gets every publication once, in order
/// (the gateway saw the slot change master and subscribed again), and one
/// that reconnects with its last offset recovers exactly what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_recovery_across_a_failover_delivers_every_publication_once() {
    let cluster = RedisCluster::start(3);
    let url = cluster.url();
    let sb = Sandbox::start_with(|c| {
        cluster_settings(c, url);
        herald_tests::gateway::configure(c);
    })
    .await;
    let gw = sb.spawn_gateway().await;
    let token = team_token("acme", "alice");
    let (mut live, mut away) = (WsClient::connect(&gw, &token).await, WsClient::connect(&gw, &token).await);
    for client in [&mut live, &mut away] {
        assert_eq!(client.subscribe("team:1").await["type"], "subscribed");
    }
    for n in 1..=3 {
        publish_once(&gw, "team:1", n).await;
    }
    expect_pubs(&mut live, 1..=3, "live").await;
    let mut last = serde_json::Value::Null;
    for _ in 1..=3 {
        last = away.next_pub().await;
    }
    let epoch = last["epoch"].as_str().unwrap().to_string();
    away.close().await;

    let history = ChannelKeys::new(&sb.keys, &TenantId::new("acme").unwrap(), &Channel::parse("team:1").unwrap());
    let victim = cluster.master_of(keys::slot(&history.history()));
    let replica = cluster.replica_of(victim);
    cluster.failover(replica);
    cluster.wait_master(replica);
    for n in 4..=6 {
        publish_once(&gw, "team:1", n).await;
    }
    expect_pubs(&mut live, 4..=6, "live across the failover").await;

    let mut back = WsClient::connect(&gw, &token).await;
    let reply = back.subscribe_recover("team:1", 3, &epoch).await;
    assert_eq!((reply["recovered"].as_bool(), reply["missed"].as_u64()), (Some(true), Some(3)), "{reply}");
    expect_pubs(&mut back, 4..=6, "recovered").await;
    publish_once(&gw, "team:1", 7).await;
    expect_pubs(&mut back, 7..=7, "recovered, then live").await;
    expect_pubs(&mut live, 7..=7, "live").await;
    gw.stop().await.unwrap();
    sb.cleanup().await;
}
