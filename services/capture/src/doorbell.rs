//! The doorbell: a dedicated (unpooled) connection that LISTENs for writers'
//! NOTIFY while capture is idle, and a lease that tells writers to skip the
//! NOTIFY (and its commit-time global lock) while capture drains.
//!
//! Protocol (the writer's side is `herald.ring()` in `schema::base_sql`):
//! * busy: capture keeps `herald.doorbell_lease` a little in the future
//!   (renewed every `LEASE_MS / 3`); writers that read a live lease skip the
//!   NOTIFY; capture drains and polls continuously.
//! * busy → idle: capture stops renewing and, once the lease has expired,
//!   waits until every transaction that existed at that moment has ended
//!   (snapshot xmin passes the xmax it noted). A writer that read a live
//!   lease had its transaction id before the expiry, so after the wait its
//!   rows are committed (or rolled back) and the final drain sees them.
//!   Every later writer rings. No wake-up is lost.
//! * idle → busy: on a NOTIFY (or the backstop poll finding rows), capture
//!   renews the lease.
//!
//! A capture that dies stops renewing; within `LEASE_MS` writers ring again.

use std::time::{Duration, Instant};

use herald_core::config::PostgresConfig;
use tokio::sync::mpsc;
use tokio_postgres::{Client, Notification};

use crate::error::Result;
use crate::schema::{DOORBELL_CHANNEL, LEASE_MS};

/// How long one idle attempt waits for in-flight transactions to end.
const BARRIER_WAIT: Duration = Duration::from_millis(50);

/// Why [`Doorbell::wait`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    Rung,
    Timeout,
    /// The connection ended; call [`Doorbell::connect`] again.
    Lost,
}

pub struct Doorbell {
    config: PostgresConfig,
    /// Lease and barrier queries need no session state: they use the pool,
    /// so losing the LISTEN connection does not lose the lease protocol.
    pool: deadpool_postgres::Pool,
    conn: Option<(Client, mpsc::UnboundedReceiver<Notification>)>,
    busy: bool,
    renewed: Option<Instant>,
}

impl Doorbell {
    pub fn new(config: PostgresConfig, pool: deadpool_postgres::Pool) -> Self {
        Self { config, pool, conn: None, busy: false, renewed: None }
    }

    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|(c, _)| !c.is_closed())
    }

    /// True while this instance holds (or is letting expire) the lease.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// (Re)connects and LISTENs.
    pub async fn connect(&mut self) -> Result<()> {
        self.conn = None;
        let (client, notifications) = herald_core::pg::connect_dedicated(&self.config).await?;
        client
            .batch_execute(&format!("SET application_name = 'herald-capture doorbell'; LISTEN {DOORBELL_CHANNEL}"))
            .await?;
        self.conn = Some((client, notifications));
        Ok(())
    }

    /// Takes or extends the lease, at most every `LEASE_MS / 3`.
    pub async fn renew(&mut self) -> Result<()> {
        let due = self.renewed.is_none_or(|t| t.elapsed() >= Duration::from_millis(LEASE_MS as u64 / 3));
        if self.busy && !due {
            return Ok(());
        }
        self.pool
            .get()
            .await?
            .execute(
                "SELECT setval('herald.doorbell_lease', (extract(epoch FROM clock_timestamp()) * 1000)::int8 + $1)",
                &[&LEASE_MS],
            )
            .await?;
        self.busy = true;
        self.renewed = Some(Instant::now());
        Ok(())
    }

    /// Tries to hand the doorbell back to writers (stop renewing first).
    /// Returns true when no writer can have skipped the bell unseen: the
    /// caller then drains once more and may sleep on the bell.
    pub async fn try_idle(&mut self) -> Result<bool> {
        if !self.busy {
            return Ok(true);
        }
        let client = self.pool.get().await?;
        let expired: bool = client
            .query_one(
                "SELECT (SELECT last_value FROM herald.doorbell_lease) < (extract(epoch FROM clock_timestamp()) * 1000)::int8",
                &[],
            )
            .await?
            .get(0);
        if !expired {
            return Ok(false);
        }
        // A later statement, so its snapshot is taken after the expiry.
        let xmax: i64 =
            client.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8", &[]).await?.get(0);
        let deadline = Instant::now() + BARRIER_WAIT;
        loop {
            let xmin: i64 =
                client.query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8", &[]).await?.get(0);
            if xmin >= xmax {
                self.busy = false;
                self.renewed = None;
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits for a NOTIFY (or `timeout`). Swallows every queued notification,
    /// since one wake-up drains them all.
    pub async fn wait(&mut self, timeout: Duration) -> Wake {
        let Some((_, notifications)) = &mut self.conn else { return Wake::Lost };
        let wake = match tokio::time::timeout(timeout, notifications.recv()).await {
            Ok(Some(_)) => Wake::Rung,
            Ok(None) => Wake::Lost,
            Err(_) => Wake::Timeout,
        };
        if wake == Wake::Rung {
            while notifications.try_recv().is_ok() {}
        }
        if wake == Wake::Lost {
            self.conn = None;
        }
        wake
    }

    /// Drops notifications that arrived while busy.
    pub fn clear(&mut self) {
        if let Some((_, notifications)) = &mut self.conn {
            while notifications.try_recv().is_ok() {}
        }
    }
}
