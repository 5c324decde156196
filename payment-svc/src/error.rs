//! The errors of this service, and their one mapping to gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// A valid request that the payment's current state refuses.
    #[error("{0}")]
    Refused(String),
    #[error("database: {0}")]
    Unavailable(#[from] sqlx::Error),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(message) => Status::invalid_argument(message),
            Error::NotFound(message) => Status::not_found(message),
            Error::Refused(message) => Status::failed_precondition(message),
            Error::Unavailable(e) => {
                tracing::error!(error = %e, "database error");
                Status::unavailable("the payment database is unavailable, try again")
            }
        }
    }
}
