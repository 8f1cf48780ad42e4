//! Listener limits. HTTP: serves an axum router over HTTP/1.1 with the
//! limits a public port needs:
//! a deadline for each request head (slowloris), which also closes idle
//! keep-alive connections (hyper starts it when it waits for the next
//! request), TCP_NODELAY, and graceful shutdown. Every Herald HTTP listener
//! (the gateway's public port, the cache API's HTTP port, the ops ports)
//! goes through [`serve`]. gRPC: [`GrpcConfig::server`] is the tonic
//! server builder every gRPC listener starts from.
//!
//! Upgrades (WebSocket) work: the connection is hyper-util's `auto` one, so
//! `hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>`
//! gives the socket back.

use std::io;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};

/// `[http]`: limits of every HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A client must send a request's whole head within this; a keep-alive
    /// connection idle this long is closed too.
    pub header_read_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { header_read_timeout_ms: 10_000 }
    }
}

impl HttpConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.header_read_timeout_ms == 0 {
            return Err(Error::Config("http.header_read_timeout_ms: must be greater than 0".into()));
        }
        Ok(())
    }
}

/// `[grpc]`: limits of every gRPC listener (the cache API's and the
/// gateway's). Each service also bounds the size of a decoded message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Requests of one connection being handled at once; more wait.
    pub concurrency_limit_per_connection: usize,
    /// A call must produce its response within this (the whole of a unary
    /// call; a streaming `WatchInvalidations` only until its stream starts).
    pub request_timeout_ms: u64,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self { max_concurrent_streams: 200, concurrency_limit_per_connection: 64, request_timeout_ms: 30_000 }
    }
}

impl GrpcConfig {
    /// A tonic server builder with these limits.
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .concurrency_limit_per_connection(self.concurrency_limit_per_connection)
            .timeout(Duration::from_millis(self.request_timeout_ms))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let positive = [
            ("grpc.max_concurrent_streams", self.max_concurrent_streams as u64),
            ("grpc.concurrency_limit_per_connection", self.concurrency_limit_per_connection as u64),
            ("grpc.request_timeout_ms", self.request_timeout_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{key}: must be greater than 0")));
            }
        }
        Ok(())
    }
}

/// How long to wait before accepting again after an error such as EMFILE
/// (the connections in flight free descriptors meanwhile).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` fires, then stops
/// accepting, lets every connection finish its request in flight, and
/// returns once they are closed (callers bound this with their grace
/// period). Upgraded connections are handed off and not waited for.
/// Accept errors are logged and retried, so this does not fail today.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // HTTP/1.1 only: every HTTP client of Herald speaks it, gRPC has its own
    // ports, and an h2 connection has no header deadline to hold it to.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(config.header_read_timeout());
    let connections = TaskTracker::new();
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    if !is_connection_error(&error) {
                        tracing::warn!(%error, "accept failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                    continue;
                }
            },
        };
        // Small frames go out at once (no Nagle delay behind an unacked one).
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        let builder = builder.clone();
        let service = TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors that concern one connection only (the peer gave up before we
/// accepted it): accept the next one at once.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}
