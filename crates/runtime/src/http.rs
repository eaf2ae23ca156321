//! The `[metrics] listen` endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use walcast_core::{Error, Result};

use crate::Hub;

/// Binds `listen` (before the relay starts, so a taken port is an error at
/// start) and returns the server future: it serves until it is dropped (when
/// the relay returns), so `/healthz` answers during a graceful shutdown too.
pub(crate) async fn bind(
    listen: &str,
    hub: Arc<Hub>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let addr: SocketAddr = listen.parse().map_err(|_| {
        Error::operator(format!(
            "metrics.listen = {listen:?} is not an address and port"
        ))
    })?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::operator(format!("cannot listen on metrics.listen = {listen}"))
            .with_source(e)
            .with_hint("choose a free port (another walcast, or another exporter, may hold it) or remove [metrics] listen")
    })?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(listen = %local, "serving /metrics, /healthz and /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(hub);
    Ok(async move {
        let served = axum::serve(listener, app).await;
        if let Err(e) = served {
            tracing::warn!("the metrics listener stopped: {e}");
        }
    })
}

async fn metrics(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    let body = hub.render().unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    match hub.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
