//! The aggregator's HTTP side: a JSON read API to script against, plus
//! `/metrics` (Prometheus) and `/healthz` (200 `{"status":"ok","problems":[]}`,
//! 503 `unhealthy` with the store's problems: the shape the edge answers).
//! Every path needs a bearer token (`auth.rs`) unless `[http] open` lists
//! it. Times are ms since the Unix epoch throughout; seqs, cursors, tokens
//! and incarnations (u64, past what JavaScript holds exactly) are strings.
//!
//! - `GET /api/v1/connections` → `[{"node","transport","remote","since_ms","serial","not_after"}]`.
//! - `GET /api/v1/nodes` → `[{"node","connected","aggregator","last_seen_ms","lag_ms","records_per_s",
//!   "cursor","records","last_update_ms","incarnation","lost_records","losses","status","status_received_ms"}]`.
//! - `GET /api/v1/nodes/{id}` → the same for one node, plus `"streams":[{"stream","records","last_ms"}]`
//!   and `"throughput":[{"t_ms","records"}]` (per minute, the last hour, applied here).
//! - `GET /api/v1/records?node=N[&stream=F][&after_seq=K][&from_ms=T][&to_ms=T][&limit=L]` →
//!   `{"node","records":[{"seq","stream","timestamp_ms","received_ms","payload"}],"next_after_seq","more"}`:
//!   `stream` is an MQTT topic filter (`+`, `#`); `from_ms`/`to_ms` bound the
//!   event time; the page is bounded in rows and in bytes (`[http]
//!   max_response_bytes`) and streamed. `payload` is the JSON value when the
//!   payload is JSON, otherwise `payload_hex`.
//! - `GET /api/v1/latest?node=N[&stream=F]` → `{"node","records":[...]}`: the newest record
//!   of each stream.
//! - `GET /api/v1/losses?node=N[&after_seq=K][&limit=L]` → the node's loss reports.
//! - `GET /api/v1/leases` → `[{"node","token","holder","since_ms"}]`: which aggregator holds
//!   each node (I-36).
//! - `/api/v1/rollouts`: rollouts of signed modules (`rollouts.rs`).

pub mod auth;
mod json;
mod rollouts;
mod ui;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fogline_telemetry::health::Health;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::service::latest::{LatestCache, Lookup};
use crate::service::nodes::{Activity, Nodes};
use crate::store::health::StoreHealth;
use crate::store::{
    NodeSummary, RecordQuery, Store, StoreError, StoredRecord, MAX_LATEST_STREAMS, MAX_QUERY_LIMIT,
};

/// Default page size of `/api/v1/records`.
const DEFAULT_LIMIT: usize = 1000;

#[derive(Clone)]
struct AppState {
    store: Arc<dyn Store>,
    nodes: Arc<Nodes>,
    latest: Arc<LatestCache>,
    health: Arc<StoreHealth>,
    max_response_bytes: usize,
    rollouts: Arc<crate::rollout::Controller>,
}

/// What the router serves from.
pub struct Api {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Which connection speaks for each node.
    pub nodes: Arc<Nodes>,
    /// Newest record per stream of the nodes held here.
    pub latest: Arc<LatestCache>,
    /// Store failures, for `/healthz`.
    pub health: Arc<StoreHealth>,
    /// Who may ask.
    pub tokens: Arc<auth::Tokens>,
    /// Byte bound of a records page.
    pub max_response_bytes: usize,
    /// Rollouts of signed modules.
    pub rollouts: Arc<crate::rollout::Controller>,
}

/// The router.
pub fn router(api: Api) -> Router {
    let metrics = fogline_telemetry::prometheus_handle();
    Router::new()
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/nodes/{id}", get(node_detail))
        .route(
            "/api/v1/connections",
            get(|State(state): State<AppState>| async move { Json(state.nodes.connections()) }),
        )
        .route("/api/v1/records", get(records))
        .route("/api/v1/latest", get(latest))
        .route("/api/v1/losses", get(losses))
        .route("/api/v1/leases", get(leases))
        .merge(rollouts::routes())
        .route("/healthz", get(healthz))
        .route(
            "/metrics",
            get(move || std::future::ready(fogline_telemetry::render_metrics(&metrics))),
        )
        .merge(ui::routes())
        .layer(axum::middleware::from_fn_with_state(
            api.tokens,
            auth::require,
        ))
        .with_state(AppState {
            store: api.store,
            nodes: api.nodes,
            latest: api.latest,
            health: api.health,
            max_response_bytes: api.max_response_bytes,
            rollouts: api.rollouts,
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

/// A status this old (twice the edge's default `status_every`, plus
/// slack) no longer shows a node connected to another aggregator.
const STATUS_FRESH_MS: u64 = 90_000;

/// A node as the fleet view shows it: the store's summary, plus whether it
/// is connected (here, or to the aggregator holding its lease with a fresh
/// status), when it was last seen, its replication lag (now − event time
/// of its oldest unacknowledged record, by its status; 0 with no backlog)
/// and the records per second this aggregator applied for it.
fn node_view(
    n: NodeSummary,
    holder: Option<&str>,
    activity: Option<(bool, Activity)>,
    now_ms: u64,
) -> Value {
    let here = activity.as_ref().is_some_and(|a| a.0);
    let seen_here = activity.as_ref().map_or(0, |a| a.1.last_seen_ms);
    let status_at = n.status_received_ms.unwrap_or(0);
    let connected =
        here || (holder.is_some() && now_ms.saturating_sub(status_at) < STATUS_FRESH_MS);
    let last_seen = seen_here.max(status_at).max(n.last_update_ms);
    let lag_ms = n.status.as_ref().and_then(|s| {
        if s["backlog_records"].as_u64() == Some(0) {
            Some(0)
        } else {
            s["oldest_ms"].as_u64().map(|t| now_ms.saturating_sub(t))
        }
    });
    let rate = activity.filter(|a| a.0).map(|a| a.1.records_per_s(now_ms));
    let mut v = serde_json::to_value(&n).unwrap_or_default();
    v["connected"] = json!(connected);
    v["aggregator"] = json!(holder);
    v["last_seen_ms"] = if last_seen == 0 {
        Value::Null
    } else {
        json!(last_seen)
    };
    v["lag_ms"] = json!(lag_ms);
    v["records_per_s"] = json!(rate);
    v
}

async fn list_nodes(State(state): State<AppState>) -> Response {
    let (nodes, leases) = match tokio::try_join!(state.store.nodes(), state.store.leases()) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let now = fogline_telemetry::clock::now_ms();
    let holders: std::collections::HashMap<String, Option<String>> =
        leases.into_iter().map(|l| (l.node, l.holder)).collect();
    let views: Vec<Value> = nodes
        .into_iter()
        .map(|n| {
            let holder = holders.get(&n.node).and_then(|h| h.as_deref());
            let activity = state.nodes.activity(&n.node);
            node_view(n, holder, activity, now)
        })
        .collect();
    Json(views).into_response()
}

/// `/api/v1/nodes/{id}`: the node's view, its streams, and the records per
/// minute this aggregator applied for it over the last hour.
async fn node_detail(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let (node, lease, streams) = match tokio::try_join!(
        state.store.node(&id),
        state.store.lease(&id),
        state.store.streams(&id)
    ) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let Some(n) = node else {
        return error(StatusCode::NOT_FOUND, format!("no node {id:?} is known"));
    };
    let now = fogline_telemetry::clock::now_ms();
    let holder = lease.and_then(|l| l.holder);
    let activity = state.nodes.activity(&id);
    let throughput: Vec<Value> = activity
        .as_ref()
        .map(|a| a.1.throughput(now))
        .unwrap_or_default()
        .into_iter()
        .map(|(t_ms, records)| json!({ "t_ms": t_ms, "records": records }))
        .collect();
    let mut v = node_view(n, holder.as_deref(), activity, now);
    v["streams"] = json!(streams);
    v["throughput"] = json!(throughput);
    Json(v).into_response()
}

#[derive(Debug, Deserialize)]
struct RecordsParams {
    node: Option<String>,
    stream: Option<String>,
    after_seq: Option<u64>,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    limit: Option<usize>,
}

/// A paged query's parameters: the node (required), `after_seq` (0) and
/// `limit` (checked), a well-formed `stream` filter and time range, or the
/// 400 answer naming what was wrong.
fn page(
    params: Result<Query<RecordsParams>, axum::extract::rejection::QueryRejection>,
    expected: &str,
) -> Result<(RecordsParams, String, u64, usize), Box<Response>> {
    let bad = |m: String| Box::new(error(StatusCode::BAD_REQUEST, m));
    let Ok(Query(mut p)) = params else {
        return Err(bad(format!("bad query: expected {expected}")));
    };
    let Some(node) = p.node.take().filter(|n| !n.is_empty()) else {
        return Err(bad("missing required query parameter `node`".into()));
    };
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_QUERY_LIMIT {
        return Err(bad(format!(
            "limit must be between 1 and {MAX_QUERY_LIMIT}, got {limit}"
        )));
    }
    check_filter(p.stream.as_deref()).map_err(bad)?;
    if let (Some(from), Some(to)) = (p.from_ms, p.to_ms) {
        if from >= to {
            return Err(bad(format!("from_ms ({from}) must be below to_ms ({to})")));
        }
    }
    let after_seq = p.after_seq.unwrap_or(0);
    Ok((p, node, after_seq, limit))
}

fn check_filter(stream: Option<&str>) -> Result<(), String> {
    match stream {
        Some(f) => fogline_protocol::topic::validate_filter(f)
            .map_err(|why| format!("stream: {f:?} is not an MQTT topic filter: it {why}")),
        None => Ok(()),
    }
}

async fn records(
    State(state): State<AppState>,
    params: Result<Query<RecordsParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (p, node, after_seq, limit) = match page(
        params,
        "node=<id>[&stream=<topic filter>][&after_seq=<u64>][&from_ms=<ms>][&to_ms=<ms>][&limit=<1..10000>]",
    ) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let query = RecordQuery {
        node: node.clone(),
        stream: p.stream,
        after_seq,
        from_ms: p.from_ms,
        to_ms: p.to_ms,
        limit,
        max_bytes: state.max_response_bytes,
    };
    match state.store.records_page(&query).await {
        Ok(page) => json::records_page(node, page),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct LatestParams {
    node: Option<String>,
    stream: Option<String>,
}

/// `/api/v1/latest?node=<id>[&stream=<filter>]`: the newest record of each
/// stream.
async fn latest(
    State(state): State<AppState>,
    params: Result<Query<LatestParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad query: expected node=<id>[&stream=<topic filter>]",
        );
    };
    let Some(node) = p.node.filter(|n| !n.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing required query parameter `node`",
        );
    };
    if let Err(m) = check_filter(p.stream.as_deref()) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    match latest_records(&state, &node, p.stream.as_deref()).await {
        Ok(rows) => {
            let records: Vec<Value> = rows.into_iter().map(json::record).collect();
            Json(json!({ "node": node, "records": records })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// From the cache when this aggregator holds the node's lease and the
/// store confirms it still does (I-38), else from the store.
async fn latest_records(
    state: &AppState,
    node: &str,
    filter: Option<&str>,
) -> Result<Vec<StoredRecord>, StoreError> {
    let count = |result: &'static str| {
        metrics::counter!(crate::service::events::LATEST_LOOKUPS_TOTAL, "result" => result)
            .increment(1)
    };
    match state.latest.get(node, filter) {
        Lookup::Hit { token, records } => {
            if state
                .store
                .lease(node)
                .await?
                .is_some_and(|l| l.token == token)
            {
                count("hit");
                return Ok(records);
            }
            count("stale");
        }
        Lookup::Unfilled { token } => {
            // Read after the lease was taken: final for earlier holders;
            // what this session applies meanwhile merges by seq.
            let all = state.store.latest(node, None).await?;
            let complete = all.len() < MAX_LATEST_STREAMS;
            count("fill");
            if complete {
                let matching = all
                    .iter()
                    .filter(|r| {
                        filter.is_none_or(|f| fogline_protocol::topic::matches(f, &r.stream))
                    })
                    .cloned()
                    .collect();
                state.latest.fill(node, token, all, true);
                return Ok(matching);
            }
            state.latest.fill(node, token, Vec::new(), false);
        }
        Lookup::Uncached => count("store"),
    }
    state.store.latest(node, filter).await
}

async fn leases(State(state): State<AppState>) -> Response {
    match state.store.leases().await {
        Ok(leases) => Json(
            leases
                .into_iter()
                .map(|l| {
                    json!({
                        "node": l.node,
                        "token": l.token.to_string(),
                        "holder": l.holder,
                        "since_ms": l.since_ms,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
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
            Json(json!({ "node": node, "losses": rows, "next_after_seq": next.to_string() }))
                .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
