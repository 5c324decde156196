//! The Kafka consumer loop shared by every service.
//!
//! Messages are handled in batches, one database transaction per batch: the inbox row of each
//! message and its effects commit together, and offsets are stored for commit only after that
//! transaction has committed. A transient failure rolls the batch back and retries it with
//! backoff; a permanent one sends the batch through one message at a time, so that only the
//! message at fault goes to `<topic>.dlq`, with the error in its headers.

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use futures::FutureExt as _;
use proto::messaging::v1::Envelope;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use sqlx::{PgConnection, PgPool};
use telemetry::metric;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::envelope::{self, MessageContext};
use crate::group::{self, GroupContext};
use crate::inbox;
use crate::kafka::KafkaArgs;
use crate::outbox::{Outbox, OutboxMessage};

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
    fn from_kafka(message: &BorrowedMessage<'_>) -> Self {
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

/// Headers added to a dead-lettered message.
pub mod dead_letter_headers {
    pub const ERROR: &str = "dlq-error";
    pub const TOPIC: &str = "dlq-original-topic";
    pub const PARTITION: &str = "dlq-original-partition";
    pub const OFFSET: &str = "dlq-original-offset";
}

/// A consumer group reading some topics into one [`Handler`]. Its members split the topics'
/// partitions through the broker's group protocol (see [`crate::group`]).
pub struct Consumer {
    kafka: KafkaArgs,
    group: String,
    topics: Vec<String>,
    /// What is made once per topic rather than per message: span name and counters.
    per_topic: Vec<TopicTelemetry>,
    pool: PgPool,
    outbox: Outbox,
    /// How long the inbox keeps a handled message's id.
    inbox_retention: Duration,
}

struct TopicTelemetry {
    topic: String,
    delivery: metrics::Histogram,
    /// `<topic> process`, the name of the span of each message (OpenTelemetry's convention).
    span_name: String,
    handled: metrics::Counter,
    dead_letters: metrics::Counter,
}

impl Consumer {
    /// `topics` are names from [`proto::topics`]; the deployment's prefix is applied here.
    pub fn new(
        kafka: &KafkaArgs,
        group: &str,
        topics: &[&str],
        pool: PgPool,
        outbox: Outbox,
    ) -> Self {
        let topics: Vec<String> = topics.iter().map(|t| kafka.topic(t)).collect();
        let per_topic = topics
            .iter()
            .map(|topic| TopicTelemetry {
                topic: topic.clone(),
                delivery: metrics::histogram!(metric::MESSAGE_DELIVERY, "topic" => topic.clone()),
                span_name: format!("{topic} process"),
                handled: metrics::counter!(metric::MESSAGES_HANDLED, "topic" => topic.clone()),
                dead_letters: metrics::counter!(metric::DEAD_LETTERS, "topic" => topic.clone()),
            })
            .collect();
        Self {
            topics,
            per_topic,
            kafka: kafka.clone(),
            group: group.to_owned(),
            pool,
            outbox,
            inbox_retention: inbox::DEFAULT_RETENTION,
        }
    }

    /// How long the inbox keeps the id of a handled message (7 days by default): a message
    /// older than that cannot be checked against it any more, so it is dead-lettered rather
    /// than applied a second time.
    pub fn with_inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// Consumes until `cancel`. Only fails to start (bad configuration); everything after that
    /// is retried.
    pub async fn run<H: Handler>(
        self,
        handler: H,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let holder = DropOffThread(Some(self.kafka.consumer_with_context(
            &self.group,
            GroupContext::new(&self.group),
            group::INTERVAL,
        )?));
        let consumer = holder.consumer();
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .with_context(|| format!("subscribing to {topics:?}"))?;
        tracing::info!(group = %self.group, topics = ?self.topics, "consuming");
        let batch_max = usize::from(self.kafka.batch_max);
        let linger = Duration::from_millis(u64::from(self.kafka.batch_linger_ms));
        // Whether the last batch found company waiting: the consumer is under load.
        let mut loaded = false;
        let mut purges = tokio::time::interval(inbox::purge_interval(self.inbox_retention));
        purges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Rebalance callbacks run inside these receives, so between two batches.
            let first = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = purges.tick() => {
                    inbox::purge(&self.pool, self.inbox_retention).await;
                    continue;
                }
                received = consumer.recv() => received,
            };
            let first = match first {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka receive failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut batch = vec![self.received(&first)];
            drop(first);
            // Whatever has already arrived joins the batch; under load, so does what arrives
            // within the linger. A consumer taking one message at a time does not wait.
            let linger_until =
                (loaded && !linger.is_zero()).then(|| tokio::time::Instant::now() + linger);
            while batch.len() < batch_max {
                let next = match consumer.recv().now_or_never() {
                    Some(received) => Some(received),
                    None => match linger_until {
                        Some(until) => tokio::time::timeout_at(until, consumer.recv()).await.ok(),
                        None => None,
                    },
                };
                match next {
                    Some(Ok(m)) => batch.push(self.received(&m)),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "kafka receive failed");
                        break;
                    }
                    None => break,
                }
            }
            loaded = batch.len() > 1;
            // A partition revoked while the batch was gathered belongs to its next owner,
            // which starts at the offset committed on revocation.
            let context = consumer.context();
            batch.retain(|m| context.holds(&m.topic, m.partition));
            if batch.is_empty() {
                continue;
            }
            if !self.handle_batch(&handler, &batch, &cancel).await {
                break;
            }
            for m in &batch {
                // Stores offset + 1 for the next auto-commit: only now that the batch's
                // transaction has committed.
                if let Err(e) = consumer.store_offset(&m.topic, m.partition, m.offset) {
                    tracing::warn!(error = %e, topic = %m.topic, partition = m.partition, "storing offset failed");
                }
            }
        }
        // Commit what was stored; closing the consumer (on drop) then leaves the group, and its
        // partitions go to the other members at once.
        if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(error = %e, "offset commit");
        }
        Ok(())
    }

    /// A message just received, its delivery time measured (from the relay's send, the
    /// record's timestamp, to now).
    fn received(&self, message: &BorrowedMessage<'_>) -> Incoming {
        let incoming = Incoming::from_kafka(message);
        if let (Some(sent_ms), Some(t)) = (
            message.timestamp().to_millis(),
            self.telemetry(&incoming.topic),
        ) {
            t.delivery
                .record((envelope::now_ms().saturating_sub(sent_ms)).max(0) as f64 / 1000.0);
        }
        incoming
    }

    /// Handles a batch until it is committed. Returns false if cancelled first.
    async fn handle_batch<H: Handler>(
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
        crate::after_commit::scope::<(), HandlerError, _>(async {
            let mut tx = self.pool.begin().await?;
            // The batch's inbox rows in one statement; a message handled before, or twice in
            // the batch, is skipped.
            let mut ids = Vec::with_capacity(batch.len());
            for message in batch {
                let id = message.message_id()?;
                inbox::check_age(&message.envelope, id, self.inbox_retention)?;
                ids.push((id, message.message_type(), message.topic.as_str()));
            }
            let mut fresh = inbox::record_all(&mut tx, &ids).await?;
            let to_handle: Vec<&Incoming> = batch
                .iter()
                .zip(&ids)
                .filter(|(_, (id, ..))| fresh.contains(id))
                .map(|(message, _)| message)
                .collect();
            handler.prepare(&mut tx, &to_handle).await?;
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
            self.outbox.enqueue(&mut tx, &outgoing).await?;
            tx.commit().await?;
            Ok(())
        })
        .await?;
        self.outbox.committed();
        metrics::histogram!(metric::CONSUMER_BATCH).record(started.elapsed().as_secs_f64());
        metrics::histogram!(metric::CONSUMER_BATCH_SIZE).record(batch.len() as f64);
        for message in batch {
            if let Some(t) = self.telemetry(&message.topic) {
                t.handled.increment(1);
            }
        }
        Ok(())
    }

    fn telemetry(&self, topic: &str) -> Option<&TopicTelemetry> {
        self.per_topic.iter().find(|t| t.topic == topic)
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

    /// Sends `message` to `<topic>.dlq` through the outbox, with its inbox row when it has a
    /// valid id, so that a redelivery is not dead-lettered twice.
    async fn dead_letter<H: Handler>(
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
                (dead_letter_headers::ERROR.to_owned(), error.to_owned()),
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

/// Owns the Kafka consumer and drops it on a thread of its own. librdkafka's close, run on
/// drop, can block forever in a rebalance callback (rust-rdkafka #509, librdkafka #4041);
/// that must not hang a runtime shutting down, nor a test's end.
struct DropOffThread(Option<StreamConsumer<GroupContext>>);

impl DropOffThread {
    fn consumer(&self) -> &StreamConsumer<GroupContext> {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for DropOffThread {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("kafka-consumer-close".into())
                .spawn(move || drop(consumer));
        }
    }
}

async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
