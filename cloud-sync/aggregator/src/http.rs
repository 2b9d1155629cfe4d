//! The aggregator's HTTP side: a JSON read API to script against, plus
//! `/metrics` (Prometheus) and `/healthz` (200 `{"status":"ok","problems":[]}`,
//! 503 `unhealthy` with the store's problems: the shape the edge answers).
//!
//! - `GET /api/v1/connections` → `[{"node","transport","remote","since_ms","serial","not_after"}]`:
//!   the nodes connected now, over QUIC or TCP, from which address, with
//!   which certificate.
//! - `GET /api/v1/nodes` → `[{"node","cursor","records","last_update_ms","incarnation","lost_records"}]`
//! - `GET /api/v1/records?node=N[&stream=S][&after_seq=K][&limit=L]` →
//!   `{"node","records":[{"seq","stream","timestamp_ms","received_ms","payload"}],"next_after_seq"}`.
//!   `payload` is the JSON value when the payload is JSON, otherwise the
//!   record has `payload_hex` instead. Page with `after_seq=next_after_seq`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fogline_telemetry::health::Health;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::service::nodes::Nodes;
use crate::store::health::StoreHealth;
use crate::store::{RecordQuery, Store, StoredRecord, MAX_QUERY_LIMIT};

/// Default page size of `/api/v1/records`.
const DEFAULT_LIMIT: usize = 1000;

#[derive(Clone)]
struct AppState {
    store: Arc<dyn Store>,
    nodes: Arc<Nodes>,
    health: Arc<StoreHealth>,
}

/// The router.
pub fn router(store: Arc<dyn Store>, nodes: Arc<Nodes>, health: Arc<StoreHealth>) -> Router {
    let metrics = fogline_telemetry::prometheus_handle();
    Router::new()
        .route("/api/v1/nodes", get(list_nodes))
        .route(
            "/api/v1/connections",
            get(|State(state): State<AppState>| async move { Json(state.nodes.connections()) }),
        )
        .route("/api/v1/records", get(records))
        .route("/api/v1/losses", get(losses))
        .route("/healthz", get(healthz))
        .route(
            "/metrics",
            get(move || std::future::ready(fogline_telemetry::render_metrics(&metrics))),
        )
        .with_state(AppState {
            store,
            nodes,
            health,
        })
}

/// `/healthz`: the shape the edge answers too (`fogline_telemetry::health`);
/// 503 while the store fails.
async fn healthz(State(state): State<AppState>) -> Response {
    let health = Health::of(state.health.problems());
    let code = StatusCode::from_u16(health.http_status()).unwrap_or(StatusCode::OK);
    (code, Json(health)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn list_nodes(State(state): State<AppState>) -> Response {
    match state.store.nodes().await {
        Ok(nodes) => Json(nodes).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct RecordsParams {
    node: Option<String>,
    stream: Option<String>,
    after_seq: Option<u64>,
    limit: Option<usize>,
}

fn record_json(r: StoredRecord) -> Value {
    let mut v = json!({
        "seq": r.seq,
        "stream": r.stream,
        "timestamp_ms": r.timestamp_ms,
        "received_ms": r.received_ms,
    });
    match serde_json::from_slice::<Value>(&r.payload) {
        Ok(p) => v["payload"] = p,
        Err(_) => {
            let hex: String = r.payload.iter().map(|b| format!("{b:02x}")).collect();
            v["payload_hex"] = Value::String(hex);
        }
    }
    v
}

/// A paged query's parameters: the node (required), `after_seq` (0) and
/// `limit` (checked), or the 400 answer naming what was wrong.
fn page(
    params: Result<Query<RecordsParams>, axum::extract::rejection::QueryRejection>,
    expected: &str,
) -> Result<(RecordsParams, String, u64, usize), Box<Response>> {
    let Ok(Query(mut p)) = params else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("bad query: expected {expected}"),
        )));
    };
    let Some(node) = p.node.take().filter(|n| !n.is_empty()) else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "missing required query parameter `node`",
        )));
    };
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_QUERY_LIMIT {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_QUERY_LIMIT}, got {limit}"),
        )));
    }
    let after_seq = p.after_seq.unwrap_or(0);
    Ok((p, node, after_seq, limit))
}

async fn records(
    State(state): State<AppState>,
    params: Result<Query<RecordsParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (p, node, after_seq, limit) = match page(
        params,
        "node=<id>[&stream=<topic>][&after_seq=<u64>][&limit=<1..10000>]",
    ) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let query = RecordQuery {
        node: node.clone(),
        stream: p.stream,
        after_seq,
        limit,
    };
    match state.store.records(&query).await {
        Ok(rows) => {
            let next = rows.last().map(|r| r.seq).unwrap_or(after_seq);
            let records: Vec<Value> = rows.into_iter().map(record_json).collect();
            Json(json!({ "node": node, "records": records, "next_after_seq": next }))
                .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `/api/v1/losses?node=<id>[&after_seq=<u64>][&limit=<n>]`: the node's loss
/// reports as it sent them, in order (I-33).
async fn losses(
    State(state): State<AppState>,
    params: Result<Query<RecordsParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (_, node, after_seq, limit) =
        match page(params, "node=<id>[&after_seq=<u64>][&limit=<1..10000>]") {
            Ok(v) => v,
            Err(r) => return *r,
        };
    match state.store.losses(&node, after_seq, limit).await {
        Ok(rows) => {
            let next = rows.last().map(|r| r.seq).unwrap_or(after_seq);
            Json(json!({ "node": node, "losses": rows, "next_after_seq": next })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
