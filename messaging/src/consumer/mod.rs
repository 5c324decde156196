//! The Kafka consumer loop shared by every service.
//!
//! Messages are handled in batches, one database transaction per batch (or one statement with
//! no transaction around it, for a handler that takes the batch alone: [`Handler::takes_alone`]):
//! the inbox row of each message and its effects commit together, and offsets are stored for
//! commit only after that transaction has committed. A transient failure rolls the batch back and retries it with
//! backoff; a permanent one sends the batch through one message at a time, so that only the
//! message at fault goes to `<topic>.dlq`, with the error in its headers.
//!
//! - this module: the loop that receives messages, gathers them into batches and stores
//!   their offsets once handled;
//! - `handler`: the contract with a service ([`Handler`], [`Incoming`], [`HandlerError`]);
//! - `batch`: one batch in one statement or one transaction, retried or split;
//! - `dead_letter`: what cannot be handled, sent to `<topic>.dlq`;
//! - `group`: the member's side of the broker's consumer group (assignment, the commit on
//!   revocation, lag).

mod batch;
mod dead_letter;
mod group;
mod handler;

use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::{BorrowedMessage, Message as _};
use sqlx::PgPool;
use telemetry::metric;
use tokio_util::sync::CancellationToken;

pub use dead_letter::dead_letter_headers;
pub use handler::{first_of_each, Handler, HandlerError, Incoming, Prepared};

use crate::envelope;
use crate::inbox;
use crate::kafka::KafkaArgs;
use crate::outbox::Outbox;
use group::{DropOffThread, GroupContext};

/// A consumer group reading some topics into one [`Handler`]. Its members split the topics'
/// partitions through the broker's group protocol (see `group.rs`).
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

    fn telemetry(&self, topic: &str) -> Option<&TopicTelemetry> {
        self.per_topic.iter().find(|t| t.topic == topic)
    }
}
