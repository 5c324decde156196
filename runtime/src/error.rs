//! One policy for database errors: what a `sqlx::Error` means for whoever sent the request or
//! the message. A service's gRPC errors and the Kafka consumer both decide by [`classify`], so
//! that a client is told to retry exactly what a consumer would retry.

/// What a database error means for the operation that met it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatabaseErrorKind {
    /// May go away by itself (see [`is_transient`]): worth retrying.
    Transient,
    /// The change collides with a row stored before (a unique or exclusion constraint).
    Conflict,
    /// The change breaks a rule of the schema (a foreign key, a check, a not-null constraint):
    /// the same request fails the same way every time.
    Invalid,
    /// Anything else (a row or column that does not decode, a protocol error, a value
    /// PostgreSQL refuses): a bug or a broken database, never the caller's to fix.
    Internal,
}

/// The kind of `error`, by its cause and, for PostgreSQL's own errors, its SQLSTATE.
pub fn classify(error: &sqlx::Error) -> DatabaseErrorKind {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => DatabaseErrorKind::Transient,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Serialization failure or deadlock (40), insufficient resources (53), an
            // operator or a shutdown (57), connection exceptions (08), a lock not available.
            Some(code)
                if ["40", "53", "57", "08"]
                    .iter()
                    .any(|class| code.starts_with(class))
                    || code == "55P03" =>
            {
                DatabaseErrorKind::Transient
            }
            // unique_violation, exclusion_violation
            Some("23505" | "23P01") => DatabaseErrorKind::Conflict,
            // foreign_key_violation, check_violation, not_null_violation
            Some("23503" | "23514" | "23502") => DatabaseErrorKind::Invalid,
            _ => DatabaseErrorKind::Internal,
        },
        _ => DatabaseErrorKind::Internal,
    }
}

/// Whether `error` may go away by itself, so that the operation is worth retrying: the
/// connection or the pool failed, or PostgreSQL refused for a passing reason (serialization
/// failure or deadlock, class 40; insufficient resources, 53; an operator or a shutdown, 57;
/// connection exceptions, 08; a lock not available, 55P03). Anything else (a constraint, a
/// value PostgreSQL refuses, a row or column that does not decode, a protocol error) fails
/// the same way every time, so retrying it only blocks what comes after.
pub fn is_transient(error: &sqlx::Error) -> bool {
    classify(error) == DatabaseErrorKind::Transient
}

/// The gRPC status that answers a request of `service` that met `error`, logged: UNAVAILABLE
/// for a transient failure (the client may retry), ALREADY_EXISTS for a conflict,
/// FAILED_PRECONDITION for a broken rule, INTERNAL for the rest, whose details stay in the
/// logs.
pub fn database_status(service: &str, error: &sqlx::Error) -> tonic::Status {
    match classify(error) {
        DatabaseErrorKind::Transient => {
            tracing::warn!(%error, "database unavailable");
            tonic::Status::unavailable(format!("{service}'s database is unavailable, retry later"))
        }
        DatabaseErrorKind::Conflict => {
            tracing::warn!(%error, "database conflict");
            tonic::Status::already_exists("the request conflicts with what is stored")
        }
        DatabaseErrorKind::Invalid => {
            tracing::warn!(%error, "database constraint violated");
            tonic::Status::failed_precondition("the request breaks a rule of what is stored")
        }
        DatabaseErrorKind::Internal => {
            tracing::error!(%error, "database error");
            internal_status(service)
        }
    }
}

/// INTERNAL, without the details (they are in the logs, not for clients to read).
pub fn internal_status(service: &str) -> tonic::Status {
    tonic::Status::internal(format!("internal error; {service}'s logs have the details"))
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::error::Error as StdError;
    use std::fmt;

    use sqlx::error::{DatabaseError, ErrorKind};

    use super::*;

    /// A PostgreSQL error with only a SQLSTATE, as the server would send it.
    #[derive(Debug)]
    struct Refused(&'static str);

    impl fmt::Display for Refused {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl StdError for Refused {}

    impl DatabaseError for Refused {
        fn message(&self) -> &str {
            "refused"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn StdError + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn StdError + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    fn refused(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Refused(code)))
    }

    #[test]
    fn connection_failures_are_transient_and_decoding_failures_are_not() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::ColumnNotFound("x".into())));
        assert!(!is_transient(&sqlx::Error::Protocol("bad".into())));
        assert!(is_transient(&sqlx::Error::PoolClosed));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_transient(&sqlx::Error::ColumnDecode {
            index: "0".into(),
            source: "not a number".into(),
        }));
    }

    #[test]
    fn sqlstates_are_classified_by_what_the_caller_can_do() {
        for transient in ["40001", "40P01", "53300", "57P01", "08006", "55P03"] {
            assert_eq!(
                classify(&refused(transient)),
                DatabaseErrorKind::Transient,
                "{transient}"
            );
        }
        for conflict in ["23505", "23P01"] {
            assert_eq!(
                classify(&refused(conflict)),
                DatabaseErrorKind::Conflict,
                "{conflict}"
            );
        }
        for invalid in ["23503", "23514", "23502"] {
            assert_eq!(
                classify(&refused(invalid)),
                DatabaseErrorKind::Invalid,
                "{invalid}"
            );
        }
        // A syntax error, a value out of range, a NUL byte in text: bugs, not the caller's.
        for internal in ["42601", "22003", "22021", "55000"] {
            assert_eq!(
                classify(&refused(internal)),
                DatabaseErrorKind::Internal,
                "{internal}"
            );
        }
    }

    #[test]
    fn each_kind_has_its_status_and_internal_details_stay_in_the_logs() {
        let status = |e: sqlx::Error| database_status("test-svc", &e);
        assert_eq!(
            status(sqlx::Error::PoolTimedOut).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(status(refused("23505")).code(), tonic::Code::AlreadyExists);
        assert_eq!(
            status(refused("23503")).code(),
            tonic::Code::FailedPrecondition
        );
        let internal = status(sqlx::Error::Protocol("secret detail".into()));
        assert_eq!(internal.code(), tonic::Code::Internal);
        assert!(!internal.message().contains("secret"), "{internal:?}");
        assert!(internal.message().contains("test-svc"), "{internal:?}");
    }
}
