//! Liveness and readiness probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::backends::Readiness;

/// The process answers: nothing else is checked.
pub(super) async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when every service answers its gRPC health check as serving; else 503 naming the
/// ones that do not.
pub(super) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let services = state.backends.readiness(state.readiness_timeout).await;
    let unavailable: Vec<&str> = services
        .iter()
        .filter(|(_, readiness)| **readiness != Readiness::Serving)
        .map(|(name, _)| *name)
        .collect();
    if unavailable.is_empty() {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "services": services })),
        )
    } else {
        let body =
            json!({ "status": "not_ready", "unavailable": unavailable, "services": services });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}
