//! Keeps an [`L1Cache`] coherent: subscribes to the L1 channel, applies
//! invalidations, watches broadcast's heartbeat, and makes the cache not live
//! (which flushes it) whenever it could have missed a message: the
//! connection dropped, the local queue overflowed, or heartbeats stopped.
//!
//! With a partitioned log there is one L1 channel per partition (each on
//! its partition's slot); the holder subscribes to all of them on one
//! subscriber client (`SSUBSCRIBE` per shard on a cluster) and is live only
//! while heartbeats arrive on every one. On a cluster a lost connection to
//! any shard (a killed master) ends the subscription; a slot that changed
//! master with the connection up (`CLUSTER FAILOVER`, a migration) took its
//! sharded subscription with it, which the holder sees by comparing the slot
//! map every `redis.topology_check_ms` ([`SlotMap`]); a missed heartbeat is
//! the backstop. Each flushes the cache and subscribes again from scratch.

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
use crate::redis::{SlotMap, build_subscriber};
use herald_proto::v1::Watermark;

/// Where and how to subscribe.
#[derive(Clone)]
pub struct SubscriberOptions {
    pub redis: RedisConfig,
    /// The L1 channels, one per partition (`KeySpace::l1_channels`).
    pub channels: Vec<String>,
    pub heartbeat_timeout: Duration,
    /// Set while the subscription is up and heartbeats arrive.
    pub ready: ReadyFlag,
    /// `CLIENT SETNAME` of the subscription connection, so operators (and
    /// fault tests) can find it in `CLIENT LIST`.
    pub client_name: String,
}

impl SubscriberOptions {
    pub fn new(redis: &RedisConfig, l1: &L1Config, channels: Vec<String>) -> Self {
        Self {
            redis: redis.clone(),
            channels,
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
                Err(error) => tracing::warn!(%error, channels = ?options.channels, "l1 subscription failed"),
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
        let slot_map = SlotMap::cached(&client);
        let mut topology_check = tokio::time::interval(Duration::from_millis(options.redis.topology_check_ms));
        topology_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        crate::redis::subscribe(&client, options.channels.clone()).await?;
        backoff.reset();
        tracing::info!(channels = ?options.channels, "l1 subscribed, waiting for a heartbeat");
        let mut heartbeats = Heartbeats::new(&options.channels, options.heartbeat_timeout);
        let mut watermarks = Watermarks::new(&options.channels);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                ended = &mut connection => {
                    tracing::warn!(?ended, "l1 subscription connection ended");
                    return Ok(());
                }
                _ = topology_check.tick(), if client.is_clustered() => {
                    if slot_map.changed(&client).await? {
                        tracing::warn!("l1: a slot changed master (its sharded subscription is gone), flushing and subscribing again");
                        return Ok(());
                    }
                }
                _ = sleep_until(heartbeats.deadline()) => {
                    if cache.is_live() {
                        tracing::warn!(timeout_ms = options.heartbeat_timeout.as_millis() as u64, "l1 heartbeat missed, flushing");
                    }
                    cache.set_live(false);
                    options.ready.set(false);
                    if client.is_clustered() {
                        // Backstop of the topology check: a subscription
                        // may be gone without the connection: subscribe again.
                        return Ok(());
                    }
                    heartbeats.restart();
                }
                message = messages.recv() => match message {
                    Ok(message) => {
                        let Some(bytes) = message.value.as_bytes() else { continue };
                        match wire::decode(bytes) {
                            Ok(Received::Heartbeat(_)) => {
                                if heartbeats.heard(&message.channel) {
                                    if !cache.is_live() {
                                        tracing::info!(channels = options.channels.len(), "l1 live");
                                    }
                                    cache.set_live(true);
                                    options.ready.set(true);
                                }
                            }
                            Ok(Received::Invalidations(events)) => {
                                for event in &events {
                                    cache.apply(event);
                                }
                            }
                            Ok(Received::Watermark(watermark)) => {
                                if let Some(low) = watermarks.record(&message.channel, watermark) {
                                    cache.apply_watermark(low.lsn, low.pg_time_us);
                                }
                            }
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

/// When each L1 channel last carried a heartbeat.
struct Heartbeats {
    channels: Vec<String>,
    /// Per channel: the last heartbeat since [`Heartbeats::restart`].
    last: Vec<Option<Instant>>,
    since: Instant,
    timeout: Duration,
}

impl Heartbeats {
    fn new(channels: &[String], timeout: Duration) -> Self {
        Self { channels: channels.to_vec(), last: vec![None; channels.len()], since: Instant::now(), timeout }
    }

    /// Forgets every heartbeat: the cache is live again only once each
    /// channel has carried a new one.
    fn restart(&mut self) {
        self.last.iter_mut().for_each(|t| *t = None);
        self.since = Instant::now();
    }

    /// Records a heartbeat on `channel`; true when every channel has one
    /// within the timeout (the cache may be live).
    fn heard(&mut self, channel: &str) -> bool {
        let now = Instant::now();
        if let Some(i) = self.channels.iter().position(|c| c == channel) {
            self.last[i] = Some(now);
        }
        self.last.iter().all(|t| t.is_some_and(|t| now.duration_since(t) < self.timeout))
    }

    /// When the stalest channel is overdue (an unheard one: a timeout after
    /// subscribing or the last restart).
    fn deadline(&self) -> Instant {
        self.last.iter().map(|t| t.unwrap_or(self.since)).min().unwrap_or(self.since) + self.timeout
    }
}

/// The newest watermark of each L1 channel (partition). Every partition
/// holds a copy of each watermark, and each is forwarded once its own
/// partition is applied: the cache has applied everything up to the lowest
/// of them.
struct Watermarks {
    channels: Vec<String>,
    last: Vec<Option<Watermark>>,
}

impl Watermarks {
    fn new(channels: &[String]) -> Self {
        Self { channels: channels.to_vec(), last: vec![None; channels.len()] }
    }

    /// Records `watermark` from `channel`; the lowest over every channel,
    /// once each has carried one.
    fn record(&mut self, channel: &str, watermark: Watermark) -> Option<Watermark> {
        let i = self.channels.iter().position(|c| c == channel)?;
        let last = &mut self.last[i];
        if last.is_none_or(|w| w.lsn < watermark.lsn) {
            *last = Some(watermark);
        }
        let all: Option<Vec<Watermark>> = self.last.iter().copied().collect();
        all?.into_iter().min_by_key(|w| w.lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_watermark_is_the_lowest_partition_s() {
        let channels = vec!["a".to_string(), "b".to_string()];
        let mut marks = Watermarks::new(&channels);
        let w = |lsn| Watermark { lsn, pg_time_us: lsn as i64 * 10 };
        assert_eq!(marks.record("a", w(5)), None, "b has carried none");
        assert_eq!(marks.record("other", w(9)), None);
        assert_eq!(marks.record("b", w(7)), Some(w(5)));
        assert_eq!(marks.record("a", w(9)), Some(w(7)));
        assert_eq!(marks.record("a", w(3)), Some(w(7)), "an older watermark changes nothing");
    }

    #[test]
    fn live_only_when_every_partition_channel_has_a_heartbeat() {
        let channels = vec!["a".to_string(), "b".to_string()];
        let mut heartbeats = Heartbeats::new(&channels, Duration::from_secs(60));
        assert!(!heartbeats.heard("a"), "b has not been heard");
        assert!(!heartbeats.heard("other"));
        assert!(heartbeats.heard("b"));
        let due = heartbeats.deadline();
        heartbeats.restart();
        assert!(heartbeats.deadline() >= due - Duration::from_secs(1));
        assert!(!heartbeats.heard("b"), "a restart forgets a's heartbeat");
        assert!(heartbeats.heard("a"));
    }
}
