//! The write-behind writer (`cache.write_behind_writer`, on by default):
//! applies each tenant's enqueued commands to Postgres in stream order,
//! exactly once, then retires their overlay patches.
//!
//! - **Finding work.** Tenants with commands to apply or patches to retire
//!   are in `KeySpace::command_tenants`; the writer looks every [`POLL`].
//! - **One writer per tenant.** A lease (`SET NX PX`, renewed before each
//!   batch, before a command once a third of it has passed, and before each
//!   retry) lets one node drain a tenant's stream; a node
//!   that dies loses it after [`LEASE`]. Were two writers ever to overlap
//!   (a paused node whose lease ran out), both still go in stream order and
//!   the applied-ids primary key lets only one apply each command.
//! - **Exactly once.** Per command: `BEGIN; INSERT INTO
//!   herald.applied_commands … ON CONFLICT DO NOTHING;` the command's SQL
//!   only if that row is new; `COMMIT`; then (in Redis, one script) mark its
//!   patch applied at the position after the commit and delete the stream
//!   entry. Killed between the commit and the script, the next writer finds
//!   the id recorded and only does the Redis part.
//! - **Order.** A tenant's commands apply one at a time in stream order, so
//!   per-key order holds (and per-tenant order too: the price is one
//!   tenant's throughput is one connection's).
//! - **Faults.** Connection loss, Postgres down, serialization failures,
//!   lock or statement timeouts ([`transient`]) retry the same entry with
//!   backoff; any other SQL error moves the entry with its reason to the
//!   tenant's dead-commands stream, drops its patch, and the rest continue.
//! - **Retirement.** A patch applied at position L is removed once every
//!   live node's applied watermark passed L (`progress.rs`): by then
//!   capture's event for the commit invalidated the old row everywhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool as PgPool;
use fred::prelude::*;
use herald_core::backoff::Backoff;
use herald_core::config::WriteModel;
use herald_core::keys::{KeySpace, TenantId, one_slot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::enqueue::fields;
use crate::overlay::{self, EntryId};
use crate::progress;
use crate::resource::db_message;
use crate::write::Writer;
use crate::write_metrics::{CommandLabel, OutcomeLabel};

/// How often the writer looks for tenants with work.
pub const POLL: Duration = Duration::from_millis(50);
/// A tenant's writer lease.
pub const LEASE: Duration = Duration::from_millis(3_000);
/// How often the writer also scans for command streams of tenants that are
/// not listed (an enqueue whose listing failed after its script).
const SCAN_EVERY: Duration = Duration::from_secs(60);
/// How often the pending gauge is counted.
const COUNT_EVERY: Duration = Duration::from_secs(1);
/// Entries read from a stream at once.
const BATCH: u64 = 64;
/// Most tenants one node drains at once.
const MAX_TENANTS: usize = 64;
/// Applied patches retired by one script.
const RETIRE_BATCH: usize = 256;
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

const RECORD: &str = "INSERT INTO herald.applied_commands (tenant, command_id, command, enqueued_at) \
                      VALUES ($1, $2, $3, to_timestamp($4::int8 / 1000.0)) ON CONFLICT DO NOTHING";
const POSITION: &str = "SELECT (pg_current_wal_lsn() - '0/0')::int8";

/// Takes or renews the lease when free or already ours.
const TAKE_LEASE: &str = "local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0";
const RELEASE_LEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1";
/// KEYS: stream, dead stream, overlay; ARGV: entry id, reason, command id,
/// command, params.
const POISON: &str = "redis.call('XADD', KEYS[2], '*', 'entry', ARGV[1], 'id', ARGV[3], 'command', ARGV[4], \
'params', ARGV[5], 'reason', ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1";
/// KEYS: applied set; ARGV: the highest position every live node passed.
const RETIRABLE: &str = "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])";
/// KEYS: applied set, then each member's overlay; ARGV: the members
/// (`<overlay key> <field>`).
const RETIRE: &str = "for i, m in ipairs(ARGV) do
  local sp = string.find(m, ' ', 1, true)
  if sp then redis.call('HDEL', KEYS[i + 1], string.sub(m, sp + 1)) end
  redis.call('ZREM', KEYS[1], m)
end
return #ARGV";

/// One command read from a stream.
#[derive(Debug, Clone, Default)]
struct Entry {
    id: String,
    command_id: String,
    command: String,
    params: String,
    overlay: String,
}

/// Why an apply failed.
enum Failure {
    /// Retry the same entry later.
    Transient(String),
    /// Move it aside with this reason.
    Poison(String),
}

/// Whether a Postgres error may go away by itself: no server answer
/// (connection lost, Postgres down), connection exceptions (08),
/// transaction rollbacks such as serialization failures and deadlocks (40),
/// insufficient resources (53), lock waits (55), operator intervention such
/// as a statement timeout or shutdown (57), system errors (58, XX), and a
/// read-only transaction (25: a standby after a failover). Everything else
/// (bad data 22, constraints 23, syntax or privileges 42, a trigger's
/// RAISE P0, …) would fail the same way again.
pub fn transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(code) => matches!(&code.code()[..2], "08" | "25" | "40" | "53" | "55" | "57" | "58" | "XX"),
    }
}

fn classify(e: tokio_postgres::Error) -> Failure {
    if transient(&e) { Failure::Transient(db_message(&e)) } else { Failure::Poison(db_message(&e)) }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The command entries of an `XRANGE` reply.
fn entries(reply: Value) -> Vec<Entry> {
    herald_core::stream::raw_entries(reply)
        .into_iter()
        .filter_map(|raw| {
            let mut entry = Entry { id: raw.id, ..Entry::default() };
            for (k, v) in raw.fields? {
                let v = v.as_string().unwrap_or_default();
                match k.as_str() {
                    fields::ID => entry.command_id = v,
                    fields::COMMAND => entry.command = v,
                    fields::PARAMS => entry.params = v,
                    fields::OVERLAY => entry.overlay = v,
                    _ => {}
                }
            }
            Some(entry)
        })
        .collect()
}

/// The writer of one node.
pub struct Applier {
    keys: KeySpace,
    redis: Pool,
    db: PgPool,
    writer: Arc<Writer>,
    node: String,
}

impl Applier {
    pub fn new(keys: KeySpace, redis: Pool, db: PgPool, writer: Arc<Writer>, node: String) -> Self {
        Self { keys, redis, db, writer, node }
    }

    /// Finds tenants with work and drains each (one task per tenant whose
    /// lease this node holds) until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut counted: Option<tokio::time::Instant> = None;
        let mut scanned: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            running.retain(|_, task| !task.is_finished());
            if scanned.is_none_or(|at| at.elapsed() >= SCAN_EVERY) {
                self.list_unlisted().await;
                scanned = Some(tokio::time::Instant::now());
            }
            let members = self.redis.next().smembers::<Vec<String>, _>(self.keys.command_tenants());
            let tenants = match tokio::time::timeout(REDIS_TIMEOUT, members).await {
                Ok(Ok(tenants)) => tenants,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "write-behind: cannot list tenants");
                    continue;
                }
                Err(_) => continue,
            };
            if counted.is_none_or(|at| at.elapsed() >= COUNT_EVERY) {
                self.count_pending(&tenants).await;
                counted = Some(tokio::time::Instant::now());
            }
            for t in tenants {
                let Ok(tenant) = TenantId::new(&t) else { continue };
                if running.contains_key(&t) || running.len() >= MAX_TENANTS || !self.lease(&tenant).await {
                    continue;
                }
                let (me, token) = (self.clone(), shutdown.clone());
                running.insert(t, tokio::spawn(async move { me.drain(tenant, token).await }));
            }
        }
        for (_, task) in running {
            let _ = task.await;
        }
    }

    /// Lists every tenant that has a command stream (`SCAN`, every master).
    async fn list_unlisted(&self) {
        let client = self.redis.next();
        let pattern = self.keys.every_tenant_commands();
        let scan = herald_core::redis::scan_every_master(client, &pattern);
        let Ok(Ok(streams)) = tokio::time::timeout(REDIS_TIMEOUT * 5, scan).await else { return };
        let tenants: Vec<String> =
            streams.iter().filter_map(|key| self.keys.tenant_of(key)).map(|t| t.as_str().to_string()).collect();
        if !tenants.is_empty() {
            let _ = tokio::time::timeout(REDIS_TIMEOUT, client.sadd::<i64, _, _>(self.keys.command_tenants(), tenants))
                .await;
        }
    }

    /// Sets the pending gauge to the length of every listed stream.
    async fn count_pending(&self, tenants: &[String]) {
        let mut total = 0u64;
        for tenant in tenants.iter().filter_map(|t| TenantId::new(t).ok()) {
            let len = self.redis.next().xlen::<u64, _>(self.keys.commands(&tenant));
            if let Ok(Ok(n)) = tokio::time::timeout(REDIS_TIMEOUT, len).await {
                total += n;
            }
        }
        self.writer.metrics().behind_pending.set(total as i64);
    }

    async fn eval<R: FromValue>(&self, script: &str, keys: Vec<String>, args: Vec<String>) -> anyhow::Result<R> {
        one_slot(&keys)?;
        Ok(tokio::time::timeout(REDIS_TIMEOUT, self.redis.next().eval(script, keys, args)).await??)
    }

    /// Takes or renews `tenant`'s lease; false when another node holds it
    /// (or Redis cannot tell).
    async fn lease(&self, tenant: &TenantId) -> bool {
        let args = vec![self.node.clone(), LEASE.as_millis().to_string()];
        self.eval::<i64>(TAKE_LEASE, vec![self.keys.command_lease(tenant)], args).await.is_ok_and(|v| v == 1)
    }

    async fn release(&self, tenant: &TenantId) {
        let _ = self.eval::<i64>(RELEASE_LEASE, vec![self.keys.command_lease(tenant)], vec![self.node.clone()]).await;
    }

    /// Applies `tenant`'s commands and retires its patches until it has no
    /// work left, the lease is lost, or `shutdown`.
    async fn drain(&self, tenant: TenantId, shutdown: CancellationToken) {
        let stream = self.keys.commands(&tenant);
        loop {
            if shutdown.is_cancelled() || !self.lease(&tenant).await {
                break;
            }
            let read = self.redis.next().xrange::<Value, _, _, _>(&stream, "-", "+", Some(BATCH));
            let batch = match tokio::time::timeout(REDIS_TIMEOUT, read).await {
                Ok(Ok(reply)) => entries(reply),
                _ => break,
            };
            let mut renewed = tokio::time::Instant::now();
            for entry in &batch {
                if renewed.elapsed() >= LEASE / 3 {
                    if !self.lease(&tenant).await {
                        return;
                    }
                    renewed = tokio::time::Instant::now();
                }
                if !self.apply_with_retry(&tenant, entry, &shutdown).await {
                    self.release(&tenant).await;
                    return;
                }
            }
            let unretired = self.retire(&tenant).await;
            if batch.is_empty() {
                if unretired == Some(0) && self.forget(&tenant).await {
                    break;
                }
                // Patches wait for the nodes' watermarks.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(POLL * 2) => {}
                }
            }
        }
        self.release(&tenant).await;
    }

    /// Applies `entry`, retrying transient failures with backoff; false when
    /// the writer must stop (shutdown, lease lost, Redis failing).
    async fn apply_with_retry(&self, tenant: &TenantId, entry: &Entry, shutdown: &CancellationToken) -> bool {
        // Capped below the lease, which is renewed after each wait.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let metrics = self.writer.metrics();
        loop {
            match self.apply(tenant, entry).await {
                Ok((position, fresh)) => {
                    let keys =
                        vec![self.keys.commands(tenant), entry.overlay.clone(), self.keys.applied_patches(tenant)];
                    if self
                        .eval::<i64>(overlay::MARK_APPLIED, keys, vec![entry.id.clone(), position.to_string()])
                        .await
                        .is_err()
                    {
                        // The entry stays: the next attempt finds it applied.
                        return false;
                    }
                    let outcome = if fresh { "applied" } else { "duplicate" };
                    metrics
                        .behind_applied
                        .get_or_create(&OutcomeLabel { command: entry.command.clone(), outcome })
                        .inc();
                    if let Some(at) = EntryId::parse(&entry.id) {
                        metrics.behind_lag_seconds.observe(now_ms().saturating_sub(at.ms) as f64 / 1000.0);
                    }
                    return true;
                }
                Err(Failure::Poison(reason)) => {
                    tracing::warn!(%tenant, command = %entry.command, id = %entry.command_id, %reason, "write-behind: command moved aside");
                    let keys = vec![self.keys.commands(tenant), self.keys.dead_commands(tenant), entry.overlay.clone()];
                    let args = vec![
                        entry.id.clone(),
                        reason,
                        entry.command_id.clone(),
                        entry.command.clone(),
                        entry.params.clone(),
                    ];
                    if self.eval::<i64>(POISON, keys, args).await.is_err() {
                        return false;
                    }
                    metrics.behind_poisoned.get_or_create(&CommandLabel { command: entry.command.clone() }).inc();
                    return true;
                }
                Err(Failure::Transient(reason)) => {
                    metrics.behind_retries.inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(%tenant, command = %entry.command, %reason, ?delay, "write-behind: apply failed, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    if !self.lease(tenant).await {
                        return false;
                    }
                }
            }
        }
    }

    /// One attempt: the position after the commit, and whether this attempt
    /// applied the command (false: an earlier one had).
    async fn apply(&self, tenant: &TenantId, entry: &Entry) -> Result<(u64, bool), Failure> {
        let command = match self.writer.command(&entry.command) {
            Ok(c) if c.model == WriteModel::WriteBehind => c,
            _ => return Err(Failure::Poison(format!("no write-behind command {:?} is configured", entry.command))),
        };
        if !self.keys.is_overlay_of(tenant, &entry.overlay) {
            return Err(Failure::Poison(format!("overlay key {:?} is not the tenant's", entry.overlay)));
        }
        let params: Vec<String> = serde_json::from_str(&entry.params)
            .map_err(|e| Failure::Poison(format!("params {:?}: {e}", entry.params)))?;
        let enqueued_ms = EntryId::parse(&entry.id).map_or(0, |id| id.ms) as i64;
        let mut client =
            self.db.get().await.map_err(|e| Failure::Transient(format!("postgres: no connection: {e}")))?;
        let tx = client.transaction().await.map_err(classify)?;
        let recorded = tx
            .execute(RECORD, &[&tenant.as_str(), &entry.command_id, &command.name, &enqueued_ms])
            .await
            .map_err(classify)?;
        if recorded == 1 {
            command.execute_in(&tx, tenant, &params).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        let row = client.query_one(POSITION, &[]).await.map_err(classify)?;
        Ok((u64::try_from(row.get::<_, i64>(0)).unwrap_or(0), recorded == 1))
    }

    /// Removes the patches every live node has passed; how many are left
    /// (`None`: could not tell).
    async fn retire(&self, tenant: &TenantId) -> Option<u64> {
        let applied = self.keys.applied_patches(tenant);
        let nodes = progress::read(&self.redis, &self.keys.node_watermarks()).await.ok()?;
        let upto = nodes.iter().filter(|n| n.age <= progress::LIVE).map(|n| n.lsn).min();
        let upto = upto.map_or_else(|| "+inf".to_string(), |lsn| lsn.to_string());
        let members: Vec<String> =
            self.eval(RETIRABLE, vec![applied.clone()], vec![upto, RETIRE_BATCH.to_string()]).await.ok()?;
        if !members.is_empty() {
            let mut keys = vec![applied.clone()];
            keys.extend(members.iter().map(|m| m.split(' ').next().unwrap_or_default().to_string()));
            self.eval::<i64>(RETIRE, keys, members).await.ok()?;
        }
        tokio::time::timeout(REDIS_TIMEOUT, self.redis.next().zcard::<u64, _>(&applied)).await.ok()?.ok()
    }

    /// Removes `tenant` from the writers' list, unless work came in
    /// meanwhile (then it stays listed): true when removed.
    async fn forget(&self, tenant: &TenantId) -> bool {
        let list = self.keys.command_tenants();
        let redis = self.redis.next();
        if tokio::time::timeout(REDIS_TIMEOUT, redis.srem::<i64, _, _>(&list, tenant.as_str())).await.is_err() {
            return false;
        }
        let left = async {
            let commands: u64 = redis.xlen(self.keys.commands(tenant)).await?;
            let patches: u64 = redis.zcard(self.keys.applied_patches(tenant)).await?;
            Ok::<_, fred::error::Error>(commands + patches)
        };
        match tokio::time::timeout(REDIS_TIMEOUT, left).await {
            Ok(Ok(0)) => true,
            _ => {
                let _ = tokio::time::timeout(REDIS_TIMEOUT, redis.sadd::<i64, _, _>(&list, tenant.as_str())).await;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stream_entries() {
        let s = |v: &str| Value::String(v.into());
        let reply = Value::Array(vec![Value::Array(vec![
            s("1-0"),
            Value::Array(vec![
                s("id"),
                s("c1"),
                s("command"),
                s("bump"),
                s("params"),
                s("[\"1\"]"),
                s("overlay"),
                s("o"),
            ]),
        ])]);
        let got = entries(reply);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].id.as_str(), got[0].command_id.as_str(), got[0].command.as_str()), ("1-0", "c1", "bump"));
        assert_eq!((got[0].params.as_str(), got[0].overlay.as_str()), ("[\"1\"]", "o"));
    }
}
