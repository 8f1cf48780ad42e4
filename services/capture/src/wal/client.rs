//! The replication connection behind a small trait, so the client crate can
//! be replaced without touching the capture loop.
//!
//! The implementation uses `pgwire-replication`: it speaks the replication
//! protocol (`START_REPLICATION … pgoutput`, protocol 1, `messages 'true'`),
//! frames Begin, Commit and logical-decoding messages, answers keepalives
//! and reports only the LSN the caller declares durable. Relation and row
//! messages arrive raw and are decoded in `pgoutput.rs`.

use std::future::Future;
use std::time::Duration;

use herald_core::config::PostgresConfig;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};

use super::pgoutput::PG_EPOCH_OFFSET_US;
pub use super::pgoutput::WalMessage;

/// Why the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Another connection streams this slot (SQLSTATE 55006): stand by.
    #[error("replication slot is active in another connection: {0}")]
    SlotActive(String),
    /// The slot does not exist (SQLSTATE 42704).
    #[error("replication slot does not exist: {0}")]
    SlotMissing(String),
    #[error("replication: {0}")]
    Other(String),
}

/// A logical replication stream of one slot.
pub trait ReplicationStream: Send {
    /// The next message; `None` when the server ended the stream.
    fn recv(&mut self) -> impl Future<Output = Result<Option<WalMessage>, StreamError>> + Send;
    /// Declares everything up to `lsn` durable: the server may release it.
    fn confirm(&self, lsn: u64);
}

/// Where and how to stream.
#[derive(Debug, Clone)]
pub struct StreamTarget {
    pub slot: String,
    pub publication: String,
    /// Resume here (the slot's confirmed position); 0 lets the server pick it.
    pub start_lsn: u64,
    /// Status updates at least this often, so confirmed positions reach the
    /// server soon after they are made.
    pub status_interval: Duration,
    /// Messages buffered between the socket and capture.
    pub buffer: usize,
}

/// Connects a `pgwire-replication` stream.
pub async fn connect(postgres: &PostgresConfig, target: &StreamTarget) -> Result<PgwireStream, StreamError> {
    let pg: tokio_postgres::Config =
        postgres.url.parse().map_err(|e| StreamError::Other(format!("postgres.url: {e}")))?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "127.0.0.1".to_string(),
    };
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let config = ReplicationConfig::new(
        host,
        pg.get_user().unwrap_or("postgres"),
        password,
        pg.get_dbname().unwrap_or("postgres"),
        target.slot.clone(),
        target.publication.clone(),
    )
    .with_port(pg.get_ports().first().copied().unwrap_or(5432))
    .with_start_lsn(Lsn::from_u64(target.start_lsn))
    .with_status_interval(target.status_interval)
    .with_wakeup_interval(target.status_interval)
    .with_buffer_size(target.buffer)
    .with_application_name("herald-capture wal");
    let mut client = ReplicationClient::connect(config).await.map_err(classify)?;
    client.wait_started().await.map_err(classify)?;
    Ok(PgwireStream { client })
}

/// The `pgwire-replication` implementation.
pub struct PgwireStream {
    client: ReplicationClient,
}

impl ReplicationStream for PgwireStream {
    async fn recv(&mut self) -> Result<Option<WalMessage>, StreamError> {
        loop {
            let Some(event) = self.client.recv().await.map_err(classify)? else { return Ok(None) };
            return Ok(Some(match event {
                ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => WalMessage::Begin {
                    final_lsn: final_lsn.as_u64(),
                    xid,
                    commit_time_us: commit_time_micros + PG_EPOCH_OFFSET_US,
                },
                ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => WalMessage::Commit {
                    lsn: lsn.as_u64(),
                    end_lsn: end_lsn.as_u64(),
                    commit_time_us: commit_time_micros + PG_EPOCH_OFFSET_US,
                },
                ReplicationEvent::XLogData { data, .. } => WalMessage::Change(data),
                ReplicationEvent::Message { transactional, prefix, content, .. } => {
                    WalMessage::Message { transactional, prefix, content }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => WalMessage::KeepAlive { wal_end: wal_end.as_u64() },
                // Only with a stop position, which capture never sets.
                ReplicationEvent::StoppedAt { .. } => continue,
            }));
        }
    }

    fn confirm(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }
}

impl Drop for PgwireStream {
    fn drop(&mut self) {
        // A hard stop: the server ends the walsender when the socket closes,
        // and the slot becomes free for a standby at once.
        self.client.abort();
    }
}

fn classify(error: PgWireError) -> StreamError {
    let text = error.to_string();
    if text.contains("SQLSTATE 55006") {
        StreamError::SlotActive(text)
    } else if text.contains("SQLSTATE 42704") {
        StreamError::SlotMissing(text)
    } else {
        StreamError::Other(text)
    }
}
