//! `herald-capture status`: outbox depth, oldest pending age, dead letters,
//! the stream and the last appended event.

use std::fmt::Write as _;

use fred::prelude::*;
use herald_core::config::Config;
use herald_core::keys::KeySpace;
use herald_core::stream::EventLog;
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
    /// Entries in every partition of the log.
    pub stream_len: u64,
    pub partitions: u16,
    /// `used_memory` of each master (every master of a cluster).
    pub memory: Vec<(String, u64)>,
    /// (group, pending, lag) per consumer group, summed over partitions.
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
    let log = EventLog::new(&keys, config.redis.partitions);
    status.partitions = log.partitions();
    let mut newest: Option<(String, InvalidationEvent)> = None;
    for stream in log.streams() {
        status.stream_len += redis.next().xlen::<u64, _>(stream).await?;
        let groups: Value = redis.next().xinfo_groups(stream).await.unwrap_or(Value::Null);
        if let Value::Array(groups) = groups {
            for group in groups {
                let fields: std::collections::HashMap<String, Value> = group.convert().unwrap_or_default();
                let name = fields.get("name").and_then(|v| v.as_string()).unwrap_or_default();
                let pending = fields.get("pending").and_then(|v| v.as_i64()).unwrap_or_default();
                let lag = fields.get("lag").and_then(|v| v.as_i64());
                match status.groups.iter_mut().find(|(n, _, _)| *n == name) {
                    Some((_, p, l)) => {
                        *p += pending;
                        *l = l.zip(lag).map(|(a, b)| a + b);
                    }
                    None => status.groups.push((name, pending, lag)),
                }
            }
        }
        let last: Value = redis.next().xrevrange(stream, "+", "-", Some(1)).await?;
        if let Some(entry) = herald_core::stream::range_entries(last).into_iter().next()
            && let Some(bytes) = entry.payload
            && let Ok(event) = InvalidationEvent::decode(bytes.as_ref())
            && newest.as_ref().is_none_or(|(id, _)| entry_id(&entry.id) > entry_id(id))
        {
            newest = Some((entry.id, event));
        }
    }
    status.last_event = newest;
    status.memory = used_memory(redis.next()).await.unwrap_or_default();
    let _ = redis.quit().await;
    Ok(status)
}

/// An entry id as `(ms, seq)`, to compare ids of different streams.
fn entry_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// `used_memory` of every master (the one server, or each cluster master).
async fn used_memory(client: &Client) -> Result<Vec<(String, u64)>> {
    let masters = match client.cached_cluster_state() {
        Some(state) if client.is_clustered() => state.unique_primary_nodes(),
        _ => vec![],
    };
    let parse = |info: String| {
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    if masters.is_empty() {
        let info: String = client.info(Some(fred::types::InfoKind::Memory)).await?;
        return Ok(vec![("redis".into(), parse(info))]);
    }
    let mut out = Vec::new();
    for master in masters {
        let info: String = client.with_cluster_node(master.clone()).info(Some(fred::types::InfoKind::Memory)).await?;
        out.push((master.to_string(), parse(info)));
    }
    Ok(out)
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
        let _ = writeln!(out, "stream length:       {} ({} partitions)", self.stream_len, self.partitions);
        for (node, bytes) in &self.memory {
            let _ = writeln!(out, "redis memory:        {node} {:.1} MiB", *bytes as f64 / 1048576.0);
        }
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
