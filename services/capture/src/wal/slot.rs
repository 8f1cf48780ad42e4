//! The replication slot: its state, creating it, noticing it was lost, and
//! dropping it.
//!
//! A slot keeps every WAL segment its consumer has not confirmed: a slot
//! nobody reads fills the database server's disk. `herald-capture status`
//! and the `herald_capture_slot_*` metrics show what it retains.
//!
//! A slot that disappears (dropped by hand, invalidated by
//! `max_slot_wal_keep_size`, lost in a failover before Postgres 17) takes
//! the changes it had not delivered with it. Herald notes in `herald.meta`
//! which slot it created (`wal_slot`); when that slot is missing or lost,
//! it records `wal_flush_pending`, recreates the slot, and capture appends
//! a flush-everything event before streaming (then clears the mark), so no
//! cache keeps a value whose invalidation fell into the gap.

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::schema::install_lock_id;

/// What `pg_replication_slots` says about the slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotState {
    pub exists: bool,
    /// The backend streaming it, if any.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub confirmed_lsn: Option<u64>,
    /// WAL the slot keeps on the server, bytes.
    pub retained_bytes: Option<i64>,
    /// WAL written since the confirmed position, bytes.
    pub lag_bytes: Option<i64>,
}

/// Parses `16/B374D848`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The slot's state.
pub async fn state(client: &Client, slot: &str) -> Result<SlotState> {
    let row = client
        .query_opt(
            "SELECT active_pid, wal_status, confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(match row {
        None => SlotState::default(),
        Some(row) => SlotState {
            exists: true,
            active_pid: row.get(0),
            wal_status: row.get(1),
            confirmed_lsn: row.get::<_, Option<String>>(2).as_deref().and_then(parse_lsn),
            retained_bytes: row.get(3),
            lag_bytes: row.get(4),
        },
    })
}

/// What [`ensure`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ensured {
    pub created: bool,
    /// The slot Herald had created was missing or lost and was recreated.
    pub lost: bool,
}

async fn meta(client: &Client, key: &str) -> Result<Option<String>> {
    Ok(client.query_opt("SELECT value FROM herald.meta WHERE key = $1", &[&key]).await?.map(|r| r.get(0)))
}

async fn set_meta(client: &Client, key: &str, value: &str) -> Result<()> {
    client
        .execute(
            "INSERT INTO herald.meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )
        .await?;
    Ok(())
}

/// Makes sure the slot exists, recreating a lost one (and marking the
/// flush it owes). `client` must be a connection of its own, in autocommit:
/// a slot cannot be created in a transaction that wrote, and the session
/// lock (the install lock) serialises concurrent captures and installs.
pub async fn ensure(client: &Client, slot: &str) -> Result<Ensured> {
    client.execute("SELECT pg_advisory_lock($1)", &[&install_lock_id()]).await?;
    let result = ensure_locked(client, slot).await;
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&install_lock_id()]).await;
    result
}

async fn ensure_locked(client: &Client, slot: &str) -> Result<Ensured> {
    let current = state(client, slot).await?;
    // Any slot Herald streamed before: changes since its position are gone
    // with it (also when the configured slot name changed).
    let recorded = meta(client, "wal_slot").await?;
    let lost_status = current.wal_status.as_deref() == Some("lost");
    if current.exists && !lost_status {
        if recorded.as_deref() != Some(slot) {
            set_meta(client, "wal_slot", slot).await?;
        }
        return Ok(Ensured::default());
    }
    let lost = recorded.is_some() || lost_status;
    if lost {
        // First the debt, then the new slot: a crash in between still flushes.
        set_meta(client, "wal_flush_pending", slot).await?;
        tracing::error!(slot, "replication slot lost: recreating it; capture will flush every cache");
    }
    if lost_status {
        drop_slot(client, slot).await?;
    }
    client
        .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
        .await
        .map_err(|e| Error::Schema(format!("cannot create replication slot {slot:?}: {}", pg_message(&e))))?;
    set_meta(client, "wal_slot", slot).await?;
    Ok(Ensured { created: true, lost })
}

/// Whether a flush-everything event is owed (a lost slot was recreated).
pub async fn flush_pending(client: &Client) -> Result<bool> {
    Ok(meta(client, "wal_flush_pending").await?.is_some())
}

/// The owed flush was appended.
pub async fn flush_done(client: &Client) -> Result<()> {
    client.execute("DELETE FROM herald.meta WHERE key = 'wal_flush_pending'", &[]).await?;
    Ok(())
}

/// Drops the slot (ending the connection that streams it, if any) and
/// forgets it. Returns whether it existed.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool> {
    client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await?;
    for _ in 0..50 {
        let row = client.query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
        match row {
            None => return Ok(false),
            Some(row) if !row.get::<_, bool>(0) => {
                client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await?;
                if client.query_one("SELECT to_regclass('herald.meta') IS NOT NULL", &[]).await?.get(0) {
                    client.execute("DELETE FROM herald.meta WHERE key = 'wal_slot' AND value = $1", &[&slot]).await?;
                }
                return Ok(true);
            }
            Some(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    Err(Error::Schema(format!("replication slot {slot:?} stays active; stop every capture and retry")))
}

fn pg_message(error: &tokio_postgres::Error) -> String {
    error.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("x"), None);
    }
}
