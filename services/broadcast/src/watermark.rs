//! Forwarding freshness watermarks from the event stream to the L1 channel.
//!
//! Capture appends a watermark after every event of the changes committed up
//! to its position. Several broadcast consumers share the stream and apply
//! entries out of order, so the consumer that reads a watermark forwards it
//! only when no entry before it is still pending in the group: each of those
//! was then applied (L2 deleted, L1 invalidation published) and acknowledged
//! before this check, so an L1 holder reads the watermark after every
//! invalidation it covers. A watermark still held back after
//! [`HOLD_AT_MOST`] is dropped: the next one covers it.

use std::time::Duration;

use fred::prelude::*;
use fred::types::Value;
use herald_proto::v1::Watermark;
use tokio::time::{Instant, sleep};

use crate::metrics::Metrics;

/// How long a watermark waits for older pending entries (a slow consumer,
/// one that died and whose entries are not claimed yet) before it is
/// dropped.
pub const HOLD_AT_MOST: Duration = Duration::from_secs(2);

/// How often a held watermark checks again.
const RECHECK: Duration = Duration::from_millis(5);

/// Forwards watermarks read by one consumer.
#[derive(Clone)]
pub struct Forwarder {
    redis: Pool,
    stream: String,
    group: String,
    channel: String,
    metrics: Metrics,
}

impl Forwarder {
    pub fn new(redis: Pool, stream: String, group: String, channel: String, metrics: Metrics) -> Self {
        Self { redis, stream, group, channel, metrics }
    }

    /// Forwards `watermark`, read at stream entry `entry_id` and already
    /// acknowledged, once nothing before it is pending: at once if it can,
    /// else from a task of its own so the consumer does not wait.
    pub async fn forward(&self, entry_id: String, watermark: Watermark) {
        match self.try_forward(&entry_id, watermark).await {
            Ok(true) => {}
            Ok(false) => {
                let this = self.clone();
                tokio::spawn(async move { this.hold(entry_id, watermark).await });
            }
            Err(error) => tracing::debug!(%error, "watermark not forwarded; the next one covers it"),
        }
    }

    async fn hold(&self, entry_id: String, watermark: Watermark) {
        let deadline = Instant::now() + HOLD_AT_MOST;
        while Instant::now() < deadline {
            sleep(RECHECK).await;
            match self.try_forward(&entry_id, watermark).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => tracing::debug!(%error, "watermark check failed"),
            }
        }
        self.metrics.watermarks_dropped.inc();
        tracing::debug!(
            entry_id,
            lsn = watermark.lsn,
            "watermark held back too long by older pending entries; dropped"
        );
    }

    /// Publishes `watermark` if no entry before `entry_id` is pending.
    async fn try_forward(&self, entry_id: &str, watermark: Watermark) -> Result<bool, fred::error::Error> {
        if self.older_pending(entry_id).await? {
            return Ok(false);
        }
        herald_core::l1::wire::publish_watermark(&self.redis, &self.channel, watermark)
            .await
            .map_err(crate::apply::core_to_redis)?;
        self.metrics.watermarks_forwarded.inc();
        Ok(true)
    }

    /// Whether some entry before `entry_id` is read but not acknowledged in
    /// the group. (Every entry before it was delivered: this consumer read
    /// `entry_id` with `>`.)
    async fn older_pending(&self, entry_id: &str) -> Result<bool, fred::error::Error> {
        let end = format!("({entry_id}");
        let reply: Value = self.redis.next().xpending(&self.stream, &self.group, ("-", end.as_str(), 1)).await?;
        Ok(matches!(reply, Value::Array(pending) if !pending.is_empty()))
    }
}
