//! `herald-capture status`: outbox depth, oldest pending age, dead letters,
//! the stream and the last appended event.

use std::fmt::Write as _;

use fred::prelude::*;
use herald_core::config::Config;
use herald_core::keys::KeySpace;
use herald_proto::Message as _;
use herald_proto::v1::InvalidationEvent;

use crate::error::Result;

/// A report of what capture has done and what waits.
#[derive(Debug, Default)]
pub struct Status {
    /// Whether the herald schema exists; when not, nothing else is read.
    pub installed: bool,
    pub schema_version: Option<String>,
    /// The installed source.
    pub source: Option<crate::source::Source>,
    /// With the WAL source: the slot's name and state.
    pub slot: Option<(String, crate::wal::slot::SlotState)>,
    pub outbox_depth: i64,
    pub oldest_pending_seconds: Option<f64>,
    pub dead_letters: i64,
    pub stream_len: u64,
    /// (group, pending, lag) per consumer group.
    pub groups: Vec<(String, i64, Option<i64>)>,
    pub last_event: Option<(String, InvalidationEvent)>,
}

pub async fn status(config: &Config) -> Result<Status> {
    let pool = herald_core::pg::pool(&config.postgres)?;
    let client = pool.get().await?;
    let installed = client.query_one("SELECT to_regclass('herald.outbox') IS NOT NULL", &[]).await?.get(0);
    let mut status = Status { installed, ..Status::default() };
    if !status.installed {
        return Ok(status);
    }
    status.schema_version =
        client.query_opt("SELECT value FROM herald.meta WHERE key = 'schema_version'", &[]).await?.map(|r| r.get(0));
    status.source = crate::source::installed(&**client).await?;
    if status.source == Some(crate::source::Source::Wal) {
        let state = crate::wal::slot::state(&client, &config.capture.slot).await?;
        status.slot = Some((config.capture.slot.clone(), state));
    }
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM herald.outbox), \
                    (SELECT extract(epoch FROM clock_timestamp() - min(changed_at))::float8 FROM herald.outbox), \
                    (SELECT count(*) FROM herald.dead_letter)",
            &[],
        )
        .await?;
    status.outbox_depth = row.get(0);
    status.oldest_pending_seconds = row.get(1);
    status.dead_letters = row.get(2);

    let redis = herald_core::redis::connect_pool(&config.redis).await?;
    let keys = KeySpace::new(&config.env)?;
    let stream = keys.stream();
    status.stream_len = redis.next().xlen(&stream).await?;
    let groups: Value = redis.next().xinfo_groups(&stream).await.unwrap_or(Value::Null);
    if let Value::Array(groups) = groups {
        for group in groups {
            let fields: std::collections::HashMap<String, Value> = group.convert().unwrap_or_default();
            let name = fields.get("name").and_then(|v| v.as_string()).unwrap_or_default();
            let pending = fields.get("pending").and_then(|v| v.as_i64()).unwrap_or_default();
            let lag = fields.get("lag").and_then(|v| v.as_i64());
            status.groups.push((name, pending, lag));
        }
    }
    let last: Value = redis.next().xrevrange(&stream, "+", "-", Some(1)).await?;
    if let Some(entry) = herald_core::stream::range_entries(last).into_iter().next()
        && let Some(bytes) = entry.payload
        && let Ok(event) = InvalidationEvent::decode(bytes.as_ref())
    {
        status.last_event = Some((entry.id, event));
    }
    let _ = redis.quit().await;
    Ok(status)
}

impl Status {
    /// Human-readable lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "schema version:      {}", self.schema_version.as_deref().unwrap_or("not installed"));
        let _ = writeln!(out, "source:              {}", self.source.map_or("-", |s| s.as_str()));
        if let Some((name, slot)) = &self.slot {
            let bytes = |b: Option<i64>| b.map_or("-".to_string(), |b| format!("{b} bytes"));
            if slot.exists {
                let _ = writeln!(out, "slot:                {name} ({})", slot.wal_status.as_deref().unwrap_or("?"));
                let _ = writeln!(
                    out,
                    "confirmed lsn:       {}",
                    slot.confirmed_lsn.map_or("-".to_string(), crate::wal::txn::lsn_text)
                );
                let _ = writeln!(out, "retained wal:        {}", bytes(slot.retained_bytes));
                let _ = writeln!(out, "lag:                 {}", bytes(slot.lag_bytes));
                let lag_seconds = match (&self.last_event, slot.lag_bytes) {
                    (Some((_, e)), Some(lag)) if lag > 0 => {
                        format!("{:.1} s", (herald_core::time::now_us() - e.commit_time_us).max(0) as f64 / 1e6)
                    }
                    _ => "0 s".to_string(),
                };
                let _ = writeln!(out, "lag (time):          {lag_seconds}");
                let _ = writeln!(
                    out,
                    "streaming pid:       {}",
                    slot.active_pid
                        .map_or("none (no capture is reading: WAL accumulates)".to_string(), |p| p.to_string())
                );
            } else {
                let _ =
                    writeln!(out, "slot:                {name} MISSING (capture recreates it and flushes every cache)");
            }
        }
        let _ = writeln!(out, "outbox depth:        {}", self.outbox_depth);
        let _ = writeln!(
            out,
            "oldest pending:      {}",
            self.oldest_pending_seconds.map_or("-".to_string(), |s| format!("{s:.3} s"))
        );
        let _ = writeln!(out, "dead letters:        {}", self.dead_letters);
        let _ = writeln!(out, "stream length:       {}", self.stream_len);
        for (name, pending, lag) in &self.groups {
            let lag = lag.map_or("?".to_string(), |l| l.to_string());
            let _ = writeln!(out, "group {name}: pending {pending}, lag {lag}");
        }
        match &self.last_event {
            Some((id, e)) => {
                let _ = writeln!(
                    out,
                    "last appended:       {id} event {} table {} op {} ids {} tags {}",
                    e.event_id,
                    e.table,
                    e.operation().as_str_name(),
                    e.ids.len(),
                    e.tags.len()
                );
            }
            None => {
                let _ = writeln!(out, "last appended:       -");
            }
        }
        out
    }
}
