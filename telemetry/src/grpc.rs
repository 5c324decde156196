//! Tracing and metrics of gRPC servers and clients (tonic).
//!
//! Servers: `Server::builder().layer(telemetry::grpc::ServerLayer)` gives every request a span
//! named by its RPC (`order.v1.OrderService/CreateOrder`) with `rpc.*` attributes and the
//! caller's `x-correlation-id`, a child of the caller's `traceparent`, and counts it in
//! `grpc_requests_total` and `grpc_request_duration_seconds`. Health checks and reflection
//! are left alone.
//!
//! Clients: [`ClientInterceptor`] (or [`inject`]) sends the current span's trace context.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tonic::metadata::{MetadataMap, MetadataValue};
use tracing::Instrument as _;

use crate::metric;
use crate::propagation::{self, TraceContext, TRACEPARENT, TRACESTATE};

/// Metadata key of the saga's correlation id.
pub const CORRELATION_ID: &str = "x-correlation-id";

/// Longest correlation id or trace header read from a request.
const MAX_HEADER_LEN: usize = 512;

/// The tower layer that traces and measures a tonic server's requests.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerLayer;

impl<S> tower::Layer<S> for ServerLayer {
    type Service = ServerTracing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTracing { inner }
    }
}

/// See [`ServerLayer`].
#[derive(Clone, Debug)]
pub struct ServerTracing<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B, RB> tower::Service<http::Request<B>> for ServerTracing<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone is not ready; the one that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some((service, method)) = rpc_of(request.uri().path()) else {
            return Box::pin(inner.call(request));
        };
        if service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.") {
            return Box::pin(inner.call(request));
        }
        let headers = request.headers();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| v.len() <= MAX_HEADER_LEN)
                .unwrap_or_default()
        };
        let span = tracing::info_span!(
            "grpc",
            otel.name = %&request.uri().path()[1..],
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            correlation_id = %header(CORRELATION_ID),
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        propagation::set_parent(&span, header(TRACEPARENT), header(TRACESTATE));
        let (service, method) = (service.to_owned(), method.to_owned());
        let started = Instant::now();
        let response = span.in_scope(|| inner.call(request));
        Box::pin(
            async move {
                let result = response.await;
                let code = match &result {
                    // A unary call that failed answers with its status in the headers
                    // (trailers-only); one that succeeded sends OK in the trailers.
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                    Err(_) => tonic::Code::Internal,
                };
                let span = tracing::Span::current();
                span.record("rpc.grpc.status_code", code as i32);
                if code != tonic::Code::Ok {
                    span.record("otel.status_code", "ERROR");
                }
                record(service, method, code, started);
                result
            }
            .instrument(span),
        )
    }
}

/// `/package.Service/Method` -> (`package.Service`, `Method`).
fn rpc_of(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

fn record(service: String, method: String, code: tonic::Code, started: Instant) {
    // An unknown service or method would make a new series per path a client invents.
    let (service, method) = if code == tonic::Code::Unimplemented {
        ("unknown".to_owned(), "unknown".to_owned())
    } else {
        (service, method)
    };
    metrics::histogram!(
        metric::GRPC_REQUEST_DURATION,
        "service" => service.clone(),
        "method" => method.clone(),
    )
    .record(started.elapsed().as_secs_f64());
    metrics::counter!(
        metric::GRPC_REQUESTS,
        "service" => service,
        "method" => method,
        "code" => code_name(code),
    )
    .increment(1);
}

/// The canonical name of a status code, as gRPC documents it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Writes the current span's trace context into `metadata`, replacing what was there; leaves
/// it unchanged when spans have no context (then the caller's own `traceparent`, if it set
/// one, goes on).
pub fn inject(metadata: &mut MetadataMap) {
    let Some(context) = TraceContext::current() else {
        return;
    };
    if let Ok(value) = MetadataValue::try_from(context.traceparent.as_str()) {
        metadata.insert(TRACEPARENT, value);
    }
    match MetadataValue::try_from(context.tracestate.as_str()) {
        Ok(value) if !context.tracestate.is_empty() => {
            metadata.insert(TRACESTATE, value);
        }
        _ => {
            metadata.remove(TRACESTATE);
        }
    }
}

/// Sets the correlation id of a request (when it is a valid metadata value).
pub fn set_correlation_id(metadata: &mut MetadataMap, correlation_id: &str) {
    if correlation_id.is_empty() {
        return;
    }
    if let Ok(value) = MetadataValue::try_from(correlation_id) {
        metadata.insert(CORRELATION_ID, value);
    }
}

/// A tonic client interceptor sending the current span's trace context with every call
/// (`Client::with_interceptor(channel, ClientInterceptor)`). The correlation id is the
/// caller's to set ([`set_correlation_id`]): it belongs to the request, not to the span.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientInterceptor;

impl tonic::service::Interceptor for ClientInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject(request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_come_from_the_path() {
        assert_eq!(
            rpc_of("/order.v1.OrderService/CreateOrder"),
            Some(("order.v1.OrderService", "CreateOrder"))
        );
        assert_eq!(rpc_of("/"), None);
        assert_eq!(rpc_of("/x"), None);
        assert_eq!(rpc_of("/a/b/c"), None);
        assert_eq!(rpc_of("//m"), None);
    }

    #[test]
    fn codes_have_their_canonical_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
    }
}
