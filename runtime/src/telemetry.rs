//! Prometheus metrics and the `/status` endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use crate::daemon::LiveState;
use crate::outbox::{self, OutboxStats};

/// What `/status` returns and `fogline-edge status` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Connected to the MQTT broker.
    pub broker_connected: bool,
    /// Connected to the aggregator.
    pub uplink_connected: bool,
    /// Buffer statistics.
    pub outbox: OutboxStats,
}

#[derive(Clone)]
struct AppState {
    outbox: PathBuf,
    live: Arc<LiveState>,
}

/// Serve `/metrics`, `/status` and `/healthz` on `listen` until shutdown.
pub async fn serve(
    listen: SocketAddr,
    outbox: PathBuf,
    live: Arc<LiveState>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let handle = fogline_cloud::telemetry::prometheus_handle();
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(AppState { outbox, live });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
    });
    Ok(addr)
}

async fn status(State(s): State<AppState>) -> Response {
    let path = s.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox::read_stats(&path)).await {
        Ok(Ok(stats)) => Json(Status {
            broker_connected: s.live.ingest.connected.load(Ordering::Acquire),
            uplink_connected: s.live.uplink.connected.load(Ordering::Acquire),
            outbox: stats,
        })
        .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
