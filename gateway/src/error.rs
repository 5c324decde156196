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
    /// A customer route without a bearer token.
    #[error("{0}")]
    NoToken(String),
    /// A token that is not usable; the message says what is wrong with it, never its content.
    #[error("{0}")]
    Unauthorized(String),
    /// The token's customer may not do this (place an order for another customer).
    #[error("{0}")]
    Forbidden(String),
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
            ApiError::NoToken(_) | ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
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
    pub fn kind(&self) -> ErrorCode {
        match self {
            ApiError::MalformedJson(_) => ErrorCode::MalformedJson,
            ApiError::BadRequest(_) => ErrorCode::BadRequest,
            ApiError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ApiError::PayloadTooLarge => ErrorCode::PayloadTooLarge,
            ApiError::Invalid(_) => ErrorCode::InvalidRequest,
            ApiError::NoToken(_) | ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::TooManyRequests(_) => ErrorCode::TooManyRequests,
            ApiError::Unavailable { .. } | ApiError::ServiceTimedOut { .. } => {
                ErrorCode::ServiceUnavailable
            }
            ApiError::Timeout(_) => ErrorCode::Timeout,
            ApiError::Internal => ErrorCode::Internal,
        }
    }

    /// [`ApiError::kind`] as it is written in the body.
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
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

/// The kinds of error, as the body names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedJson,
    BadRequest,
    UnsupportedMediaType,
    PayloadTooLarge,
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    TooManyRequests,
    ServiceUnavailable,
    Timeout,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::ServiceUnavailable => "service_unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Every error answer's body.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDocument {
    pub error: ErrorDetail,
    /// The request's correlation id, also in the `X-Correlation-ID` header.
    pub correlation_id: Option<String>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// For people: what was wrong and, where it helps, what to do.
    pub message: String,
}

/// The JSON error body; the correlation middleware adds the request's correlation id.
#[derive(Clone, Debug)]
pub(crate) struct ErrorBody {
    code: ErrorCode,
    message: String,
}

impl ErrorBody {
    pub(crate) fn write_into(&self, response: &mut Response, correlation_id: Option<&str>) {
        let document = ErrorDocument {
            error: ErrorDetail {
                code: self.code,
                message: self.message.clone(),
            },
            correlation_id: correlation_id.map(str::to_owned),
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
            code: self.kind(),
            message: self.to_string(),
        };
        let mut response = self.status().into_response();
        // RFC 6750: the scheme, and that the token is not usable when one came.
        let challenge = match self {
            ApiError::NoToken(_) => Some(r#"Bearer realm="orders""#),
            ApiError::Unauthorized(_) => Some(r#"Bearer realm="orders", error="invalid_token""#),
            _ => None,
        };
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
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
