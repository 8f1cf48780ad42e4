//! Write-behind enqueue (`Write` with a `model = "write-behind"` command):
//! one script on the tenant's slot appends the command to the tenant's
//! command stream and its patch to the overlay of the entry it changes, so
//! on a cluster too a command is never durable without its overlay (or the
//! reverse). Then the tenant is registered where writers look
//! (`KeySpace::command_tenants`, after the script: a writer that finds the
//! stream empty removes the tenant and looks again, see `applier.rs`), and
//! the command's tags are dropped so near caches ask again and see the
//! pending value.

use std::time::Duration;

use fred::prelude::*;
use herald_core::config::CaptureConfig;
use herald_core::keys::{TenantId, one_slot};

use crate::cache::Cache;
use crate::commands::Command;
use crate::error::{Error, Result};
use crate::overlay;

/// The stream entry's fields; the patch goes to the overlay as a pending
/// patch (`overlay::encode`), under the entry's id.
const ENQUEUE: &str = "local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'command', ARGV[2], \
'params', ARGV[3], 'overlay', KEYS[2])
redis.call('HSET', KEYS[2], entry, ARGV[4])
return entry";

const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Stream entry field names, shared with the writer.
pub mod fields {
    pub const ID: &str = "id";
    pub const COMMAND: &str = "command";
    pub const PARAMS: &str = "params";
    pub const OVERLAY: &str = "overlay";
}

/// An enqueued command.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub command_id: String,
    /// Its stream entry id.
    pub entry: String,
}

/// Enqueues `command` with canonical `params` for `tenant`. With
/// `capture.wait_replicas`, the answer waits until that many replicas have
/// it (so a failover does not lose it).
pub async fn enqueue(
    cache: &Cache,
    redis: &Pool,
    replicas: &CaptureConfig,
    command: &Command,
    tenant: &TenantId,
    params: &[String],
) -> Result<Enqueued> {
    let name = &command.name;
    let Some(spec) = &command.overlay else {
        return Err(Error::Internal(format!("command {name:?}: write-behind without an overlay")));
    };
    let res = cache.resource(&spec.resource)?;
    let resource_params = res.canonical_params(&command.overlay_params(params))?;
    let keys = cache.keys();
    let overlay_key = keys.overlay(tenant, &res.name, &res.key(&resource_params)?)?;
    let script_keys = vec![keys.commands(tenant), overlay_key];
    let slot = one_slot(&script_keys)?;
    let command_id = format!("{:032x}", rand::random::<u128>());
    let patch = overlay::encode(0, &command.patch(params));
    let args = vec![command_id.clone(), name.clone(), serde_json::json!(params).to_string(), patch];
    let unavailable = |what: &str, e: &dyn std::fmt::Display| Error::Unavailable(format!("redis: {what}: {e}"));
    let client = redis.next();
    let entry: String = tokio::time::timeout(REDIS_TIMEOUT, client.eval(ENQUEUE, script_keys, args))
        .await
        .map_err(|_| Error::Unavailable("redis: the enqueue timed out; the command may be enqueued".into()))?
        .map_err(|e| unavailable("the enqueue failed", &e))?;
    if replicas.wait_replicas > 0 {
        let acked =
            herald_core::redis::wait_for_replicas(client, &[slot], replicas.wait_replicas, replicas.wait_timeout_ms)
                .await
                .map_err(|e| unavailable("WAIT failed", &e))?;
        if acked < i64::from(replicas.wait_replicas) {
            return Err(Error::Unavailable(format!(
                "command {name:?} (id {command_id}) is enqueued but only {acked} of capture.wait_replicas = {} \
                 replicas have it: it may still be applied, or be lost in a failover",
                replicas.wait_replicas
            )));
        }
    }
    tokio::time::timeout(REDIS_TIMEOUT, redis.next().sadd::<i64, _, _>(keys.command_tenants(), tenant.as_str()))
        .await
        .map_err(|_| Error::Unavailable("redis: registering the tenant timed out".into()))?
        .map_err(|e| unavailable("registering the tenant failed", &e))?;
    if let Err(error) = cache.invalidate_tags(tenant, command.tags(params)).await {
        // Nodes check the overlay on every read; only near caches keep the
        // old value, until the applied command's event drops it.
        tracing::warn!(command = %name, %error, "write-behind: could not drop the command's tags");
    }
    Ok(Enqueued { command_id, entry })
}
