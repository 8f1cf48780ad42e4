//! Postgres connection set-up: a pool for ordinary work, and dedicated
//! connections (LISTEN) that are never pooled.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::config::PostgresConfig;
use crate::error::{Error, Result};

/// A pool of `postgres.pool_size` connections. Connections are made lazily
/// and re-made after errors, so a Postgres restart heals by itself.
pub fn pool(config: &PostgresConfig) -> Result<Pool> {
    pool_with_settings(config, &[])
}

/// Like [`pool`], with session settings (`name`, `value`) applied to every
/// connection at start-up, e.g. `("synchronous_commit", "off")`.
pub fn pool_with_settings(config: &PostgresConfig, settings: &[(&str, &str)]) -> Result<Pool> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(|e| Error::Config(format!("postgres.url: {e}")))?;
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    if !settings.is_empty() {
        let mut options = pg.get_options().map(|o| format!("{o} ")).unwrap_or_default();
        for (name, value) in settings {
            options.push_str(&format!("-c {name}={value} "));
        }
        pg.options(options.trim_end());
    }
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .create_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .recycle_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .build()
        .map_err(|e| Error::Config(format!("postgres pool: {e}")))
}

/// A dedicated connection whose asynchronous messages (NOTIFY, notices) are
/// forwarded to the returned receiver. The receiver closes when the
/// connection ends, which is how the owner learns it must reconnect.
pub async fn connect_dedicated(
    config: &PostgresConfig,
) -> Result<(Client, mpsc::UnboundedReceiver<tokio_postgres::Notification>)> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(|e| Error::Config(format!("postgres.url: {e}")))?;
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    let (client, mut connection) = pg.connect(NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures::StreamExt;
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "dedicated postgres connection ended");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}
