//! `/api/v1/rollouts`: signed builds rolled out to the fleet (I-42).
//!
//! - `POST /api/v1/rollouts` (admin) with
//!   `{"function","module_base64","signature","target":{"nodes":[..]}|{"percent":N}|{"label":"k=v"},
//!   "stages":[..],"max_failure_rate":F}` → 201 and the rollout.
//! - `GET /api/v1/rollouts` → every rollout (without its signature), oldest first.
//! - `GET /api/v1/rollouts/{id}` → one, with each node's state and reason.
//! - `POST /api/v1/rollouts/{id}/stop` (admin) → stops it; the nodes it
//!   reached that took the build revert.

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;

use super::{error, AppState};
use crate::rollout::controller::CreateError;
use crate::rollout::{Rollout, RolloutRequest};

/// Largest request body: the biggest build a frame carries, base64, plus
/// the rest of the request.
const MAX_BODY_BYTES: usize = fogline_protocol::deploy::MAX_DEPLOY_MODULE_BYTES / 3 * 4 + 64 * 1024;

/// The routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/rollouts",
            get(list)
                .post(create)
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .route("/api/v1/rollouts/{id}", get(one))
        .route("/api/v1/rollouts/{id}/stop", post(stop))
}

/// A rollout as served: the signature document left out of lists.
fn view(r: &Rollout, with_signature: bool) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if !with_signature {
        if let Some(o) = v.as_object_mut() {
            o.remove("signature");
        }
    }
    v
}

async fn create(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let req: RolloutRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("rollout request: {e}")),
    };
    match state.rollouts.create(req).await {
        Ok(r) => (StatusCode::CREATED, Json(view(&r, false))).into_response(),
        Err(CreateError::Request(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(CreateError::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn list(State(state): State<AppState>) -> Response {
    match state.rollouts.list().await {
        Ok(all) => Json(all.iter().map(|r| view(r, false)).collect::<Vec<_>>()).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn one(State(state): State<AppState>, Path(id): Path<u64>) -> Response {
    match state.rollouts.get(id).await {
        Ok(Some(r)) => Json(view(&r, true)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no rollout {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn stop(State(state): State<AppState>, Path(id): Path<u64>) -> Response {
    match state
        .rollouts
        .stop(id, "stopped by an operator".into())
        .await
    {
        Ok(Some(r)) => Json(view(&r, false)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no rollout {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
