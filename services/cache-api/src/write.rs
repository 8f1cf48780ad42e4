//! Write-through (`Write`, `POST /v1/t/{tenant}/w/{command}`): runs a
//! configured command in a transaction, drops the tags it names on every
//! node (as InvalidateTags does), takes the position after both, then waits
//! (at most `cache.write_wait_ms`) until every live node's applied watermark
//! has passed it. A read on any node after a reached wait reflects the
//! write without a token; the position is also a read-your-writes token.
//!
//! A write-behind command is enqueued instead (`enqueue.rs`) and applied by
//! the writer (`applier.rs`).
//!
//! Why the position is taken after the invalidation: a node's watermark is
//! forwarded on the same channel as the invalidation, after it, so a node
//! past the position has also applied the invalidation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use fred::prelude::*;
use herald_core::config::{CaptureConfig, WriteModel};
use herald_core::keys::TenantId;

use crate::cache::Cache;
use crate::commands::Command;
use crate::enqueue;
use crate::error::{Error, Result};
use crate::http::HttpState;
use crate::progress;
use crate::resource::connection_failed;
use crate::write_metrics::WriteMetrics;

/// What a write did.
#[derive(Debug, Clone)]
pub struct Written {
    pub rows_affected: u64,
    /// `pg_current_wal_lsn()` after the commit and the invalidation.
    pub commit_lsn: u64,
    /// Every live node applied the changes up to `commit_lsn` in time.
    pub wait_reached: bool,
    /// Write-behind: the enqueued command's id (empty for write-through).
    pub command_id: String,
    /// Write-behind: enqueued, not applied yet.
    pub pending: bool,
}

/// Runs the configured commands of one node.
pub struct Writer {
    commands: HashMap<String, Command>,
    cache: Arc<Cache>,
    db: deadpool_postgres::Pool,
    redis: Pool,
    wait: Duration,
    metrics: WriteMetrics,
    /// `capture.wait_replicas` and its timeout, for enqueues.
    replicas: CaptureConfig,
}

impl Writer {
    pub fn new(
        commands: Vec<Command>,
        cache: Arc<Cache>,
        db: deadpool_postgres::Pool,
        redis: Pool,
        metrics: WriteMetrics,
        replicas: CaptureConfig,
    ) -> Self {
        let wait = Duration::from_millis(cache.config().write_wait_ms);
        let commands = commands.into_iter().map(|c| (c.name.clone(), c)).collect();
        Self { commands, cache, db, redis, wait, metrics, replicas }
    }

    /// Whether any command is write-behind (then a node runs the writer).
    pub fn has_write_behind(&self) -> bool {
        self.commands.values().any(|c| c.model == WriteModel::WriteBehind)
    }

    pub fn metrics(&self) -> &WriteMetrics {
        &self.metrics
    }

    pub fn command(&self, name: &str) -> Result<&Command> {
        self.commands.get(name).ok_or_else(|| Error::InvalidArgument(format!("unknown command {name:?}")))
    }

    /// Runs `name` for `tenant` (already checked against the caller's token).
    pub async fn write(&self, tenant: &TenantId, name: &str, params: &[String]) -> Result<Written> {
        let command = self.command(name)?;
        let result = match command.model {
            WriteModel::WriteThrough => self.run(command, tenant, params).await,
            WriteModel::WriteBehind => self.enqueue(command, tenant, params).await,
        };
        let outcome = match &result {
            Ok(w) if w.pending => "enqueued",
            Ok(w) if w.wait_reached => "reached",
            Ok(_) => "not_reached",
            Err(e) => e.kind(),
        };
        self.metrics.outcome(name, outcome);
        result
    }

    async fn run(&self, command: &Command, tenant: &TenantId, params: &[String]) -> Result<Written> {
        let name = command.name.as_str();
        let params = command.canonical_params(params)?;
        // Checked before the commit: a tag the cache would refuse (a long or
        // control-character parameter) must not leave a write undropped.
        let tags = command.tags(&params);
        self.cache.check_tags(&tags)?;
        let mut client =
            self.db.get().await.map_err(|e| Error::Unavailable(format!("postgres: no connection: {e}")))?;
        let rows_affected = command.execute(&mut client, tenant, &params).await?;
        self.cache.invalidate_tags(tenant, tags).await.map_err(|e| {
            Error::Unavailable(format!(
                "command {name:?} committed, but the cache could not drop its tags ({e}); \
                 readers may see the old value until capture's events reach them"
            ))
        })?;
        let row = client.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await.map_err(|e| {
            let why = if connection_failed(&e) { "the connection failed" } else { "the query failed" };
            Error::Unavailable(format!("command {name:?} committed, but its position is unknown: {why}"))
        })?;
        let commit_lsn = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        drop(client);
        let key = self.cache.keys().node_watermarks();
        let started = std::time::Instant::now();
        let wait_reached = progress::wait_past(&self.redis, &key, commit_lsn, self.wait).await;
        if wait_reached {
            self.metrics.waited(name, started.elapsed().as_secs_f64());
        } else {
            tracing::warn!(command = name, commit_lsn, "write-through: not every live node applied the write in time");
        }
        Ok(Written { rows_affected, commit_lsn, wait_reached, command_id: String::new(), pending: false })
    }

    /// Write-behind: durable in the tenant's command stream, visible as a
    /// pending overlay; applied later by the writer (`applier.rs`).
    async fn enqueue(&self, command: &Command, tenant: &TenantId, params: &[String]) -> Result<Written> {
        let params = command.canonical_params(params)?;
        // Checked before the enqueue, as for write-through.
        self.cache.check_tags(&command.tags(&params))?;
        let enqueued = enqueue::enqueue(&self.cache, &self.redis, &self.replicas, command, tenant, &params).await?;
        Ok(Written {
            rows_affected: 0,
            commit_lsn: 0,
            wait_reached: false,
            command_id: enqueued.command_id,
            pending: true,
        })
    }
}

/// A Postgres LSN as text (`16/B374D848`), as `x-herald-min-lsn` takes it.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The HTTP body's parameters: an object by name, or an array in order;
/// strings, numbers and booleans as their text.
fn body_params(command: &Command, body: &[u8]) -> Result<Vec<String>> {
    let bad = |m: String| Error::InvalidArgument(format!("request body: {m}"));
    let body: serde_json::Value = if body.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?
    };
    let object = body.as_object().ok_or_else(|| bad("expected {\"params\": {…} or […]}".into()))?;
    if let Some(k) = object.keys().find(|k| *k != "params") {
        return Err(bad(format!("unknown field {k:?} (expected params)")));
    }
    let text = |name: &str, v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        _ => Err(bad(format!("parameter {name:?}: expected a string, number or boolean"))),
    };
    match object.get("params") {
        None => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => {
            items.iter().enumerate().map(|(i, v)| text(&format!("${}", i + 1), v)).collect()
        }
        Some(serde_json::Value::Object(named)) => {
            if let Some(k) = named.keys().find(|k| !command.params.contains(k)) {
                return Err(bad(format!(
                    "command {:?} has no parameter {k:?} (it takes {})",
                    command.name,
                    command.params.join(", ")
                )));
            }
            command
                .params
                .iter()
                .map(|name| {
                    let v = named.get(name).ok_or_else(|| {
                        bad(format!(
                            "command {:?} takes parameters {}; {name:?} is missing",
                            command.name,
                            command.params.join(", ")
                        ))
                    })?;
                    text(name, v)
                })
                .collect()
        }
        Some(_) => Err(bad("params: expected an object or an array".into())),
    }
}

/// `POST /v1/t/{tenant}/w/{command}`.
pub async fn http_write(
    State(state): State<HttpState>,
    Path((tenant, command)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let (_, tenant) = state.tenant(&headers, &tenant)?;
    let params = body_params(state.writer.command(&command)?, &body)?;
    let w = state.writer.write(&tenant, &command, &params).await?;
    if w.pending {
        return Ok(axum::Json(serde_json::json!({ "command_id": w.command_id, "pending": true })).into_response());
    }
    Ok(axum::Json(serde_json::json!({
        "rows_affected": w.rows_affected,
        "commit_lsn": lsn_text(w.commit_lsn),
        "wait_reached": w.wait_reached,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_print_as_postgres_does() {
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(lsn_text(0x1_0000_0000), "1/0");
    }
}
