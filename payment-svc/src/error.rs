//! The errors of this service, and their one mapping to gRPC statuses.

use proto::payment::v1 as pb;
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
    /// Asked to check the customer of a payment recorded before payments knew their
    /// customer: the caller must check it another way (see `VerifyPaymentRequest`).
    #[error("{0}")]
    OwnerUnknown(String),
    /// The payment provider did not answer in time; the attempt stays recorded, and a retry
    /// settles it.
    #[error("{0}")]
    ProviderTimedOut(String),
    /// Something that should not happen; logged, never shown.
    #[error("{0}")]
    Internal(String),
    /// The database refused or failed; [`runtime::error::database_status`] tells the client
    /// whether to retry.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(message) => Status::invalid_argument(message),
            Error::NotFound(message) => Status::not_found(message),
            Error::Refused(message) => Status::failed_precondition(message),
            Error::OwnerUnknown(message) => {
                let mut status = Status::failed_precondition(message);
                status.metadata_mut().insert(
                    pb::OWNER_UNKNOWN_KEY,
                    tonic::metadata::MetadataValue::from_static(pb::OWNER_UNKNOWN_VALUE),
                );
                status
            }
            Error::ProviderTimedOut(message) => {
                tracing::warn!(error = %message, "payment provider timed out");
                Status::deadline_exceeded(message)
            }
            Error::Internal(message) => {
                tracing::error!(error = %message, "internal error");
                runtime::error::internal_status(crate::SERVICE)
            }
            Error::Database(e) => runtime::error::database_status(crate::SERVICE, &e),
        }
    }
}
