//! Appending events to the stream, for both sources: encoding (widening an
//! event too large to a table-wide one), the append itself (through
//! `herald_core::stream`) and, with `capture.wait_replicas`, Redis `WAIT`.
//! Only after [`Appender::append`] returned may a source forget the
//! changes (delete outbox rows, confirm an LSN).

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use herald_core::config::Config;
use herald_proto::Message as _;
use herald_proto::v1::InvalidationEvent;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Appender {
    redis: Pool,
    stream: String,
    max_event_bytes: usize,
    stream_max_len: u64,
    wait_replicas: u32,
    wait_timeout_ms: u64,
    metrics: Metrics,
}

impl Appender {
    pub fn new(config: &Config, redis: Pool, stream: String, metrics: Metrics) -> Self {
        Self {
            redis,
            stream,
            max_event_bytes: config.capture.max_event_bytes,
            stream_max_len: config.capture.stream_max_len,
            wait_replicas: config.capture.wait_replicas,
            wait_timeout_ms: config.capture.wait_timeout_ms,
            metrics,
        }
    }

    /// Length of the stream, for backpressure.
    pub async fn stream_len(&self) -> Result<u64> {
        Ok(self.redis.next().xlen(&self.stream).await?)
    }

    /// The length at which appends pause.
    pub fn stream_max_len(&self) -> u64 {
        self.stream_max_len
    }

    /// Appends `payloads` in one round trip, then waits for the replicas
    /// `capture.wait_replicas` asks for.
    pub async fn append(&self, payloads: &[Bytes]) -> Result<()> {
        if payloads.is_empty() {
            return Ok(());
        }
        let client = self.redis.next();
        herald_core::stream::append(client, &self.stream, payloads, self.stream_max_len.saturating_mul(2))
            .instrument(tracing::debug_span!("capture.append", events = payloads.len()))
            .await?;
        self.wait_for_replicas(client).await
    }

    /// With `capture.wait_replicas` set, waits until that many replicas have
    /// the appends just made on `client`'s connection. An acknowledgement
    /// from the primary alone is not durability: a failover to a replica
    /// that lacks the entries, or a restart that loses them, would lose the
    /// invalidations while their source has already forgotten them.
    async fn wait_for_replicas(&self, client: &fred::clients::Client) -> Result<()> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        // In a cluster, WAIT must reach the node that holds the stream.
        let slot = fred::util::redis_keyslot(self.stream.as_bytes());
        let wait = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), true);
        let args = vec![i64::from(self.wait_replicas), i64::try_from(self.wait_timeout_ms).unwrap_or(i64::MAX)];
        let acked: i64 = client.custom(wait, args).await?;
        if acked < i64::from(self.wait_replicas) {
            self.metrics.unreplicated.inc();
            tracing::warn!(
                acked,
                wanted = self.wait_replicas,
                "too few redis replicas acknowledged the appends; the changes are kept and appended again"
            );
            return Err(Error::NotReplicated { acked, wanted: self.wait_replicas });
        }
        Ok(())
    }

    /// Encodes `event`, widening it to a table-wide invalidation when it
    /// would not fit `capture.max_event_bytes`.
    pub fn encode(&self, event: &InvalidationEvent) -> Bytes {
        let bytes = event.encode_to_vec();
        if bytes.len() <= self.max_event_bytes {
            return bytes.into();
        }
        self.metrics.widened.inc();
        tracing::warn!(event_id = %event.event_id, bytes = bytes.len(), "event too large, widened to a table-wide invalidation");
        let mut widened = event.clone();
        widened.ids.clear();
        widened.tags = vec![event.table.clone()];
        widened.widened = true;
        if widened.encoded_len() > self.max_event_bytes {
            widened.teams.clear();
        }
        widened.encode_to_vec().into()
    }
}
