//! The errors of the gRPC API, and their one mapping to gRPC statuses.

/// What can go wrong serving a gRPC request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the culprit.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    /// The database refused or failed; [`runtime::error::database_status`] tells the client
    /// whether to retry.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid { .. } => tonic::Status::invalid_argument(error.to_string()),
            Error::NotFound(message) => tonic::Status::not_found(message),
            Error::Database(e) => runtime::error::database_status(crate::SERVICE, &e),
        }
    }
}
