//! `herald-broadcast watch`: prints what travels on the L1 channel, one JSON
//! line per invalidation event (and per heartbeat with `--heartbeats`).

use std::io::Write as _;
use std::time::Duration;

use fred::prelude::*;
use herald_core::config::Config;
use herald_core::keys::KeySpace;
use herald_core::l1::wire::{self, Received};
use herald_core::time::now_us;
use herald_proto::v1::InvalidationEvent;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One event as a JSON object, with the lag from the writer's statement.
pub fn event_json(event: &InvalidationEvent, received_us: i64) -> serde_json::Value {
    serde_json::json!({
        "event_id": event.event_id,
        "tenant": event.tenant,
        "table": event.table,
        "op": event.operation().as_str_name().trim_start_matches("OPERATION_").to_lowercase(),
        "ids": event.ids,
        "tags": event.tags,
        "teams": event.teams,
        "txid": event.txid,
        "commit_lsn": event.commit_lsn,
        "widened": event.widened,
        "all_tenants": event.all_tenants,
        "lag_ms": (received_us - event.commit_time_us) as f64 / 1000.0,
    })
}

/// Prints L1 traffic to stdout until `shutdown` fires. Warns on stderr when
/// no heartbeat arrives within `l1.heartbeat_timeout_ms` (no broadcast runs
/// against this Redis and env), and again once heartbeats are back.
pub async fn watch(config: &Config, heartbeats: bool, shutdown: CancellationToken) -> anyhow::Result<()> {
    let channels = KeySpace::new(&config.env)?.l1_channels(config.redis.partitions);
    let channel = channels.join(", ");
    let client = herald_core::redis::build_subscriber(&config.redis)?;
    let mut messages = client.message_rx();
    let _connection = client.init().await?;
    herald_core::redis::subscribe(&client, channels).await?;
    eprintln!("watching {channel}");
    let stdout = std::io::stdout();
    let timeout = Duration::from_millis(config.l1.heartbeat_timeout_ms);
    let mut deadline = Instant::now() + timeout;
    let mut silent = false;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline), if !silent => {
                silent = true;
                eprintln!(
                    "warning: no heartbeat on {channel} within {} ms: no herald-broadcast runs against redis {} with env {}",
                    timeout.as_millis(),
                    herald_core::telemetry::redact_url(&config.redis.url),
                    config.env,
                );
                continue;
            }
            message = messages.recv() => message,
        };
        let Ok(message) = message else { break };
        let Some(bytes) = message.value.as_bytes() else { continue };
        let now = now_us();
        let mut out = stdout.lock();
        match wire::decode(bytes) {
            Ok(Received::Invalidations(events)) => {
                for event in &events {
                    writeln!(out, "{}", event_json(event, now))?;
                }
            }
            Ok(Received::Heartbeat(hb)) => {
                deadline = Instant::now() + timeout;
                if std::mem::take(&mut silent) {
                    eprintln!("heartbeats are back (from {})", hb.instance);
                }
                if heartbeats {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"heartbeat": hb.instance, "sent_time_us": hb.sent_time_us})
                    )?;
                }
            }
            Ok(_) => {}
            Err(error) => writeln!(out, "{}", serde_json::json!({"undecodable": error.to_string()}))?,
        }
        out.flush()?;
    }
    let _ = client.quit().await;
    Ok(())
}
