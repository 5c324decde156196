//! The correlation id and W3C trace context of a request: read (or made) once, passed to the
//! services as gRPC metadata, returned on every response.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tonic::metadata::MetadataValue;

use crate::error::ErrorBody;

pub const X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Longest correlation id taken from a client; a longer one is replaced by a new id.
const MAX_CORRELATION_ID_LEN: usize = 128;

/// What a request carries to the services it causes calls to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestContext {
    pub correlation_id: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl RequestContext {
    /// Takes the client's `X-Correlation-ID` when it is usable as a header and gRPC metadata
    /// value (visible ASCII, at most 128 characters), else makes a new UUID v4.
    pub fn from_headers(headers: &HeaderMap) -> RequestContext {
        let correlation_id = headers
            .get(&X_CORRELATION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= MAX_CORRELATION_ID_LEN
                    && id.bytes().all(|b| b.is_ascii_graphic())
            })
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        // Forwarded as they came (when they are ASCII); the services parse them.
        let ascii = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        RequestContext {
            correlation_id,
            traceparent: ascii(&TRACEPARENT),
            tracestate: ascii(&TRACESTATE),
        }
    }

    /// A gRPC request for `message` carrying the correlation id and the trace context: the
    /// current span's (the request's span, a child of the client's `traceparent`) when spans
    /// have one, else the client's as it came.
    pub fn grpc<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        let current = telemetry::propagation::TraceContext::current();
        let (traceparent, tracestate) = match &current {
            Some(current) => (
                Some(&current.traceparent),
                Some(&current.tracestate).filter(|s| !s.is_empty()),
            ),
            None => (self.traceparent.as_ref(), self.tracestate.as_ref()),
        };
        let entries = [
            ("x-correlation-id", Some(&self.correlation_id)),
            ("traceparent", traceparent),
            ("tracestate", tracestate),
        ];
        for (key, value) in entries {
            if let Some(value) = value.and_then(|v| MetadataValue::try_from(v.as_str()).ok()) {
                metadata.insert(key, value);
            }
        }
        request
    }
}

/// Handlers get the context the middleware made; without the middleware, one from the headers.
impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestContext>()
            .cloned()
            .unwrap_or_else(|| RequestContext::from_headers(&parts.headers)))
    }
}

/// The outermost middleware: settles the correlation id, lets the request log and the handlers
/// see it, writes error bodies (which need it) and returns it as a header on every response.
pub async fn middleware(mut request: Request, next: Next) -> Response {
    let context = RequestContext::from_headers(request.headers());
    let header = HeaderValue::from_str(&context.correlation_id).ok();
    if let Some(header) = &header {
        request
            .headers_mut()
            .insert(X_CORRELATION_ID, header.clone());
    }
    let correlation_id = context.correlation_id.clone();
    request.extensions_mut().insert(context);

    let mut response = next.run(request).await;

    if let Some(error) = response.extensions_mut().remove::<ErrorBody>() {
        error.write_into(&mut response, Some(&correlation_id));
    }
    if let Some(header) = header {
        response.headers_mut().insert(X_CORRELATION_ID, header);
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue};

    use super::{RequestContext, X_CORRELATION_ID};

    #[test]
    fn keeps_a_usable_id_and_replaces_an_unusable_one() {
        let mut headers = HeaderMap::new();
        headers.insert(X_CORRELATION_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(
            RequestContext::from_headers(&headers).correlation_id,
            "abc-123"
        );

        headers.insert(X_CORRELATION_ID, HeaderValue::from_static("has space"));
        let made = RequestContext::from_headers(&headers).correlation_id;
        assert!(uuid::Uuid::parse_str(&made).is_ok(), "{made}");

        let long = "x".repeat(129);
        headers.insert(X_CORRELATION_ID, HeaderValue::from_str(&long).unwrap());
        assert_ne!(RequestContext::from_headers(&headers).correlation_id, long);
    }

    #[test]
    fn forwards_the_ids_and_trace_context_as_metadata() {
        let mut headers = HeaderMap::new();
        headers.insert(X_CORRELATION_ID, HeaderValue::from_static("corr-1"));
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        headers.insert("traceparent", HeaderValue::from_static(traceparent));
        headers.insert("tracestate", HeaderValue::from_static("vendor=1"));
        let request = RequestContext::from_headers(&headers).grpc(());
        let metadata = request.metadata();
        assert_eq!(metadata.get("x-correlation-id").unwrap(), "corr-1");
        assert_eq!(metadata.get("traceparent").unwrap(), traceparent);
        assert_eq!(metadata.get("tracestate").unwrap(), "vendor=1");

        let request = RequestContext::from_headers(&HeaderMap::new()).grpc(());
        assert!(request.metadata().get("traceparent").is_none());
        assert!(request.metadata().get("x-correlation-id").is_some());
    }
}
