//! One batch, one transaction: its inbox rows, its handlers' effects and the messages they
//! send commit together (in one statement with no transaction around it, for a handler that
//! takes the batch alone: [`Handler::takes_alone`]). A transient failure rolls the batch back
//! and retries it with backoff; a permanent one sends it through one message at a time, so
//! that only the message at fault is dead-lettered.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres, Transaction};
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

    /// Handles `batch` once, as the consumer handles a batch it received (alone or in a
    /// transaction), with no retry and no dead letter: for tests of a handler over the
    /// consumer's own batches, without a broker.
    pub async fn handle_received<H: Handler>(
        &self,
        handler: &H,
        batch: &[Incoming],
    ) -> Result<(), HandlerError> {
        self.try_batch(handler, batch).await
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

    /// Handles `batch`: in one statement with no transaction around it when the handler takes
    /// it so ([`Handler::takes_alone`]), else (or when that statement refused the batch) in one
    /// transaction. The work handlers defer with [`crate::after_commit`] runs once it has
    /// committed.
    async fn try_batch<H: Handler>(
        &self,
        handler: &H,
        batch: &[Incoming],
    ) -> Result<(), HandlerError> {
        let started = std::time::Instant::now();
        let mut ids = Vec::with_capacity(batch.len());
        for message in batch {
            let id = message.message_id()?;
            inbox::check_age(&message.envelope, id, self.inbox_retention)?;
            ids.push((id, message.message_type(), message.topic.as_str()));
        }
        let all: Vec<&Incoming> = batch.iter().collect();
        let alone = handler.takes_alone(&all)
            && match self.run_batch(handler, batch, &ids, Mode::Alone).await {
                Ok(()) => true,
                Err(error) => {
                    // Nothing of it was written: the transaction below decides afresh.
                    tracing::debug!(%error, size = batch.len(), "batch not applied alone; applying it in a transaction");
                    false
                }
            };
        if !alone {
            self.run_batch(handler, batch, &ids, Mode::Transaction)
                .await?;
        }
        metrics::histogram!(metric::CONSUMER_BATCH).record(started.elapsed().as_secs_f64());
        metrics::histogram!(metric::CONSUMER_BATCH_SIZE).record(batch.len() as f64);
        for message in batch {
            if let Some(t) = self.telemetry(&message.topic) {
                t.handled.increment(1);
            }
        }
        Ok(())
    }

    /// Runs the handlers over `batch` (`ids`: its messages' inbox rows) and writes what they
    /// decided, in `mode`; then hands the messages they sent to the relay.
    async fn run_batch<H: Handler>(
        &self,
        handler: &H,
        batch: &[Incoming],
        ids: &[(uuid::Uuid, &str, &str)],
        mode: Mode,
    ) -> Result<(), HandlerError> {
        let mut outgoing = crate::after_commit::scope::<_, HandlerError, _>(async {
            let mut conn = match mode {
                Mode::Alone => Connection::Alone(self.pool.acquire().await?),
                Mode::Transaction => Connection::Transaction(self.pool.begin().await?),
            };
            let mut fresh = match mode {
                // The handler's one statement records the inbox rows, and writes nothing if
                // any was there before.
                Mode::Alone => ids.iter().map(|(id, ..)| *id).collect(),
                Mode::Transaction => {
                    // The batch's inbox rows in one statement; a message handled before, or
                    // twice in the batch, is skipped.
                    let all: Vec<&Incoming> = batch.iter().collect();
                    let inbox_rows = InboxRows::new(ids);
                    match handler
                        .prepare_recording(&mut conn, &all, &inbox_rows)
                        .await?
                    {
                        Some(fresh) => fresh,
                        None => {
                            let fresh = inbox_rows.record(&mut conn).await?;
                            let to_handle: Vec<&Incoming> = batch
                                .iter()
                                .zip(ids)
                                .filter(|(_, (id, ..))| fresh.contains(id))
                                .map(|(message, _)| message)
                                .collect();
                            handler.prepare(&mut conn, &to_handle).await?;
                            fresh
                        }
                    }
                }
            };
            // The messages the handlers send are recorded together, once they have all run.
            let (handled, outgoing) = crate::outbox::collect(async {
                for (message, (id, ..)) in batch.iter().zip(ids) {
                    let conn = &mut *conn;
                    let first = fresh.remove(id);
                    async move {
                        if first {
                            handler.handle(conn, message).await
                        } else {
                            tracing::debug!(message_id = %id, "duplicate message skipped");
                            Ok(())
                        }
                    }
                    .instrument(self.span(message))
                    .await?;
                }
                match mode {
                    Mode::Alone => handler.flush_alone(&mut conn, &InboxRows::new(ids)).await,
                    Mode::Transaction => handler.flush(&mut conn).await,
                }
            })
            .await;
            handled?;
            let mut outgoing = outgoing;
            if mode == Mode::Alone && !outgoing.unrecorded.is_empty() {
                // A handler that takes a batch alone records what it sends in its statement;
                // a second statement would not be atomic with it. Never written so.
                tracing::error!(
                    unrecorded = outgoing.unrecorded.len(),
                    "a batch applied alone left messages unrecorded; recording them now"
                );
            }
            let earlier = self.outbox.record(&mut conn, &outgoing.unrecorded).await?;
            outgoing.earlier.extend(earlier);
            conn.commit().await?;
            Ok(outgoing)
        })
        .await?;
        let earlier = std::mem::take(&mut outgoing.earlier);
        self.outbox.committed_messages(outgoing.into_all(), earlier);
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

/// How a batch is written: see [`Handler::takes_alone`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// In the handler's one statement, with no transaction around it.
    Alone,
    /// In a transaction of its own.
    Transaction,
}

/// The connection a batch is written on, in its [`Mode`].
enum Connection {
    Alone(PoolConnection<Postgres>),
    Transaction(Transaction<'static, Postgres>),
}

impl Connection {
    /// Commits the transaction; a statement written alone has committed already.
    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Connection::Alone(_) => Ok(()),
            Connection::Transaction(tx) => tx.commit().await,
        }
    }
}

impl std::ops::Deref for Connection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            Connection::Alone(conn) => conn,
            Connection::Transaction(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Connection::Alone(conn) => conn,
            Connection::Transaction(tx) => tx,
        }
    }
}

async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
