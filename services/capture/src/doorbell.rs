//! The doorbell: a dedicated (unpooled) connection that LISTENs for writers'
//! NOTIFY while capture is idle, and holds the busy lock while it drains so
//! that writers skip the NOTIFY (and its commit-time global lock) under load.
//!
//! Protocol (see `schema::base_sql` for the writer's side):
//! * idle → busy: woken by a NOTIFY, capture takes the busy lock (waiting
//!   at most `BUSY_LOCK_TIMEOUT` for writers that are ringing right now).
//! * busy: writers cannot take the busy lock shared, so they skip NOTIFY;
//!   capture keeps draining and polling.
//! * busy → idle: `herald.try_idle()` succeeds only at an instant when no
//!   writer is in flight, so no skipped NOTIFY can be lost.

use std::time::Duration;

use herald_core::config::PostgresConfig;
use tokio::sync::mpsc;
use tokio_postgres::{Client, Notification};

use crate::error::Result;
use crate::schema::{DOORBELL_CHANNEL, busy_lock_id};

const BUSY_LOCK_TIMEOUT: &str = "200ms";

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
    conn: Option<(Client, mpsc::UnboundedReceiver<Notification>)>,
    busy: bool,
}

impl Doorbell {
    pub fn new(config: PostgresConfig) -> Self {
        Self { config, conn: None, busy: false }
    }

    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|(c, _)| !c.is_closed())
    }

    /// True while this instance holds the busy lock.
    pub fn is_busy(&self) -> bool {
        self.busy && self.is_connected()
    }

    /// (Re)connects and LISTENs. A new session holds no lock, so the
    /// instance starts idle.
    pub async fn connect(&mut self) -> Result<()> {
        self.conn = None;
        self.busy = false;
        let (client, notifications) = herald_core::pg::connect_dedicated(&self.config).await?;
        client
            .batch_execute(&format!(
                "SET application_name = 'herald-capture doorbell'; SET lock_timeout = '{BUSY_LOCK_TIMEOUT}'; LISTEN {DOORBELL_CHANNEL}"
            ))
            .await?;
        self.conn = Some((client, notifications));
        Ok(())
    }

    /// Takes the busy lock. `wait` waits (briefly) for ringing writers to
    /// commit; otherwise only tries. Returns whether this instance is busy.
    pub async fn become_busy(&mut self, wait: bool) -> Result<bool> {
        if self.busy {
            return Ok(true);
        }
        let Some((client, _)) = &self.conn else { return Ok(false) };
        let got = if wait {
            match client.execute("SELECT pg_advisory_lock($1)", &[&busy_lock_id()]).await {
                Ok(_) => true,
                // lock_timeout: ringing writers or another busy capture.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => false,
                Err(e) => return Err(e.into()),
            }
        } else {
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&busy_lock_id()]).await?.get(0)
        };
        self.busy = got;
        Ok(got)
    }

    /// Tries to hand the doorbell back to writers. Returns true when this
    /// instance is idle afterwards.
    pub async fn try_idle(&mut self) -> Result<bool> {
        if !self.busy {
            return Ok(true);
        }
        let Some((client, _)) = &self.conn else { return Ok(true) };
        let idle: bool = client.query_one("SELECT herald.try_idle()", &[]).await?.get(0);
        self.busy = !idle;
        Ok(idle)
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
            self.busy = false;
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
