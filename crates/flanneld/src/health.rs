//! The health listener: `/healthz` (alive), `/readyz` (lease, rules and subnet.env done) and
//! `/metrics` (Prometheus text format).
//!
//! Bodies and status codes of the first two are the reference's, since liveness/readiness
//! probes in existing manifests depend on them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics;

/// Shared readiness flag, set once subnet.env is written.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the daemon ready.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the daemon is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn healthz() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, TEXT)], "flanneld is running")
}

async fn readyz(State(ready): State<Readiness>) -> impl IntoResponse {
    if ready.is_ready() {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, TEXT)],
            "flanneld is ready",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, TEXT)],
            "flanneld is not ready yet",
        )
    }
}

async fn metrics_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::metrics().render(),
    )
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, TEXT)],
        "404 page not found\n",
    )
}

/// The routes of the health listener.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .fallback(not_found)
        .with_state(readiness)
}

/// Binds the health server; fails (so the daemon exits) if the address is unusable.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves health requests until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Readiness) {
    if let Err(e) = axum::serve(listener, router(readiness)).await {
        tracing::error!("health server stopped: {e}");
    }
}
