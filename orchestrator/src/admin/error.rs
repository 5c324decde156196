//! The errors of the admin API and their one mapping to gRPC statuses.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// A valid request that the saga's current state refuses.
    #[error("{0}")]
    Refused(String),
    /// The saga kept changing under the request; trying again may succeed.
    #[error("{0}")]
    Conflict(String),
    /// The saga's stored data cannot be read: a bug, or a hand-made change.
    #[error("{0}")]
    Corrupt(String),
    /// The database refused or failed; [`runtime::error::database_status`] tells the client
    /// whether to retry.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(_) => Error::Conflict(e.to_string()),
            StoreError::Corrupt { .. } => Error::Corrupt(e.to_string()),
            StoreError::Database(db) => Error::Database(db),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(message) => tonic::Status::invalid_argument(message),
            Error::NotFound(message) => tonic::Status::not_found(message),
            Error::Refused(message) => tonic::Status::failed_precondition(message),
            Error::Conflict(message) => tonic::Status::aborted(message),
            Error::Corrupt(message) => {
                tracing::error!(error = %message, "unreadable saga");
                tonic::Status::internal(message)
            }
            Error::Database(e) => runtime::error::database_status(crate::SERVICE, &e),
        }
    }
}
