//! The node's Redis subscription connection: keeps its channel set equal to
//! the hub's wanted set (subscribing and unsubscribing in batches), feeds
//! publications to the hub, and after a reconnect, a lag or a slot that
//! changed master (cluster) catches every channel up from history.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use herald_core::backoff::Backoff;
use herald_core::channel::Publication;
use herald_core::config::RedisConfig;
use herald_core::ops::ReadyFlag;
use herald_core::redis::SlotMap;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, Last};
use crate::metrics::Metrics;

/// Channels per SUBSCRIBE / UNSUBSCRIBE command.
const BATCH: usize = 1000;

/// Publications handed to the hub together at most.
const MAX_BATCH: usize = 512;

/// Publications that arrived together, by channel, each channel's in order.
#[derive(Default)]
struct Batch {
    channels: Vec<(String, Vec<Publication>)>,
    count: usize,
}

impl Batch {
    fn add(&mut self, message: fred::types::Message, metrics: &Metrics) {
        let Some(p) = message.value.as_bytes().and_then(Publication::decode_pubsub) else {
            metrics.malformed_messages.inc();
            return;
        };
        self.count += 1;
        let channel = message.channel.to_string();
        match self.channels.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, pubs)) => pubs.push(p),
            None => self.channels.push((channel, vec![p])),
        }
    }
}

/// Runs until `shutdown` fires, reconnecting with backoff.
pub async fn run(
    hub: Arc<Hub>,
    redis_config: RedisConfig,
    pool: Pool,
    ready: ReadyFlag,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::reconnect();
    while !shutdown.is_cancelled() {
        if let Err(error) = session(&hub, &redis_config, &pool, &ready, &metrics, &mut backoff, &shutdown).await {
            tracing::warn!(%error, "gateway redis subscription failed; delivering locally only");
        }
        hub.set_redis_up(false);
        ready.set(false);
        metrics.redis_channels.set(0);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn session(
    hub: &Hub,
    redis_config: &RedisConfig,
    pool: &Pool,
    ready: &ReadyFlag,
    metrics: &Metrics,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<(), fred::error::Error> {
    let client = herald_core::redis::build_subscriber(redis_config).map_err(to_redis)?;
    let mut messages = client.message_rx();
    let mut connection = client.init().await?;
    let result = async {
        let mut subscribed = HashSet::new();
        // A slot that changes master drops its sharded subscriptions with
        // the connection up: compare the slot map now and then, and start
        // over (subscribe again, catch up from history) when it changed.
        let slot_map = SlotMap::cached(&client);
        let mut topology_check = tokio::time::interval(Duration::from_millis(redis_config.topology_check_ms));
        topology_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile(&client, pool, hub, &mut subscribed, metrics).await?;
        hub.set_redis_up(true);
        // Publications made while this node was not subscribed, before
        // saying it is ready (new ones wait in the subscription's buffer).
        hub.catch_up_all(pool).await;
        ready.set(true);
        backoff.reset();
        tracing::info!(channels = subscribed.len(), "gateway redis subscription live");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                ended = &mut connection => {
                    tracing::warn!(?ended, "gateway redis subscription connection ended");
                    return Ok(());
                }
                _ = topology_check.tick(), if client.is_clustered() => {
                    if slot_map.changed(&client).await.map_err(to_redis)? {
                        tracing::warn!("a slot changed master (its sharded subscriptions are gone); subscribing again");
                        return Ok(());
                    }
                }
                _ = hub.dirty.notified() => reconcile(&client, pool, hub, &mut subscribed, metrics).await?,
                message = messages.recv() => match message {
                    Ok(message) => {
                        // Whatever else has arrived goes out with it: a
                        // socket then takes a run of publications in one write.
                        let mut batch = Batch::default();
                        batch.add(message, metrics);
                        let mut lagged = None;
                        while batch.count < MAX_BATCH {
                            match messages.try_recv() {
                                Ok(message) => batch.add(message, metrics),
                                Err(TryRecvError::Lagged(missed)) => {
                                    lagged = Some(missed);
                                    break;
                                }
                                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                            }
                        }
                        for (channel, pubs) in batch.channels {
                            hub.on_publications(pool, &channel, pubs).await;
                        }
                        if let Some(missed) = lagged {
                            tracing::warn!(missed, "gateway subscriber lagged; catching up from history");
                            hub.catch_up_all(pool).await;
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "gateway subscriber lagged; catching up from history");
                        hub.catch_up_all(pool).await;
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
    .await;
    let _ = client.quit().await;
    result
}

/// Subscribes to wanted channels and unsubscribes from unwanted ones.
async fn reconcile(
    client: &SubscriberClient,
    pool: &Pool,
    hub: &Hub,
    subscribed: &mut HashSet<String>,
    metrics: &Metrics,
) -> Result<(), fred::error::Error> {
    let wanted = hub.wanted();
    let add: Vec<String> = wanted.difference(subscribed).cloned().collect();
    let remove: Vec<String> = subscribed.difference(&wanted).cloned().collect();
    for chunk in add.chunks(BATCH) {
        herald_core::redis::subscribe(client, chunk.to_vec()).await.map_err(to_redis)?;
        subscribed.extend(chunk.iter().cloned());
        // Each new channel's position, read after the subscription is
        // confirmed: from here on a jump in offsets is a detectable gap.
        for (pubsub, tenant, channel) in hub.unknown_positions(chunk) {
            match herald_core::channel::history_since(pool, hub.keys(), &tenant, &channel, 0, 0).await {
                Ok(h) => hub.set_position(&pubsub, h.epoch.map_or(Last::Empty, |e| Last::At(e.into(), h.offset))),
                Err(error) => tracing::debug!(%error, %channel, "position not read; the first publication sets it"),
            }
        }
    }
    for chunk in remove.chunks(BATCH) {
        herald_core::redis::unsubscribe(client, chunk.to_vec()).await.map_err(to_redis)?;
        for name in chunk {
            subscribed.remove(name);
        }
    }
    hub.mark_active(subscribed);
    metrics.redis_channels.set(subscribed.len() as i64);
    Ok(())
}

fn to_redis(error: herald_core::Error) -> fred::error::Error {
    match error {
        herald_core::Error::Redis(e) => e,
        other => fred::error::Error::new(fred::error::ErrorKind::Config, other.to_string()),
    }
}
