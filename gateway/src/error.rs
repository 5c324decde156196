//! The gateway's errors and their one mapping to HTTP: from gRPC codes, from axum's body
//! rejections, and to the JSON error body.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::backends::Service;
use crate::BODY_LIMIT_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("{0}")]
    MalformedJson(String),
    /// A path parameter or header is malformed.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than {BODY_LIMIT_BYTES} bytes")]
    PayloadTooLarge,
    /// Well-formed JSON with missing or mistyped fields, or a request a service refused as invalid.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("the {service} is unavailable; try again later")]
    Unavailable { service: Service },
    #[error("the {service} did not answer in time; try again later")]
    ServiceTimedOut { service: Service },
    #[error("the request did not complete within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// Details are logged where the error is made, never returned.
    #[error("internal error; the gateway's logs have the details under this correlation id")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } | ApiError::ServiceTimedOut { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error's kind in the body, stable for clients to match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Invalid(_) => "invalid_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::Unavailable { .. } | ApiError::ServiceTimedOut { .. } => {
                "service_unavailable"
            }
            ApiError::Timeout(_) => "timeout",
            ApiError::Internal => "internal",
        }
    }

    /// The one mapping of a service's gRPC status to the gateway's answer. The services' own
    /// messages for refusals are written for clients and passed on; anything else is logged.
    pub fn from_grpc(service: Service, status: tonic::Status) -> ApiError {
        let message = |fallback: &str| match status.message() {
            "" => fallback.to_owned(),
            message => message.to_owned(),
        };
        let unexpected = || {
            let (code, message) = (status.code(), status.message());
            tracing::error!(%service, ?code, message, "unexpected gRPC error");
            ApiError::Internal
        };
        match status.code() {
            tonic::Code::InvalidArgument => ApiError::Invalid(message("invalid request")),
            tonic::Code::NotFound => ApiError::NotFound(message("not found")),
            tonic::Code::AlreadyExists => ApiError::Conflict(message("already exists")),
            tonic::Code::FailedPrecondition | tonic::Code::Aborted => {
                ApiError::Conflict(message("refused in the current state"))
            }
            tonic::Code::ResourceExhausted => {
                ApiError::TooManyRequests(message("too many requests; try again later"))
            }
            tonic::Code::Unavailable => {
                tracing::warn!(%service, message = status.message(), "service unavailable");
                ApiError::Unavailable { service }
            }
            tonic::Code::DeadlineExceeded => {
                tracing::warn!(%service, message = status.message(), "service deadline exceeded");
                ApiError::ServiceTimedOut { service }
            }
            tonic::Code::Ok
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::PermissionDenied
            | tonic::Code::OutOfRange
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::DataLoss
            | tonic::Code::Unauthenticated => unexpected(),
        }
    }

    /// A reply a service should never give (a missing field, an impossible value).
    pub fn invalid_reply(service: Service, problem: impl std::fmt::Display) -> ApiError {
        tracing::error!(%service, %problem, "invalid reply");
        ApiError::Internal
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        // axum's own texts start with a generic sentence; the cause is what helps a client.
        let cause = |e: &dyn std::error::Error| {
            e.source()
                .map_or_else(|| e.to_string(), ToString::to_string)
        };
        match rejection {
            JsonRejection::JsonDataError(e) => {
                ApiError::Invalid(format!("invalid request body: {}", cause(&e)))
            }
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::MalformedJson(format!("malformed JSON: {}", cause(&e)))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "expected a JSON body with `Content-Type: application/json`".to_owned(),
            ),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge
            }
            // `JsonRejection` is non-exhaustive: whatever else stops reading the body is the client's.
            other => ApiError::BadRequest(format!(
                "could not read the request body: {}",
                cause(&other)
            )),
        }
    }
}

/// The JSON error body; the correlation middleware adds the request's correlation id.
#[derive(Clone, Debug)]
pub(crate) struct ErrorBody {
    code: &'static str,
    message: String,
}

impl ErrorBody {
    pub(crate) fn write_into(&self, response: &mut Response, correlation_id: Option<&str>) {
        #[derive(serde::Serialize)]
        struct Document<'a> {
            error: Inner<'a>,
            correlation_id: Option<&'a str>,
        }
        #[derive(serde::Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
        }
        let document = Document {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
            correlation_id,
        };
        // Serialising strings cannot fail; the fallback keeps the body JSON regardless.
        let body = serde_json::to_vec(&document).unwrap_or_else(|_| b"{}".to_vec());
        *response.body_mut() = axum::body::Body::from(body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code(),
            message: self.to_string(),
        };
        let mut response = self.status().into_response();
        body.write_into(&mut response, None);
        response.extensions_mut().insert(body);
        response
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use tonic::Code;

    use super::ApiError;
    use crate::backends::Service;

    fn status_of(code: Code) -> StatusCode {
        ApiError::from_grpc(Service::Order, tonic::Status::new(code, "why")).status()
    }

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        let expected = [
            (Code::InvalidArgument, StatusCode::UNPROCESSABLE_ENTITY),
            (Code::NotFound, StatusCode::NOT_FOUND),
            (Code::AlreadyExists, StatusCode::CONFLICT),
            (Code::FailedPrecondition, StatusCode::CONFLICT),
            (Code::Aborted, StatusCode::CONFLICT),
            (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (Code::DeadlineExceeded, StatusCode::SERVICE_UNAVAILABLE),
            (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS),
            (Code::Ok, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::Cancelled, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::Unknown, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::PermissionDenied, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::OutOfRange, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::Unimplemented, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::DataLoss, StatusCode::INTERNAL_SERVER_ERROR),
            (Code::Unauthenticated, StatusCode::INTERNAL_SERVER_ERROR),
        ];
        for (code, status) in expected {
            assert_eq!(status_of(code), status, "{code:?}");
        }
    }

    #[test]
    fn refusals_keep_the_services_message_and_failures_hide_it() {
        let refused = ApiError::from_grpc(
            Service::Order,
            tonic::Status::invalid_argument("items[0].quantity must be at least 1"),
        );
        assert_eq!(refused.code(), "invalid_request");
        assert_eq!(refused.to_string(), "items[0].quantity must be at least 1");

        let failed = ApiError::from_grpc(
            Service::Payment,
            tonic::Status::internal("connection to db-7 refused"),
        );
        assert_eq!(failed.code(), "internal");
        assert!(!failed.to_string().contains("db-7"));
    }

    #[test]
    fn unavailable_names_the_service() {
        let error = ApiError::from_grpc(
            Service::Inventory,
            tonic::Status::unavailable("tcp connect error"),
        );
        assert_eq!(error.code(), "service_unavailable");
        assert!(error.to_string().contains("inventory service"), "{error}");
        let error = ApiError::from_grpc(Service::Payment, tonic::Status::deadline_exceeded(""));
        assert!(error.to_string().contains("payment service"), "{error}");
    }
}
