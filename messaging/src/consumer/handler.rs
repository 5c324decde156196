//! The contract between the consumer and a service: what it does with each message
//! ([`Handler`]), the message as it reads it ([`Incoming`]) and why it failed
//! ([`HandlerError`]), which decides between a retry and a dead letter.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Mutex;

use async_trait::async_trait;
use proto::messaging::v1::Envelope;
use rdkafka::message::{BorrowedMessage, Message as _};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::envelope::{self, MessageContext};
use crate::inbox::InboxRows;

/// Why a message could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying: the database or a dependency is unavailable, a conflict, a timeout.
    #[error("transient: {0}")]
    Transient(String),
    /// Handling it again would fail again: undecodable, unknown type, invalid content.
    #[error("{0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    /// Classified by cause ([`runtime::database::is_transient`]): a connection lost or a
    /// deadlock is retried, a constraint violation or a row that does not decode is not.
    fn from(e: sqlx::Error) -> Self {
        if runtime::database::is_transient(&e) {
            HandlerError::Transient(format!("database: {e}"))
        } else {
            HandlerError::Permanent(format!("database: {e}"))
        }
    }
}

/// A message read from Kafka.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub envelope: Envelope,
    pub payload: Vec<u8>,
}

impl Incoming {
    pub(super) fn from_kafka(message: &BorrowedMessage<'_>) -> Self {
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            envelope: message
                .headers()
                .map(envelope::from_headers)
                .unwrap_or_default(),
            payload: message.payload().unwrap_or_default().to_vec(),
        }
    }

    pub fn message_id(&self) -> Result<Uuid, HandlerError> {
        Uuid::parse_str(&self.envelope.message_id).map_err(|_| {
            HandlerError::Permanent(format!(
                "missing or invalid message-id header {:?}",
                self.envelope.message_id
            ))
        })
    }

    pub fn message_type(&self) -> &str {
        &self.envelope.message_type
    }

    /// The saga (order) id from the envelope.
    pub fn saga_id(&self) -> Result<Uuid, HandlerError> {
        Uuid::parse_str(&self.envelope.saga_id).map_err(|_| {
            HandlerError::Permanent(format!(
                "missing or invalid saga-id header {:?}",
                self.envelope.saga_id
            ))
        })
    }

    /// Decodes the payload as `M`.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, HandlerError> {
        M::decode(self.payload.as_slice()).map_err(|e| {
            HandlerError::Permanent(format!(
                "undecodable {} payload: {e}",
                self.envelope.message_type
            ))
        })
    }

    /// The context of the messages this one causes.
    pub fn context(&self) -> MessageContext {
        MessageContext {
            correlation_id: self.envelope.correlation_id.clone(),
            causation_id: self.envelope.message_id.clone(),
            traceparent: self.envelope.traceparent.clone(),
            tracestate: self.envelope.tracestate.clone(),
        }
    }

    /// The error for a message type this consumer does not handle.
    pub fn unknown_type(&self) -> HandlerError {
        HandlerError::Permanent(format!(
            "unknown message type {:?} on {}",
            self.envelope.message_type, self.topic
        ))
    }
}

/// The first message of each key in a batch (`messages`, in its order), with what `read` read of
/// it; `read` names a message's key (its order, say) and reads it, and a message it cannot read
/// is left out (its handler refuses it). For a handler that applies the first command of each
/// order in its batch's first statement ([`Handler::prepare_recording`]), leaving a second
/// command of an order to [`Handler::handle`], after the first.
pub fn first_of_each<'m, K: Eq + Hash, T>(
    messages: &[&'m Incoming],
    read: impl Fn(&Incoming) -> Option<(K, T)>,
) -> Vec<(&'m Incoming, T)> {
    let mut keys = HashSet::new();
    messages
        .iter()
        .filter_map(|m| {
            let (key, value) = read(m)?;
            keys.insert(key).then_some((*m, value))
        })
        .collect()
}

/// What a handler's first statement decided for some of a batch's messages
/// ([`Handler::prepare_recording`]), by message id, for [`Handler::handle`] to take as it
/// reaches each; cleared when the next batch is prepared and when a batch is flushed.
#[derive(Debug)]
pub struct Prepared<T>(Mutex<HashMap<Uuid, T>>);

impl<T> Default for Prepared<T> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T> Prepared<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, T>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The batch's decisions, by message id, in place of the last batch's.
    pub fn set(&self, decided: impl IntoIterator<Item = (Uuid, T)>) {
        let mut prepared = self.lock();
        prepared.clear();
        prepared.extend(decided);
    }

    /// What was decided for `message`, taken; `None` when nothing was.
    pub fn take(&self, message: &Incoming) -> Option<T> {
        let id = message.message_id().ok()?;
        self.lock().remove(&id)
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// What a service does with each message, inside the transaction that records it in the inbox.
/// Messages it sends go to the outbox through the same connection.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, conn: &mut PgConnection, message: &Incoming)
        -> Result<(), HandlerError>;

    /// Called once per batch in its transaction, before [`handle`](Self::handle) is called
    /// for each of `messages` (the batch's, less the ones handled before): to read in one
    /// statement what each message's handling would otherwise read alone. Does nothing by
    /// default.
    async fn prepare(
        &self,
        _conn: &mut PgConnection,
        _messages: &[&Incoming],
    ) -> Result<(), HandlerError> {
        Ok(())
    }

    /// In place of [`prepare`](Self::prepare), for a handler whose first statement records
    /// the batch's inbox rows too (`inbox`: [`InboxRows::insert_sql`] in a data-modifying
    /// `WITH`), the consumer's own statement for them saved: called with every message of the
    /// batch (some perhaps handled before), it returns the ids that statement recorded now, and
    /// [`handle`](Self::handle) is called for those only. Returns `None` by default: the
    /// consumer records the inbox rows itself, then calls [`prepare`](Self::prepare).
    async fn prepare_recording(
        &self,
        _conn: &mut PgConnection,
        _messages: &[&Incoming],
        _inbox: &InboxRows<'_>,
    ) -> Result<Option<HashSet<Uuid>>, HandlerError> {
        Ok(None)
    }

    /// For a handler that can apply a batch from what it holds in memory, with nothing to read:
    /// whether it takes `messages` (a whole batch, none known to be handled before) so. Then
    /// the consumer calls [`handle`](Self::handle) for each and
    /// [`flush_alone`](Self::flush_alone) on a connection with no transaction around it (one
    /// round trip in place of `BEGIN`, a read, a write and `COMMIT`). On any failure the
    /// consumer handles the batch again in a transaction
    /// ([`prepare_recording`](Self::prepare_recording) and the rest), which decides from what is
    /// stored. `false` by default.
    fn takes_alone(&self, _messages: &[&Incoming]) -> bool {
        false
    }

    /// In place of [`flush`](Self::flush) for a batch taken alone: writes every effect of the
    /// batch, its inbox rows (`inbox`: [`InboxRows::insert_sql`]) and the messages it sends
    /// ([`crate::outbox::take_held`]) included, in one statement that writes all of it, or
    /// nothing and fails (a message handled before, a state another writer changed since the
    /// handler last wrote it: [`InboxRows::refused_unless_whole_sql`]). Refuses by default, for
    /// a handler that takes no batch alone.
    async fn flush_alone(
        &self,
        _conn: &mut PgConnection,
        _inbox: &InboxRows<'_>,
    ) -> Result<(), HandlerError> {
        Err(HandlerError::Transient(
            "this handler takes no batch alone".to_owned(),
        ))
    }

    /// Called once per batch in its transaction, after [`handle`](Self::handle) has been
    /// called for each message and before the commit: to write in one statement what the
    /// batch's handlings decided. Does nothing by default.
    async fn flush(&self, _conn: &mut PgConnection) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Called in the transaction that dead-letters `message`, e.g. to flag its saga for an
    /// operator. Does nothing by default.
    async fn on_dead_letter(
        &self,
        _conn: &mut PgConnection,
        _message: &Incoming,
        _error: &str,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}
