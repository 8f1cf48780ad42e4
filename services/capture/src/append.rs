//! Appending events to the stream, for both sources: encoding (widening an
//! event too large to a table-wide one), the append itself (through
//! `herald_core::stream::EventLog`, each event to its tenant's partition)
//! and, with `capture.wait_replicas`, Redis `WAIT` on every master written.
//! Only after [`Appender::append`] returned may a source forget the
//! changes (delete outbox rows, confirm an LSN).

use bytes::Bytes;
use fred::prelude::*;
use herald_core::config::Config;
use herald_core::stream::EventLog;
use herald_proto::Message as _;
use herald_proto::v1::InvalidationEvent;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Appender {
    redis: Pool,
    log: EventLog,
    max_event_bytes: usize,
    stream_max_len: u64,
    wait_replicas: u32,
    wait_timeout_ms: u64,
    metrics: Metrics,
}

impl Appender {
    pub fn new(config: &Config, redis: Pool, log: EventLog, metrics: Metrics) -> Self {
        Self {
            redis,
            log,
            max_event_bytes: config.capture.max_event_bytes,
            stream_max_len: config.capture.stream_max_len,
            wait_replicas: config.capture.wait_replicas,
            wait_timeout_ms: config.capture.wait_timeout_ms,
            metrics,
        }
    }

    /// Length of the longest partition's stream, for backpressure.
    pub async fn stream_len(&self) -> Result<u64> {
        let mut longest = 0;
        for stream in self.log.streams() {
            longest = longest.max(self.redis.next().xlen::<u64, _>(stream).await?);
        }
        Ok(longest)
    }

    /// The length at which appends pause.
    pub fn stream_max_len(&self) -> u64 {
        self.stream_max_len
    }

    /// Appends `(tenant, payload)`s, each to its tenant's partition (one
    /// round trip per partition), then waits for the replicas
    /// `capture.wait_replicas` asks for.
    pub async fn append(&self, payloads: &[(String, Bytes)]) -> Result<()> {
        if payloads.is_empty() {
            return Ok(());
        }
        let client = self.redis.next();
        let events: Vec<(&str, Bytes)> = payloads.iter().map(|(t, b)| (t.as_str(), b.clone())).collect();
        let slots = self
            .log
            .append(client, &events, self.stream_max_len.saturating_mul(2))
            .instrument(tracing::debug_span!("capture.append", events = payloads.len()))
            .await?;
        self.wait_for_replicas(client, &slots).await
    }

    /// Appends an encoded freshness watermark to every partition.
    pub async fn append_watermark(&self, watermark: Bytes) -> Result<()> {
        Ok(self.log.append_watermark(self.redis.next(), watermark, self.stream_max_len.saturating_mul(2)).await?)
    }

    /// With `capture.wait_replicas` set, waits until that many replicas have
    /// the appends just made on `client`'s connection. An acknowledgement
    /// from the primary alone is not durability: a failover to a replica
    /// that lacks the entries, or a restart that loses them, would lose the
    /// invalidations while their source has already forgotten them.
    async fn wait_for_replicas(&self, client: &fred::clients::Client, slots: &[u16]) -> Result<()> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        // In a cluster, WAIT must reach every master that holds a partition
        // written to.
        let acked = herald_core::redis::wait_for_replicas(client, slots, self.wait_replicas, self.wait_timeout_ms)
            .await
            .map_err(|e| match e {
                herald_core::Error::Redis(e) => Error::Redis(e),
                other => Error::Redis(fred::error::Error::new(fred::error::ErrorKind::Unknown, other.to_string())),
            })?;
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
