//! Prometheus metrics, the `/status` endpoint (used by `fogline-edge
//! status`) and `/healthz` (503 when the pipeline or the uplink is wedged:
//! work pending and no progress for `health.stall_after`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::daemon::LiveState;
use crate::outbox::{self, OutboxStats};

/// Ingest as `/status` reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IngestStatus {
    /// Clients connected to the native endpoint.
    pub clients: u64,
    /// Sessions the endpoint keeps.
    pub sessions: u64,
    /// Bytes received and not yet committed.
    pub pending_bytes: u64,
    /// The ingest byte budget.
    pub budget_bytes: u64,
    /// Subscriptions the external broker refused: filter and reason.
    pub refused_subscriptions: Vec<String>,
}

/// What `/status` returns and `fogline-edge status` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Connected to the external MQTT broker.
    pub broker_connected: bool,
    /// Connected to the aggregator.
    pub uplink_connected: bool,
    /// Ingest.
    pub ingest: IngestStatus,
    /// Times the aggregator's cursor was found behind its acknowledgements.
    pub uplink_cursor_regressions: u64,
    /// The link in use and what happened to earlier ones.
    pub uplink: crate::uplink::UplinkStatus,
    /// Buffer statistics.
    pub outbox: OutboxStats,
    /// The functions: version, breaker, held inputs, state, probation.
    pub functions: Vec<crate::pipeline::FunctionStatus>,
    /// `/healthz`'s verdict: empty when healthy.
    pub problems: Vec<String>,
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
    let handle = fogline_telemetry::prometheus_handle();
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/status", get(status))
        .route("/healthz", get(healthz))
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

/// Why the daemon is wedged, if it is: work pending and no progress for
/// `stall_after`.
pub fn problems(live: &LiveState, now_ms: u64) -> Vec<String> {
    let mut out = Vec::new();
    let stall = live.stall_after.as_millis() as u64;
    let secs = |ms: u64| format!("{:.0} s", ms as f64 / 1000.0);
    let p = &live.pipeline;
    let started = p.commit_started_ms.load(Ordering::Acquire);
    if started != 0 && now_ms.saturating_sub(started) > stall {
        let failing = if p.failing.load(Ordering::Acquire) {
            " and failing (disk full or I/O errors: see the log)"
        } else {
            ""
        };
        out.push(format!(
            "pipeline wedged: an outbox commit has been running for {}{failing}",
            secs(now_ms - started)
        ));
    } else {
        let pending = live.pending.pending_bytes();
        let last = p.last_commit_ms.load(Ordering::Acquire);
        if pending > 0 && last != 0 && now_ms.saturating_sub(last) > stall {
            out.push(format!(
                "pipeline wedged: {pending} bytes waiting and no commit for {}",
                secs(now_ms - last)
            ));
        }
    }
    if let Ok(functions) = live.functions.lock() {
        for f in functions.iter() {
            // Suspended for longer than the stall bound: its inputs pile up
            // (held) or go to dead letters.
            let since = f.last_error.as_ref().map(|(at, _)| *at).unwrap_or(now_ms);
            if f.breaker == "open" && now_ms.saturating_sub(since) > stall {
                out.push(format!(
                    "function {} suspended (circuit open) for {}, {} inputs held; last error: {}",
                    f.owner,
                    secs(now_ms.saturating_sub(since)),
                    f.held,
                    f.last_error
                        .as_ref()
                        .map(|(_, e)| e.as_str())
                        .unwrap_or("?")
                ));
            }
        }
    }
    let u = &live.uplink;
    let progress = u.last_progress_ms.load(Ordering::Acquire);
    let in_flight = u.in_flight.load(Ordering::Acquire);
    if u.connected.load(Ordering::Acquire)
        && in_flight > 0
        && progress != 0
        && now_ms.saturating_sub(progress) > stall
    {
        out.push(format!(
            "uplink wedged: connected, {in_flight} batches in flight and no acknowledgement for {}",
            secs(now_ms - progress)
        ));
    }
    out
}

async fn healthz(State(s): State<AppState>) -> Response {
    let problems = problems(&s.live, crate::clock::now_ms());
    if problems.is_empty() {
        Json(serde_json::json!({ "status": "ok" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "wedged", "problems": problems })),
        )
            .into_response()
    }
}

async fn status(State(s): State<AppState>) -> Response {
    let path = s.outbox.clone();
    let stats = match tokio::task::spawn_blocking(move || outbox::read_stats(&path)).await {
        Ok(Ok(stats)) => stats,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let live = &s.live;
    let refused = live
        .ingest
        .refused_subscriptions
        .lock()
        .map(|r| {
            r.iter()
                .map(|(f, c)| format!("{f} ({c:#04x} {})", crate::ingest::codec::reason_name(*c)))
                .collect()
        })
        .unwrap_or_default();
    Json(Status {
        broker_connected: live.ingest.broker_connected(),
        uplink_connected: live.uplink.connected.load(Ordering::Acquire),
        ingest: IngestStatus {
            clients: live.ingest.clients.load(Ordering::Acquire),
            sessions: live.ingest.sessions.load(Ordering::Acquire),
            pending_bytes: live.pending.pending_bytes() as u64,
            budget_bytes: live.pending.capacity() as u64,
            refused_subscriptions: refused,
        },
        uplink_cursor_regressions: live.uplink.cursor_regressions.load(Ordering::Acquire),
        uplink: live.uplink.status(),
        outbox: stats,
        functions: live.functions.lock().map(|f| f.clone()).unwrap_or_default(),
        problems: problems(live, crate::clock::now_ms()),
    })
    .into_response()
}
