//! The REST routes and the layers every request goes through.

use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Request, Uri};
use axum::routing::{get, post};
use axum::{BoxError, Router};
use tower::ServiceBuilder;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::backends::Backends;
use crate::correlation::{self, X_CORRELATION_ID};
use crate::error::ApiError;
use crate::BODY_LIMIT_BYTES;

mod health;
mod orders;
mod payments;
mod products;

#[derive(Clone)]
pub(crate) struct AppState {
    pub backends: Backends,
    /// How long `/readyz` waits for each service's health check.
    pub readiness_timeout: Duration,
}

pub(crate) fn router(state: AppState, request_timeout: Duration) -> Router {
    Router::new()
        .route("/orders", post(orders::create))
        .route("/orders/{order_id}", get(orders::get))
        .route("/payment/verify", post(payments::verify))
        .route("/products", get(products::list))
        .route("/healthz", get(health::live))
        .route("/readyz", get(health::ready))
        // After the routes: it applies to the routes already added.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |error: BoxError| async move {
                    if error.is::<tower::timeout::error::Elapsed>() {
                        ApiError::Timeout(request_timeout)
                    } else {
                        tracing::error!(error, "request failed");
                        ApiError::Internal
                    }
                }))
                .timeout(request_timeout),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let correlation_id = request
                        .headers()
                        .get(X_CORRELATION_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let (method, path) = (request.method(), request.uri().path());
                    tracing::info_span!("http", %method, path, correlation_id)
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO))
                // A 5xx is already logged, with its cause, where the error is made.
                .on_failure(DefaultOnFailure::new().level(Level::WARN)),
        )
        .layer(axum::middleware::from_fn(correlation::middleware))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
