//! Keeps an [`L1Cache`] coherent: subscribes to the L1 channel, applies
//! invalidations, watches broadcast's heartbeat, and makes the cache not live
//! (which flushes it) whenever it could have missed a message: the
//! connection dropped, the local queue overflowed, or heartbeats stopped.

use std::time::Duration;

use fred::prelude::*;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::L1Cache;
use super::wire::{self, Received};
use crate::backoff::Backoff;
use crate::config::{L1Config, RedisConfig};
use crate::ops::ReadyFlag;
use crate::redis::build_subscriber;

/// Where and how to subscribe.
#[derive(Clone)]
pub struct SubscriberOptions {
    pub redis: RedisConfig,
    /// The L1 channel (`KeySpace::l1_channel`).
    pub channel: String,
    pub heartbeat_timeout: Duration,
    /// Set while the subscription is up and heartbeats arrive.
    pub ready: ReadyFlag,
    /// `CLIENT SETNAME` of the subscription connection, so operators (and
    /// fault tests) can find it in `CLIENT LIST`.
    pub client_name: String,
}

impl SubscriberOptions {
    pub fn new(redis: &RedisConfig, l1: &L1Config, channel: String) -> Self {
        Self {
            redis: redis.clone(),
            channel,
            heartbeat_timeout: Duration::from_millis(l1.heartbeat_timeout_ms),
            ready: ReadyFlag::default(),
            client_name: "herald-l1".into(),
        }
    }
}

/// Runs the subscriber until `shutdown` fires.
pub fn spawn(cache: L1Cache, options: SubscriberOptions, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Backoff::reconnect();
        while !shutdown.is_cancelled() {
            match subscribe_once(&cache, &options, &shutdown, &mut backoff).await {
                Ok(()) => {}
                Err(error) => tracing::warn!(%error, channel = %options.channel, "l1 subscription failed"),
            }
            cache.set_live(false);
            options.ready.set(false);
            if shutdown.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sleep(backoff.next_delay()) => {}
            }
        }
        cache.set_live(false);
        options.ready.set(false);
    })
}

/// One connection's life: returns when it ends (error, overflow) or on
/// shutdown. The cache is made not live by the caller afterwards.
async fn subscribe_once(
    cache: &L1Cache,
    options: &SubscriberOptions,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> crate::Result<()> {
    let client = build_subscriber(&options.redis)?;
    let mut messages = client.message_rx();
    let mut connection = client.init().await?;
    let result = async {
        client.client_setname(options.client_name.as_str()).await?;
        client.subscribe(options.channel.as_str()).await?;
        backoff.reset();
        tracing::info!(channel = %options.channel, "l1 subscribed, waiting for a heartbeat");
        let mut deadline = Instant::now() + options.heartbeat_timeout;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                ended = &mut connection => {
                    tracing::warn!(?ended, "l1 subscription connection ended");
                    return Ok(());
                }
                _ = sleep_until(deadline) => {
                    if cache.is_live() {
                        tracing::warn!(timeout_ms = options.heartbeat_timeout.as_millis() as u64, "l1 heartbeat missed, flushing");
                    }
                    cache.set_live(false);
                    options.ready.set(false);
                    deadline = Instant::now() + options.heartbeat_timeout;
                }
                message = messages.recv() => match message {
                    Ok(message) => {
                        let Some(bytes) = message.value.as_bytes() else { continue };
                        match wire::decode(bytes) {
                            Ok(Received::Heartbeat(_)) => {
                                deadline = Instant::now() + options.heartbeat_timeout;
                                if !cache.is_live() {
                                    tracing::info!(channel = %options.channel, "l1 live");
                                }
                                cache.set_live(true);
                                options.ready.set(true);
                            }
                            Ok(Received::Invalidations(events)) => {
                                for event in &events {
                                    cache.apply(event);
                                }
                            }
                            Ok(Received::Watermark(watermark)) => cache.apply_watermark(watermark.lsn, watermark.pg_time_us),
                            Ok(Received::Unknown) => {}
                            Err(error) => {
                                // We cannot tell what it invalidated: be safe.
                                // (The flush also ends every watch of this
                                // cache, so near caches flush too.)
                                tracing::warn!(%error, "undecodable l1 message, flushing");
                                cache.flush();
                            }
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "l1 subscriber lagged, flushing");
                        return Ok(());
                    }
                    Err(RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
    .await;
    let _ = client.quit().await;
    result
}
