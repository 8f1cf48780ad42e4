//! Redis connection set-up (fred), for one server or a Redis Cluster
//! (`redis.cluster`, or a `redis-cluster://` url with seed nodes: fred's
//! cluster client follows `MOVED`/`ASK` and refreshes its slot map).
//!
//! Command pools reconnect by themselves with exponential backoff and bound
//! every command by `redis.command_timeout_ms`, so a Redis outage turns into
//! errors the caller handles, never into a hang. Pub/sub subscribers are
//! built without a reconnect policy: the L1 subscriber owns its reconnect
//! loop, because a lost subscription must flush the cache before anything
//! else happens.

use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::prelude::*;
use fred::types::config::{ConnectionConfig, PerformanceConfig, ServerConfig};
use fred::types::{ClusterHash, CustomCommand};

use crate::config::RedisConfig;
use crate::error::Result;

fn builder(config: &RedisConfig) -> Result<Builder> {
    let mut redis_config = fred::types::config::Config::from_url(&config.url)?;
    if config.is_cluster()
        && let ServerConfig::Centralized { server } = &redis_config.server
    {
        redis_config.server = ServerConfig::Clustered { hosts: vec![server.clone()], policy: Default::default() };
    }
    let timeout = Duration::from_millis(config.command_timeout_ms);
    let mut builder = Builder::from_config(redis_config);
    builder
        .set_connection_config(ConnectionConfig {
            connection_timeout: Duration::from_secs(5),
            internal_command_timeout: timeout,
            max_command_attempts: 3,
            ..Default::default()
        })
        .set_performance_config(PerformanceConfig {
            default_command_timeout: timeout,
            // Pub/sub messages wait here for the subscriber task; a lagging
            // subscriber flushes its cache, so give it room.
            broadcast_channel_capacity: 4096,
            ..Default::default()
        });
    Ok(builder)
}

/// A pool of `redis.pool_size` connections that reconnect with backoff.
/// Returns once the pool has connected (or failed to).
pub async fn connect_pool(config: &RedisConfig) -> Result<Pool> {
    let mut builder = builder(config)?;
    builder.set_policy(ReconnectPolicy::new_exponential(0, 50, 5_000, 2));
    let pool = builder.build_pool(config.pool_size.max(1))?;
    pool.init().await?;
    Ok(pool)
}

/// A pool for tests and tools that should keep retrying while Redis starts.
pub fn build_pool(config: &RedisConfig) -> Result<Pool> {
    let mut builder = builder(config)?;
    builder.set_policy(ReconnectPolicy::new_exponential(0, 50, 5_000, 2));
    Ok(builder.build_pool(config.pool_size.max(1))?)
}

/// A subscriber connection with no reconnect policy: when its connection
/// ends, the task returned by `init()` finishes and the owner reconnects.
pub fn build_subscriber(config: &RedisConfig) -> Result<SubscriberClient> {
    Ok(builder(config)?.build_subscriber_client()?)
}

/// Creates consumer group `group` at the start of `stream` (making the
/// stream) unless it exists, so that events appended before the first
/// consumer starts are delivered.
pub async fn ensure_group(redis: &Pool, stream: &str, group: &str) -> Result<()> {
    let created: std::result::Result<Value, _> = redis.next().xgroup_create(stream, group, "0", true).await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Every key matching `pattern`, on every master of a cluster (a pattern
/// such as `…:t:{*}:epoch` names no slot, and a plain `SCAN` reaches one
/// node), or on the one server.
pub async fn scan_every_master(client: &Client, pattern: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    if !client.is_clustered() {
        scan_node(client, pattern, &mut found).await?;
        return Ok(found);
    }
    let masters = client.cached_cluster_state().map(|state| state.unique_primary_nodes()).unwrap_or_default();
    if masters.is_empty() {
        return Err(fred::error::Error::new(fred::error::ErrorKind::Cluster, "no cluster state to scan").into());
    }
    for master in masters {
        scan_node(&client.with_cluster_node(master), pattern, &mut found).await?;
    }
    Ok(found)
}

async fn scan_node<C: KeysInterface + Sync>(client: &C, pattern: &str, found: &mut Vec<String>) -> Result<()> {
    let mut cursor = "0".to_string();
    loop {
        let (next, keys): (String, Vec<String>) = client.scan_page(cursor.as_str(), pattern, Some(1000), None).await?;
        found.extend(keys);
        if next == "0" {
            return Ok(());
        }
        cursor = next;
    }
}

/// Deletes `keys` (any slots): one `DEL` per slot and chunk, so a cluster
/// never sees a cross-slot command. Returns how many existed.
pub async fn del_any_slots(client: &Client, keys: Vec<String>) -> Result<u64> {
    let mut deleted = 0u64;
    for keys in by_slot(keys) {
        for chunk in keys.chunks(500) {
            let n: i64 = client.del(chunk.to_vec()).await?;
            deleted += n.max(0) as u64;
        }
    }
    Ok(deleted)
}

/// Waits until `replicas` replicas have every write made so far on
/// `client`'s connections to the masters of `slots` (one `WAIT` per master);
/// returns the fewest acknowledgements seen.
pub async fn wait_for_replicas(client: &Client, slots: &[u16], replicas: u32, timeout_ms: u64) -> Result<i64> {
    let mut masters: Vec<(String, u16)> = Vec::new();
    for &slot in slots {
        let server = client
            .cached_cluster_state()
            .and_then(|state| state.get_server(slot).map(|s| s.to_string()))
            .unwrap_or_default();
        if !masters.iter().any(|(s, _)| *s == server) {
            masters.push((server, slot));
        }
    }
    let mut fewest = i64::MAX;
    for (_, slot) in masters {
        let wait = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), true);
        let args = vec![i64::from(replicas), i64::try_from(timeout_ms).unwrap_or(i64::MAX)];
        let acked: i64 = client.custom(wait, args).await?;
        fewest = fewest.min(acked);
    }
    Ok(fewest)
}

/// `SPUBLISH` on a cluster (sharded pub/sub: the message reaches only the
/// shard that owns the channel's slot), `PUBLISH` on one server.
pub fn publish_command(client: &Client) -> &'static str {
    if client.is_clustered() { "SPUBLISH" } else { "PUBLISH" }
}

/// Publishes `message` on `channel` (see [`publish_command`]).
pub async fn publish(client: &Client, channel: &str, message: bytes::Bytes) -> Result<()> {
    if client.is_clustered() {
        let _: i64 = client.spublish(channel, message).await?;
    } else {
        let _: i64 = client.publish(channel, message).await?;
    }
    Ok(())
}

/// Subscribes `client` to `channels`: on a cluster `SSUBSCRIBE`, one command
/// per slot (each reaches the shard that owns the slot), else `SUBSCRIBE`.
pub async fn subscribe(client: &SubscriberClient, channels: Vec<String>) -> Result<()> {
    if !client.is_clustered() {
        return Ok(client.subscribe(channels).await?);
    }
    for same_slot in by_slot(channels) {
        client.ssubscribe(same_slot).await?;
    }
    Ok(())
}

/// Undoes [`subscribe`].
pub async fn unsubscribe(client: &SubscriberClient, channels: Vec<String>) -> Result<()> {
    if !client.is_clustered() {
        return Ok(client.unsubscribe(channels).await?);
    }
    for same_slot in by_slot(channels) {
        client.sunsubscribe(same_slot).await?;
    }
    Ok(())
}

/// The slot map a subscriber's sharded subscriptions were made against.
///
/// Redis drops a sharded subscription, without closing the connection, when
/// its slot changes master (`CLUSTER FAILOVER`, a slot migration); its
/// `SUNSUBSCRIBE` notice is dropped by fred 10. So a cluster subscriber takes
/// the map before subscribing, compares it with the cluster's every
/// `redis.topology_check_ms`, and starts over (flush or catch up, subscribe
/// again) when it changed.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotMap(Vec<(u16, u16, String)>);

impl SlotMap {
    /// The client's cached map (fresh after `init()`): take it before
    /// subscribing, so that a change during the subscribe shows as one.
    pub fn cached<C: ClusterInterface>(client: &C) -> Self {
        let mut ranges: Vec<(u16, u16, String)> = client
            .cached_cluster_state()
            .map(|state| state.slots().iter().map(|r| (r.start, r.end, r.primary.to_string())).collect())
            .unwrap_or_default();
        ranges.sort();
        Self(ranges)
    }

    /// Reads the cluster's map again (`CLUSTER SLOTS`, on fred's
    /// backchannel); true when some slot has changed master since `self`.
    pub async fn changed<C: ClusterInterface + Sync>(&self, client: &C) -> Result<bool> {
        client.sync_cluster().await?;
        Ok(Self::cached(client) != *self)
    }
}

fn by_slot(names: Vec<String>) -> Vec<Vec<String>> {
    let mut groups: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for name in names {
        groups.entry(crate::keys::slot(&name)).or_default().push(name);
    }
    groups.into_values().collect()
}
