//! The REST routes and the layers every request goes through.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::FromRef;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::header;
use axum::http::{Method, Request, Uri};
use axum::middleware::Next;
use axum::response::IntoResponse as _;
use axum::response::Response;
use axum::routing::get;
use axum::{BoxError, Router};
use telemetry::metric;
use tower::ServiceBuilder;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, OnResponse as _, TraceLayer};
use tracing::Level;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::backends::Backends;
use crate::correlation::{self, X_CORRELATION_ID};
use crate::error::ApiError;
use crate::identity::Verifier;
use crate::{openapi, BODY_LIMIT_BYTES};

mod health;
mod orders;
mod payments;
mod products;

#[derive(Clone)]
pub(crate) struct AppState {
    pub backends: Backends,
    /// How long `/readyz` waits for each service's health check.
    pub readiness_timeout: Duration,
    /// Every request's time limit; long polls end before it.
    pub request_timeout: Duration,
    pub verifier: Verifier,
}

impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Verifier {
        state.verifier.clone()
    }
}

/// The API's routes with their OpenAPI document, made from the same annotations, so that no
/// route goes undocumented.
fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, document) = OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(orders::create, orders::list))
        .routes(routes!(orders::get))
        .routes(routes!(payments::verify))
        .routes(routes!(products::list))
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
        .split_for_parts();
    (router, openapi::complete(document))
}

/// The OpenAPI document, as `GET /openapi.json` serves it.
pub(crate) fn openapi_json() -> String {
    let (_, document) = api();
    // Serialising the document's own types cannot fail.
    document.to_pretty_json().unwrap_or_default() + "\n"
}

pub(crate) fn router(state: AppState, request_timeout: Duration) -> Router {
    let (api, _) = api();
    let document = openapi_json();
    api.route(
        openapi::PATH,
        get(move || async move {
            (
                [(header::CONTENT_TYPE, "application/json")],
                document.clone(),
            )
                .into_response()
        }),
    )
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
    .layer(axum::middleware::from_fn(measure))
    .layer(
        TraceLayer::new_for_http()
            .make_span_with(request_span)
            .on_response(
                |response: &Response, latency: Duration, span: &tracing::Span| {
                    span.record("http.response.status_code", response.status().as_u16());
                    // Per request: debug, so that default settings cost nothing.
                    DefaultOnResponse::new()
                        .level(Level::DEBUG)
                        .on_response(response, latency, span);
                },
            )
            // A 5xx is already logged, with its cause, where the error is made.
            .on_failure(DefaultOnFailure::new().level(Level::WARN)),
    )
    .layer(axum::middleware::from_fn(correlation::middleware))
}

/// The span of a request: named by its route (`POST /orders`), with the correlation id the
/// correlation middleware settled, a child of the client's `traceparent` when it sent one
/// (otherwise the root of a new trace).
fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let correlation_id = header(X_CORRELATION_ID.as_str());
    let (method, path) = (request.method(), request.uri().path());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(path, MatchedPath::as_str);
    let span = tracing::info_span!(
        "http",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        %method,
        path,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        correlation_id,
    );
    telemetry::propagation::set_parent(&span, header("traceparent"), header("tracestate"));
    span
}

/// Counts every request and its latency by route (the route's pattern, so that ids in paths
/// make no new series) and status.
async fn measure(route: Option<MatchedPath>, request: Request<Body>, next: Next) -> Response {
    let route = route.map_or_else(|| "unmatched".to_owned(), |r| r.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::histogram!(metric::HTTP_REQUEST_DURATION, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(
        metric::HTTP_REQUESTS,
        "route" => route,
        "status" => response.status().as_str().to_owned(),
    )
    .increment(1);
    response
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
