//! One batch, one transaction: its inbox rows, its handlers' effects and the messages they
//! send commit together. A transient failure rolls the batch back and retries it with backoff;
//! a permanent one sends it through one message at a time, so that only the message at fault
//! is dead-lettered.

use std::time::Duration;

use telemetry::metric;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{Consumer, Handler, HandlerError, Incoming};
use crate::inbox::{self, InboxRows};

impl Consumer {
    /// Handles a batch until it is committed. Returns false if cancelled first.
    pub(super) async fn handle_batch<H: Handler>(
        &self,
        handler: &H,
        batch: &[Incoming],
        cancel: &CancellationToken,
    ) -> bool {
        let mut backoff = crate::retry::backoff();
        loop {
            match self.try_batch(handler, batch).await {
                Ok(()) => return true,
                Err(HandlerError::Permanent(_)) if batch.len() > 1 => {
                    // Find the message at fault: one at a time, each in its own transaction.
                    for message in batch {
                        if !self.handle_one(handler, message, cancel).await {
                            return false;
                        }
                    }
                    return true;
                }
                Err(HandlerError::Permanent(_)) => {
                    return self.handle_one(handler, &batch[0], cancel).await;
                }
                Err(HandlerError::Transient(error)) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(%error, ?delay, size = batch.len(), "batch failed, retrying");
                    if !sleep_unless_cancelled(delay, cancel).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn handle_one<H: Handler>(
        &self,
        handler: &H,
        message: &Incoming,
        cancel: &CancellationToken,
    ) -> bool {
        let mut backoff = crate::retry::backoff();
        loop {
            let result = match self.try_batch(handler, std::slice::from_ref(message)).await {
                Err(HandlerError::Permanent(error)) => {
                    self.dead_letter(handler, message, &error).await
                }
                other => other,
            };
            match result {
                Ok(()) => return true,
                Err(error) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(
                        %error,
                        ?delay,
                        message_id = %message.envelope.message_id,
                        order_id = %message.envelope.saga_id,
                        correlation_id = %message.envelope.correlation_id,
                        "message failed, retrying"
                    );
                    if !sleep_unless_cancelled(delay, cancel).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Handles `batch` in one transaction; the work handlers defer with
    /// [`crate::after_commit`] runs once it has committed.
    async fn try_batch<H: Handler>(
        &self,
        handler: &H,
        batch: &[Incoming],
    ) -> Result<(), HandlerError> {
        let started = std::time::Instant::now();
        let mut outgoing = crate::after_commit::scope::<_, HandlerError, _>(async {
            let mut tx = self.pool.begin().await?;
            // The batch's inbox rows in one statement; a message handled before, or twice in
            // the batch, is skipped.
            let mut ids = Vec::with_capacity(batch.len());
            for message in batch {
                let id = message.message_id()?;
                inbox::check_age(&message.envelope, id, self.inbox_retention)?;
                ids.push((id, message.message_type(), message.topic.as_str()));
            }
            let all: Vec<&Incoming> = batch.iter().collect();
            let inbox_rows = InboxRows::new(&ids);
            let mut fresh = match handler
                .prepare_recording(&mut tx, &all, &inbox_rows)
                .await?
            {
                Some(fresh) => fresh,
                None => {
                    let fresh = inbox_rows.record(&mut tx).await?;
                    let to_handle: Vec<&Incoming> = batch
                        .iter()
                        .zip(&ids)
                        .filter(|(_, (id, ..))| fresh.contains(id))
                        .map(|(message, _)| message)
                        .collect();
                    handler.prepare(&mut tx, &to_handle).await?;
                    fresh
                }
            };
            // The messages the handlers send are recorded together, once they have all run.
            let (handled, outgoing) = crate::outbox::collect(async {
                for (message, (id, ..)) in batch.iter().zip(&ids) {
                    let tx = &mut *tx;
                    let first = fresh.remove(id);
                    async move {
                        if first {
                            handler.handle(tx, message).await
                        } else {
                            tracing::debug!(message_id = %id, "duplicate message skipped");
                            Ok(())
                        }
                    }
                    .instrument(self.span(message))
                    .await?;
                }
                handler.flush(&mut tx).await
            })
            .await;
            handled?;
            let mut outgoing = outgoing;
            let earlier = self.outbox.record(&mut tx, &outgoing.unrecorded).await?;
            outgoing.earlier.extend(earlier);
            tx.commit().await?;
            Ok(outgoing)
        })
        .await?;
        let earlier = std::mem::take(&mut outgoing.earlier);
        self.outbox.committed_messages(outgoing.into_all(), earlier);
        metrics::histogram!(metric::CONSUMER_BATCH).record(started.elapsed().as_secs_f64());
        metrics::histogram!(metric::CONSUMER_BATCH_SIZE).record(batch.len() as f64);
        for message in batch {
            if let Some(t) = self.telemetry(&message.topic) {
                t.handled.increment(1);
            }
        }
        Ok(())
    }

    /// The span a message is handled in: a child of the span that produced it (its
    /// `traceparent`), carrying its order and correlation ids for every log line within.
    fn span(&self, message: &Incoming) -> tracing::Span {
        let name = self
            .telemetry(&message.topic)
            .map_or("process", |t| t.span_name.as_str());
        let envelope = &message.envelope;
        let span = tracing::info_span!(
            "message",
            otel.name = name,
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = %message.topic,
            messaging.kafka.destination.partition = message.partition,
            messaging.kafka.message.offset = message.offset,
            messaging.message.id = %envelope.message_id,
            message_type = %envelope.message_type,
            order_id = %envelope.saga_id,
            correlation_id = %envelope.correlation_id,
        );
        telemetry::propagation::set_parent(&span, &envelope.traceparent, &envelope.tracestate);
        span
    }
}

async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
