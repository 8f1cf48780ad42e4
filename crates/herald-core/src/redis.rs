//! Redis connection set-up (fred).
//!
//! Command pools reconnect by themselves with exponential backoff and bound
//! every command by `redis.command_timeout_ms`, so a Redis outage turns into
//! errors the caller handles, never into a hang. Pub/sub subscribers are
//! built without a reconnect policy: the L1 subscriber owns its reconnect
//! loop, because a lost subscription must flush the cache before anything
//! else happens.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::{ConnectionConfig, PerformanceConfig};

use crate::config::RedisConfig;
use crate::error::Result;

fn builder(config: &RedisConfig) -> Result<Builder> {
    let redis_config = fred::types::config::Config::from_url(&config.url)?;
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
