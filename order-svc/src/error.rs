//! The errors of order-svc and their one mapping to gRPC statuses.

/// What can go wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what was stored before (an idempotency key reused for a
    /// different request).
    #[error("{0}")]
    Conflict(String),
    /// A dependency (payment-svc) cannot be reached or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
    /// A dependency failed in a way that retrying will not cure; logged, never shown.
    #[error("{0}")]
    Internal(String),
    /// The database refused or failed; [`runtime::error::database_status`] tells the client
    /// whether to retry.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(message) => tonic::Status::invalid_argument(message),
            Error::NotFound(message) => tonic::Status::not_found(message),
            Error::Conflict(message) => tonic::Status::already_exists(message),
            Error::Unavailable(message) => {
                tracing::warn!(error = %message, "dependency unavailable");
                tonic::Status::unavailable(message)
            }
            Error::Internal(message) => {
                tracing::error!(error = %message, "internal error");
                runtime::error::internal_status(crate::SERVICE)
            }
            // Only what may pass is worth a retry; anything else would fail again.
            Error::Database(e) => runtime::error::database_status(crate::SERVICE, &e),
        }
    }
}
