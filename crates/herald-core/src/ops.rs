//! The ops HTTP endpoints every service serves: `/healthz` (the process is
//! alive), `/readyz` (its dependencies are reachable and its subscriptions
//! live) and `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::serve::HttpConfig;

/// Named readiness conditions. Each component holds its [`ReadyFlag`] and
/// sets it as its dependency comes and goes.
#[derive(Clone, Default)]
pub struct Readiness {
    flags: Arc<Mutex<BTreeMap<&'static str, ReadyFlag>>>,
    /// Conditions whose loss degrades the service without making it unready
    /// (it still answers correctly, only slower).
    soft: Arc<Mutex<BTreeMap<&'static str, ReadyFlag>>>,
    /// Figures shown in `/readyz` after the conditions (`name: value`).
    notes: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

/// One readiness condition; starts not ready.
#[derive(Clone, Default)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Readiness {
    /// The flag called `name`, created not ready on first use.
    pub fn flag(&self, name: &'static str) -> ReadyFlag {
        let mut flags = self.flags.lock().unwrap_or_else(|p| p.into_inner());
        flags.entry(name).or_default().clone()
    }

    /// A condition whose loss shows as `degraded` in `/readyz` while the
    /// service stays ready; created not ready on first use.
    pub fn soft_flag(&self, name: &'static str) -> ReadyFlag {
        let mut soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
        soft.entry(name).or_default().clone()
    }

    /// Every condition with its state.
    pub fn report(&self) -> BTreeMap<&'static str, bool> {
        let flags = self.flags.lock().unwrap_or_else(|p| p.into_inner());
        flags.iter().map(|(k, v)| (*k, v.get())).collect()
    }

    /// Shows `name: value` in `/readyz` (a figure, not a condition).
    pub fn set_note(&self, name: &'static str, value: String) {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).insert(name, value);
    }

    /// Every note.
    pub fn notes(&self) -> BTreeMap<&'static str, String> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every soft condition with its state.
    pub fn soft_report(&self) -> BTreeMap<&'static str, bool> {
        let soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
        soft.iter().map(|(k, v)| (*k, v.get())).collect()
    }
}

/// What the ops router serves.
#[derive(Clone)]
pub struct OpsState {
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
}

/// `/healthz`, `/readyz`, `/metrics`.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    let report = state.readiness.report();
    let ready = report.values().all(|v| *v);
    let mut body: String =
        report.iter().map(|(name, ok)| format!("{name}: {}\n", if *ok { "ok" } else { "not ready" })).collect();
    for (name, ok) in state.readiness.soft_report() {
        body.push_str(&format!("{name}: {}\n", if ok { "ok" } else { "degraded" }));
    }
    for (name, value) in state.readiness.notes() {
        body.push_str(&format!("{name}: {value}\n"));
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body)
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Serves the ops endpoints on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    state: OpsState,
    http: HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::serve::serve(listener, router(state), &http, shutdown).await
}

/// A service's ops server, with the configured HTTP limits (`[http]`):
/// builds the metrics registry with `register`, spawns the server on
/// `listener`, and returns the readiness set the service fills with its
/// conditions, and the server's task.
pub fn start(
    listener: TcpListener,
    register: impl FnOnce(&mut Registry),
    http: &HttpConfig,
    shutdown: CancellationToken,
) -> (Readiness, tokio::task::JoinHandle<std::io::Result<()>>) {
    let mut registry = Registry::default();
    register(&mut registry);
    let readiness = Readiness::default();
    let state = OpsState { registry: Arc::new(registry), readiness: readiness.clone() };
    (readiness, tokio::spawn(serve(listener, state, http.clone(), shutdown)))
}
