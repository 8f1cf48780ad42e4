//! Broadcast: Herald's event log into effects.
//!
//! Reads the event stream in a consumer group (instances share the work);
//! for each event deletes the L2 entries its tags name, publishes the
//! invalidation on the L1 channel and, for tables with a team column, a
//! change publication on each touched `team:{id}` channel (when the gateway
//! config has a `team` namespace), then acknowledges. Pending entries of
//! consumers that died are claimed (`XAUTOCLAIM`) and applied. A heartbeat
//! on the L1 channel tells L1 holders that invalidations are flowing; it
//! stops when this instance cannot apply, so holders flush rather than serve
//! stale entries.

pub mod apply;
pub mod metrics;
pub mod stats;
pub mod watch;
pub mod watermark;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use fred::prelude::*;
use herald_core::backoff::Backoff;
use herald_core::channel::HistoryOptions;
use herald_core::config::{BroadcastConfig, Config, ms};
use herald_core::keys::KeySpace;
use herald_core::ops::{self, ReadyFlag};
use herald_core::ops_channel::OpsChannel;
use herald_core::time::now_us;
use tokio::net::TcpListener;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use crate::apply::{Applier, core_to_redis};
use crate::metrics::Metrics;
use herald_core::stream::{EventLog, autoclaim_entries, read_group_entries};

/// This instance's consumer name: `broadcast.consumer`, else `$HOSTNAME`
/// (the pod name on Kubernetes), else `broadcast`. Stable across restarts,
/// so a restarted instance first re-reads the entries it had read but not
/// acknowledged.
pub fn consumer_name(config: &BroadcastConfig, env: impl Fn(&str) -> Option<String>) -> String {
    config.consumer.clone().or_else(|| env("HOSTNAME").filter(|h| !h.is_empty())).unwrap_or_else(|| "broadcast".into())
}

/// Runs broadcast until `shutdown` fires, as consumer `consumer` (see
/// [`consumer_name`]). Serves the ops endpoints on `ops`.
pub async fn run(
    config: Config,
    ops: TcpListener,
    consumer: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::default();
    let (readiness, ops_task) = ops::start(ops, |registry| metrics.register(registry), &config.http, shutdown.clone());

    let keys = KeySpace::new(&config.env)?;
    let redis = herald_core::redis::build_pool(&config.redis)?;
    let _connections = redis.connect();
    let teams =
        config.gateway.namespace("team").map(|ns| HistoryOptions { size: ns.history_size, ttl_s: ns.history_ttl_s });
    let log = EventLog::new(&keys, config.redis.partitions);
    let n = log.partitions();
    // Per partition: time of the last successful read-and-apply, for the
    // heartbeat on its L1 channel and for readiness.
    let last_ok: Arc<[AtomicI64]> = (0..n).map(|_| AtomicI64::new(0)).collect();
    let healthy_within = ms(config.broadcast.block_ms) + Duration::from_secs(2);
    let stats = stats::Stats::default();
    let ready = readiness.flag("redis");

    let heartbeat = tokio::spawn(heartbeat_loop(
        redis.clone(),
        keys.l1_channels(n),
        consumer.clone(),
        ms(config.broadcast.heartbeat_ms),
        healthy_within,
        last_ok.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let trimmers: Vec<_> = log
        .streams()
        .iter()
        .map(|stream| {
            tokio::spawn(trim_loop(
                redis.clone(),
                stream.clone(),
                config.broadcast.group.clone(),
                metrics.clone(),
                stats.stream_unread.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    let stats_task = OpsChannel::from_config(&config.gateway).map(|ops| {
        let mut message = stats::StatsMessage::new(consumer.clone(), metrics.clone(), stats.clone());
        tokio::spawn(
            ops.publish_every(redis.clone(), keys.clone(), shutdown.clone(), move |elapsed| message.next(elapsed)),
        )
    });

    tracing::info!(streams = ?log.streams(), group = %config.broadcast.group, %consumer, "broadcast started");
    let consumers =
        (0..n).map(|i| {
            let applier = Applier::new(redis.clone(), keys.clone(), config.broadcast.group.clone(), metrics.clone())
                .with_team_channels(teams)
                .with_stats(stats.clone())
                .for_partition(i, n)
                .with_replica_wait(config.broadcast.wait_replicas, config.broadcast.wait_timeout_ms);
            let partition = Partition { stream: log.streams()[usize::from(i)].clone(), index: usize::from(i) };
            let (config, redis, consumer, last_ok, ready, shutdown) =
                (&config, &redis, &consumer, &last_ok, &ready, &shutdown);
            async move {
                consume(config, redis, &partition, &applier, consumer, last_ok, healthy_within, ready, shutdown).await
            }
        });
    futures::future::join_all(consumers).await;

    tracing::info!("broadcast stopping");
    let _ = heartbeat.await;
    for trimmer in trimmers {
        let _ = trimmer.await;
    }
    if let Some(task) = stats_task {
        let _ = task.await;
    }
    let _ = redis.quit().await;
    let _ = ops_task.await;
    Ok(())
}

/// One partition of the log, as one consumer loop reads it.
struct Partition {
    stream: String,
    /// Its place in the per-partition health.
    index: usize,
}

/// Whether every partition's consumer succeeded within `within`.
fn all_healthy(last_ok: &[AtomicI64], within: Duration) -> bool {
    let now = now_us();
    last_ok.iter().all(|t| now - t.load(Ordering::Relaxed) <= within.as_micros() as i64)
}

/// Reads and applies one partition until `shutdown` fires. Instances share
/// each partition through the consumer group.
#[allow(clippy::too_many_arguments)]
async fn consume(
    config: &Config,
    redis: &Pool,
    partition: &Partition,
    applier: &Applier,
    consumer: &str,
    last_ok: &[AtomicI64],
    healthy_within: Duration,
    ready: &ReadyFlag,
    shutdown: &CancellationToken,
) {
    let stream = partition.stream.clone();
    let group = config.broadcast.group.as_str();
    let claim_idle = config.broadcast.claim_idle_ms;
    let claim_every = ms(claim_idle / 2).max(Duration::from_millis(100));
    let mut next_claim = tokio::time::Instant::now();
    let mut backoff = Backoff::reconnect();
    let mut group_ready = false;
    // After an error, first re-read this consumer's own pending entries.
    let mut own_pending = true;

    while !shutdown.is_cancelled() {
        let step = async {
            if !group_ready {
                herald_core::redis::ensure_group(redis, &stream, group).await.map_err(core_to_redis)?;
                group_ready = true;
            }
            if own_pending {
                let reply: Value = redis
                    .next()
                    .xreadgroup(group, consumer, Some(config.broadcast.read_count), None, false, stream.as_str(), "0")
                    .await?;
                let entries = read_group_entries(reply);
                if entries.is_empty() {
                    own_pending = false;
                } else {
                    applier.apply(entries).await?;
                }
                return Ok::<_, fred::error::Error>(());
            }
            if tokio::time::Instant::now() >= next_claim {
                next_claim = tokio::time::Instant::now() + claim_every;
                let mut cursor = "0-0".to_string();
                loop {
                    let reply: Value = redis
                        .next()
                        .xautoclaim(
                            &stream,
                            group,
                            consumer,
                            claim_idle,
                            cursor.as_str(),
                            Some(config.broadcast.read_count),
                            false,
                        )
                        .await?;
                    let (next, entries, deleted) = autoclaim_entries(reply);
                    if !entries.is_empty() || !deleted.is_empty() {
                        tracing::info!(
                            claimed = entries.len(),
                            deleted = deleted.len(),
                            "claimed pending entries of an idle consumer"
                        );
                        applier.metrics().claimed.inc_by((entries.len() + deleted.len()) as u64);
                    }
                    applier.apply(entries).await?;
                    if !deleted.is_empty() {
                        // Trimmed before anyone applied them: nothing to apply.
                        let _: i64 = redis.next().xack(&stream, group, deleted).await?;
                    }
                    if next == "0-0" {
                        break;
                    }
                    cursor = next;
                }
            }
            let block = config.broadcast.block_ms;
            let reply: Value = redis
                .next()
                .xreadgroup(
                    group,
                    consumer,
                    Some(config.broadcast.read_count),
                    Some(block),
                    false,
                    stream.as_str(),
                    ">",
                )
                .await?;
            applier.apply(read_group_entries(reply)).await?;
            Ok(())
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = step => result,
        };
        match result {
            Ok(()) => {
                last_ok[partition.index].store(now_us(), Ordering::Relaxed);
                ready.set(all_healthy(last_ok, healthy_within));
                backoff.reset();
            }
            Err(error) => {
                applier.metrics().errors.inc();
                ready.set(false);
                own_pending = true;
                if error.details().contains("NOGROUP") {
                    group_ready = false;
                }
                tracing::warn!(%error, "apply failed; entries stay pending and are retried");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Publishes a heartbeat every `period` on the L1 channel of each partition
/// whose consumer loop is healthy (it succeeded within `healthy_within`).
#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    redis: Pool,
    channels: Vec<String>,
    instance: String,
    period: Duration,
    healthy_within: Duration,
    last_ok: Arc<[AtomicI64]>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for (channel, last_ok) in channels.iter().zip(last_ok.iter()) {
            let since_ok = now_us() - last_ok.load(Ordering::Relaxed);
            if since_ok > healthy_within.as_micros() as i64 {
                continue;
            }
            match herald_core::l1::wire::publish_heartbeat(&redis, channel, &instance).await {
                Ok(_) => {
                    metrics.heartbeats.inc();
                }
                Err(error) => tracing::debug!(%error, %channel, "heartbeat not published"),
            }
        }
    }
}

/// Trims entries every group has acknowledged (never an unread or pending
/// one), and samples the group's pending count.
async fn trim_loop(
    redis: Pool,
    stream: String,
    group: String,
    metrics: Metrics,
    unread: Arc<AtomicI64>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep(Duration::from_secs(1)) => {}
        }
        if let Err(error) = trim_once(&redis, &stream, &group, &metrics, &unread).await {
            tracing::debug!(%error, "stream trim skipped");
        }
    }
}

async fn trim_once(
    redis: &Pool,
    stream: &str,
    own_group: &str,
    metrics: &Metrics,
    unread: &AtomicI64,
) -> Result<(), fred::error::Error> {
    let groups: Value = redis.next().xinfo_groups(stream).await?;
    let Value::Array(groups) = groups else { return Ok(()) };
    let mut min_id: Option<(u64, u64)> = None;
    for group in groups {
        let fields: std::collections::HashMap<String, Value> = group.convert()?;
        let name = fields.get("name").and_then(|v| v.as_string()).unwrap_or_default();
        let pending = fields.get("pending").and_then(|v| v.as_i64()).unwrap_or(0);
        if name == own_group {
            metrics.pending.set(pending);
            // Redis 7 reports how many entries the group has not read yet.
            unread.store(fields.get("lag").and_then(|v| v.as_i64()).unwrap_or(0), Ordering::Relaxed);
        }
        let last = fields.get("last-delivered-id").and_then(|v| v.as_string()).unwrap_or_default();
        let mut bound = parse_id(&last);
        if pending > 0 {
            // XPENDING summary: [count, smallest id, greatest id, consumers].
            let summary: Value = redis.next().xpending(stream, name.as_str(), ()).await?;
            if let Value::Array(parts) = summary
                && let Some(smallest) = parts.get(1).and_then(|v| v.as_string())
            {
                bound = parse_id(&smallest);
            }
        }
        let Some(bound) = bound else { return Ok(()) };
        min_id = Some(min_id.map_or(bound, |m| m.min(bound)));
    }
    if let Some((ms, seq)) = min_id {
        // MINID keeps entries with id >= bound: the oldest pending entry, or
        // the last delivered one, survive.
        let _: i64 = redis.next().xtrim(stream, ("MINID", "~", format!("{ms}-{seq}"))).await?;
    }
    Ok(())
}

fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_name_is_stable_across_restarts() {
        let mut config = BroadcastConfig::default();
        let host = |v: &str| (v == "HOSTNAME").then(|| "broadcast-7f9c".to_string());
        assert_eq!(consumer_name(&config, host), "broadcast-7f9c");
        assert_eq!(consumer_name(&config, host), consumer_name(&config, host));
        assert_eq!(consumer_name(&config, |_| None), "broadcast");
        config.consumer = Some("b-1".into());
        assert_eq!(consumer_name(&config, host), "b-1");
    }
}
