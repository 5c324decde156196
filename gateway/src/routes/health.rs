//! Liveness and readiness probes.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::AppState;
use crate::backends::Readiness;

#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Liveness {
    /// Always `ok`.
    status: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ReadinessReport {
    /// `ready`, or `not_ready`.
    status: String,
    /// The services that are not serving (only when not ready).
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<Vec<String>>,
    /// What each service's gRPC health check answered, by service.
    services: BTreeMap<String, Readiness>,
}

/// The process answers: nothing else is checked.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "live",
    responses((status = 200, description = "The gateway's process answers.", body = Liveness))
)]
pub(super) async fn live() -> Json<Liveness> {
    Json(Liveness {
        status: "ok".to_owned(),
    })
}

/// Ready when every service answers its gRPC health check as serving; else 503 naming the
/// ones that do not.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "ready",
    responses(
        (status = 200, description = "Every service is serving.", body = ReadinessReport),
        (status = 503, description = "Some service is not serving.", body = ReadinessReport),
    )
)]
pub(super) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<ReadinessReport>) {
    let services: BTreeMap<String, Readiness> = state
        .backends
        .readiness(state.readiness_timeout)
        .await
        .into_iter()
        .map(|(name, readiness)| (name.to_owned(), readiness))
        .collect();
    let unavailable: Vec<String> = services
        .iter()
        .filter(|(_, readiness)| **readiness != Readiness::Serving)
        .map(|(name, _)| name.clone())
        .collect();
    if unavailable.is_empty() {
        let report = ReadinessReport {
            status: "ready".to_owned(),
            unavailable: None,
            services,
        };
        (StatusCode::OK, Json(report))
    } else {
        let report = ReadinessReport {
            status: "not_ready".to_owned(),
            unavailable: Some(unavailable),
            services,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(report))
    }
}
