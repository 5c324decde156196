//! Dead letters: a message that can never be handled goes to `<topic>.dlq` through the outbox,
//! with the error and where it came from in its headers, and the rest of its partition goes on.

use uuid::Uuid;

use super::{Consumer, Handler, HandlerError, Incoming};
use crate::inbox;
use crate::outbox::OutboxMessage;

/// Headers added to a dead-lettered message.
pub mod dead_letter_headers {
    pub const ERROR: &str = "dlq-error";
    pub const TOPIC: &str = "dlq-original-topic";
    pub const PARTITION: &str = "dlq-original-partition";
    pub const OFFSET: &str = "dlq-original-offset";
}

impl Consumer {
    /// Sends `message` to `<topic>.dlq` through the outbox, with its inbox row when it has a
    /// valid id, so that a redelivery is not dead-lettered twice.
    pub(super) async fn dead_letter<H: Handler>(
        &self,
        handler: &H,
        message: &Incoming,
        error: &str,
    ) -> Result<(), HandlerError> {
        tracing::error!(
            %error,
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            message_id = %message.envelope.message_id,
            message_type = %message.envelope.message_type,
            order_id = %message.envelope.saga_id,
            correlation_id = %message.envelope.correlation_id,
            "message cannot be handled: dead-lettered"
        );
        let mut tx = self.pool.begin().await?;
        if let Ok(id) = message.message_id() {
            if !inbox::record(&mut tx, id, message.message_type(), &message.topic).await? {
                return Ok(());
            }
        }
        let mut envelope = message.envelope.clone();
        if Uuid::parse_str(&envelope.message_id).is_err() {
            envelope.message_id = Uuid::now_v7().to_string();
        }
        let dead = OutboxMessage {
            topic: proto::topics::dead_letter(&message.topic),
            key: message.key.clone().unwrap_or_default(),
            envelope,
            payload: message.payload.clone(),
            extra_headers: vec![
                // The outbox keeps headers in jsonb, which holds no NUL character (an error may
                // quote a message's bytes).
                (
                    dead_letter_headers::ERROR.to_owned(),
                    error.replace('\0', "\u{fffd}"),
                ),
                (dead_letter_headers::TOPIC.to_owned(), message.topic.clone()),
                (
                    dead_letter_headers::PARTITION.to_owned(),
                    message.partition.to_string(),
                ),
                (
                    dead_letter_headers::OFFSET.to_owned(),
                    message.offset.to_string(),
                ),
            ],
        };
        self.outbox
            .enqueue(&mut tx, std::slice::from_ref(&dead))
            .await?;
        handler.on_dead_letter(&mut tx, message, error).await?;
        tx.commit().await?;
        self.outbox.committed();
        if let Some(t) = self.telemetry(&message.topic) {
            t.dead_letters.increment(1);
        }
        Ok(())
    }
}
