//! Reliable messaging, written once and shared by every service.
//!
//! - [`envelope`]: the message envelope carried in Kafka headers.
//! - [`outbox`]: messages recorded in the same transaction as the state change.
//! - [`relay`]: the one publisher of a service's outbox, at least once, in order per key.
//! - [`inbox`]: deduplication of handled messages in the handler's transaction.
//! - [`consumer`]: the Kafka consumer loop: batches in one transaction (or in one statement,
//!   for a handler that takes a batch alone), offsets stored only after the commit, transient errors retried with backoff, the rest dead-lettered; the
//!   member's side of the broker's consumer group (assignment, the commit on revocation, lag).
//! - [`kafka`]: broker settings, clients and topic creation.
//! - [`after_commit`]: work deferred until the consumer's transaction commits (metrics).

pub mod after_commit;
pub mod consumer;
pub mod envelope;
pub mod inbox;
pub mod kafka;
pub mod outbox;
pub mod relay;
mod retry;
pub mod service;

pub use after_commit::after_commit;
pub use consumer::{first_of_each, Consumer, Handler, HandlerError, Incoming, Prepared};
pub use envelope::MessageContext;
pub use inbox::InboxRows;
pub use kafka::KafkaArgs;
pub use outbox::{Outbox, OutboxMessage, OutboxRows};
pub use relay::Relay;

/// Migrations of the outbox and inbox tables, run by every service with its own.
///
/// Versions below 100 belong to this crate; a service's own migrations start at 100.
/// `runtime::database::connect` merges both into one migrator, by version, so that one
/// `_sqlx_migrations` history is checked whole: a version applied there that neither knows
/// is an error.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
