//! The transactional outbox: messages are recorded in the same transaction as the state change
//! that causes them, and the [`Relay`] publishes them to Kafka at least once, in order.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use prost::{Message, Name};
use proto::messaging::v1::Envelope;
use rdkafka::message::Header;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use telemetry::metric;
use telemetry::propagation::{self, KeyValue, TraceContext};

use crate::envelope::{self, MessageContext};
use crate::kafka::KafkaArgs;

/// Channel on which the outbox trigger notifies the relay.
const CHANNEL: &str = "outbox";
/// Advisory lock held by the one relay publishing a service's outbox at a time, so that the
/// rows of one key are published in the order they were written, whatever the replicas.
const RELAY_LOCK: i64 = 0x6f75_7462_6f78;
/// Least time between two measures of the outbox's backlog.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(1);

/// One message to record in the outbox.
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    pub topic: String,
    pub key: String,
    pub envelope: Envelope,
    pub payload: Vec<u8>,
    /// Headers sent besides the envelope's (the error of a dead letter, say).
    pub extra_headers: Vec<(String, String)>,
}

/// Makes outbox messages for one service and records them.
#[derive(Clone, Debug)]
pub struct Outbox {
    source: String,
    kafka: KafkaArgs,
}

impl Outbox {
    pub fn new(source: impl Into<String>, kafka: KafkaArgs) -> Self {
        Self {
            source: source.into(),
            kafka,
        }
    }

    /// A message for `topic` (a name from [`proto::topics`]), keyed by the saga (order) id.
    ///
    /// It carries the trace context of the current span when spans have one, so that the
    /// span of its consumer is a child of the span that made it, however much later the relay
    /// publishes it; otherwise the one of `context`.
    pub fn message<M: Message + Name>(
        &self,
        topic: &str,
        saga_id: Uuid,
        payload: &M,
        context: &MessageContext,
    ) -> OutboxMessage {
        let occurred_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let (traceparent, tracestate) = match TraceContext::current() {
            Some(current) => (current.traceparent, current.tracestate),
            None => (context.traceparent.clone(), context.tracestate.clone()),
        };
        let message = OutboxMessage {
            topic: self.kafka.topic(topic),
            key: saga_id.to_string(),
            envelope: Envelope {
                message_id: Uuid::now_v7().to_string(),
                message_type: M::full_name(),
                saga_id: saga_id.to_string(),
                correlation_id: context.correlation_id.clone(),
                causation_id: context.causation_id.clone(),
                traceparent,
                tracestate,
                source: self.source.clone(),
                occurred_at_ms,
            },
            payload: payload.encode_to_vec(),
            extra_headers: Vec::new(),
        };
        if propagation::enabled() {
            // Names the message in the producing span, where its consumer's span points.
            propagation::add_event(
                &tracing::Span::current(),
                "message enqueued",
                vec![
                    KeyValue::new("messaging.message.id", message.envelope.message_id.clone()),
                    KeyValue::new("messaging.destination.name", message.topic.clone()),
                    KeyValue::new("message_type", message.envelope.message_type.clone()),
                ],
            );
        }
        message
    }

    /// Records messages in the caller's transaction. They are published once it commits.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        messages: &[OutboxMessage],
    ) -> Result<(), sqlx::Error> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(messages.len());
        let mut topics = Vec::with_capacity(messages.len());
        let mut keys = Vec::with_capacity(messages.len());
        let mut types = Vec::with_capacity(messages.len());
        let mut envelopes = Vec::with_capacity(messages.len());
        let mut payloads = Vec::with_capacity(messages.len());
        let mut extra_headers = Vec::with_capacity(messages.len());
        for m in messages {
            let id = Uuid::parse_str(&m.envelope.message_id)
                .map_err(|e| sqlx::Error::Protocol(format!("outbox message id: {e}")))?;
            ids.push(id);
            topics.push(m.topic.as_str());
            keys.push(m.key.as_str());
            types.push(m.envelope.message_type.as_str());
            envelopes.push(m.envelope.encode_to_vec());
            payloads.push(m.payload.as_slice());
            extra_headers.push(encode_extra_headers(&m.extra_headers));
        }
        // One statement for the whole batch; `WITH ORDINALITY` keeps the given order in the ids.
        sqlx::query(
            "INSERT INTO outbox (message_id, topic, message_key, message_type, envelope, payload, extra_headers) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bytea[], $7::bytea[])",
        )
        .bind(&ids)
        .bind(&topics)
        .bind(&keys)
        .bind(&types)
        .bind(&envelopes)
        .bind(&payloads)
        .bind(&extra_headers)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// Publishes a service's outbox to Kafka: wakes on `NOTIFY outbox` (sent when a transaction
/// that wrote to the outbox commits) and polls as a fallback.
pub struct Relay {
    pool: PgPool,
    kafka: KafkaArgs,
    producer: FutureProducer,
    batch_size: i64,
    poll_interval: Duration,
}

impl Relay {
    pub fn new(pool: PgPool, kafka: &KafkaArgs) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            kafka: kafka.clone(),
            producer: kafka.producer()?,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
        })
    }

    /// Runs until `cancel`; database and broker failures are retried with backoff.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut listener = None;
        let mut backoff = crate::retry::backoff();
        let mut measured: Option<std::time::Instant> = None;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if measured.is_none_or(|at| at.elapsed() >= BACKLOG_INTERVAL) {
                self.measure_backlog().await;
                measured = Some(std::time::Instant::now());
            }
            if listener.is_none() {
                match PgListener::connect_with(&self.pool).await {
                    Ok(mut l) => match l.listen(CHANNEL).await {
                        Ok(()) => listener = Some(l),
                        Err(e) => tracing::warn!(error = %e, "outbox relay: LISTEN failed"),
                    },
                    Err(e) => tracing::warn!(error = %e, "outbox relay: cannot connect to listen"),
                }
            }
            match self.publish_batch().await {
                Ok(n) => {
                    backoff = crate::retry::backoff();
                    if n as i64 == self.batch_size {
                        continue;
                    }
                }
                Err(e) => {
                    self.replace_failed_producer();
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(
                        error = format!("{e:#}"),
                        ?delay,
                        "outbox relay: publish failed, retrying"
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
            // Wait for the next commit that wrote to the outbox, or the fallback poll.
            let wake = async {
                match listener.as_mut() {
                    Some(l) => match l.recv().await {
                        Ok(_) => while l.next_buffered().is_some() {},
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox relay: listener lost");
                            listener = None;
                        }
                    },
                    None => tokio::time::sleep(self.poll_interval).await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }

    /// An idempotent producer that hit a fatal error (the broker lost its producer state, say,
    /// after a restart) refuses everything from then on: start a new one.
    fn replace_failed_producer(&mut self) {
        use rdkafka::producer::Producer as _;
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::warn!(?code, %reason, "outbox relay: the producer failed fatally; starting a new one");
            match self.kafka.producer() {
                Ok(producer) => self.producer = producer,
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "outbox relay: cannot create a producer"
                ),
            }
        }
    }

    /// Publishes up to one batch, oldest first, and deletes what the broker acknowledged.
    /// A row that can never be published (its envelope does not decode, the broker refuses it
    /// for good) is moved to `outbox_parked` with its error, and the rest goes on. Returns how
    /// many rows were done with (published or parked); an error once the acknowledged rows are
    /// deleted, when some failed for a reason that may pass (they are sent again).
    pub async fn publish_batch(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await.context("outbox: begin")?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            // Another relay of this service is publishing; it will see these rows.
            return Ok(0);
        }
        let rows = sqlx::query(
            "SELECT id, topic, message_key, envelope, payload, extra_headers FROM outbox ORDER BY id LIMIT $1",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut parked: Vec<(i64, String)> = Vec::new();
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let topic: &str = row.try_get("topic")?;
            let envelope_bytes: &[u8] = row.try_get("envelope")?;
            match Envelope::decode(envelope_bytes) {
                Ok(envelope) => records.push(OutboxRecord {
                    id,
                    topic,
                    key: row.try_get("message_key")?,
                    envelope,
                    payload: row.try_get("payload")?,
                    extra_headers: row.try_get("extra_headers")?,
                }),
                Err(e) => parked.push((id, format!("undecodable envelope: {e}"))),
            }
        }
        let span = publish_span(&records);
        let outcomes = self.send(&records).instrument(span).await;
        let mut published = Vec::with_capacity(records.len());
        let mut retry: Option<String> = None;
        for (record, outcome) in records.iter().zip(outcomes) {
            match outcome {
                Outcome::Published => published.push(record.id),
                Outcome::Refused(error) => parked.push((record.id, error)),
                Outcome::Failed(error) => {
                    retry.get_or_insert(error);
                }
            }
        }
        if !parked.is_empty() {
            let (ids, errors): (Vec<i64>, Vec<String>) = parked.iter().cloned().unzip();
            sqlx::query(
                "INSERT INTO outbox_parked (id, message_id, topic, message_key, message_type, \
                   envelope, payload, extra_headers, created_at, error) \
                 SELECT o.id, o.message_id, o.topic, o.message_key, o.message_type, o.envelope, \
                   o.payload, o.extra_headers, o.created_at, p.error \
                 FROM outbox o JOIN unnest($1::bigint[], $2::text[]) AS p(id, error) ON o.id = p.id",
            )
            .bind(&ids)
            .bind(&errors)
            .execute(&mut *tx)
            .await?;
        }
        let done: Vec<i64> = published
            .iter()
            .copied()
            .chain(parked.iter().map(|(id, _)| *id))
            .collect();
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&done)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.context("outbox: commit")?;
        for (id, error) in &parked {
            let topic = rows
                .iter()
                .find(|r| r.try_get::<i64, _>("id").ok() == Some(*id))
                .and_then(|r| r.try_get::<&str, _>("topic").ok())
                .unwrap_or_default();
            tracing::error!(outbox_row = id, %topic, %error, "outbox row cannot be published: parked in outbox_parked for an operator");
            metrics::counter!(metric::OUTBOX_PARKED, "topic" => topic.to_owned()).increment(1);
        }
        // One update per topic of the batch (a batch holds a few topics), not per message.
        let mut per_topic: Vec<(&str, u64)> = Vec::new();
        for record in records.iter().filter(|r| published.contains(&r.id)) {
            match per_topic.iter_mut().find(|(t, _)| *t == record.topic) {
                Some((_, count)) => *count += 1,
                None => per_topic.push((record.topic, 1)),
            }
        }
        for (topic, count) in per_topic {
            metrics::counter!(metric::OUTBOX_PUBLISHED, "topic" => topic.to_owned())
                .increment(count);
        }
        tracing::debug!(
            published = published.len(),
            parked = parked.len(),
            "outbox: published"
        );
        match retry {
            Some(error) => Err(anyhow::anyhow!(error)),
            None => Ok(done.len()),
        }
    }

    /// Queues every record in order and waits for the broker's answer to each. Rows of one key
    /// go to one partition, where the idempotent producer keeps their order through its own
    /// retries.
    async fn send(&self, records: &[OutboxRecord<'_>]) -> Vec<Outcome> {
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let id = record.id;
            let extra = decode_extra_headers(record.extra_headers);
            let mut headers = envelope::to_headers(&record.envelope);
            for (key, value) in &extra {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let message = FutureRecord::to(record.topic)
                .key(record.key)
                .payload(record.payload)
                .headers(headers);
            // Queued here, synchronously and in order.
            let delivery = self.producer.send_result(message);
            deliveries.push(async move {
                match delivery {
                    Err((e, _)) => Outcome::of(id, "queueing", &e),
                    Ok(delivery) => match delivery.await {
                        Ok(Ok(delivery)) => Outcome::Published.with_delivery(delivery),
                        Ok(Err((e, _))) => Outcome::of(id, "the broker refused", &e),
                        Err(_) => (
                            Outcome::Failed(format!("producer dropped outbox row {id}")),
                            None,
                        ),
                    },
                }
            });
        }
        let answered = futures::future::join_all(deliveries).await;
        let span = tracing::Span::current();
        let delivered: Vec<_> = answered.iter().map(|(_, d)| *d).collect();
        if let ([_], [Some(delivery)]) = (records, delivered.as_slice()) {
            span.record("messaging.kafka.destination.partition", delivery.partition);
            span.record("messaging.kafka.message.offset", delivery.offset);
        } else if propagation::enabled() {
            for (record, delivery) in records.iter().zip(&delivered) {
                let Some(delivery) = delivery else { continue };
                propagation::add_event(
                    &span,
                    "message published",
                    vec![
                        KeyValue::new("messaging.message.id", record.envelope.message_id.clone()),
                        KeyValue::new("messaging.destination.name", record.topic.to_string()),
                        KeyValue::new(
                            "messaging.kafka.destination.partition",
                            i64::from(delivery.partition),
                        ),
                        KeyValue::new("messaging.kafka.message.offset", delivery.offset),
                        KeyValue::new("order_id", record.envelope.saga_id.clone()),
                    ],
                );
            }
        }
        answered.into_iter().map(|(outcome, _)| outcome).collect()
    }

    /// Measures the outbox: how many rows wait and for how long the oldest has. One small
    /// query, run at most every [`BACKLOG_INTERVAL`] from the relay's loop.
    async fn measure_backlog(&self) {
        let measured: Result<(i64, f64, i64), sqlx::Error> = sqlx::query_as(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0), \
               (SELECT count(*) FROM outbox_parked) FROM outbox",
        )
        .fetch_one(&self.pool)
        .await;
        match measured {
            Ok((backlog, oldest, parked)) => {
                metrics::gauge!(metric::OUTBOX_BACKLOG).set(backlog as f64);
                metrics::gauge!(metric::OUTBOX_OLDEST_AGE).set(oldest.max(0.0));
                metrics::gauge!(metric::OUTBOX_PARKED_ROWS).set(parked as f64);
            }
            Err(e) => tracing::debug!(error = %e, "outbox: measuring the backlog failed"),
        }
    }
}

/// An outbox row being published.
struct OutboxRecord<'a> {
    id: i64,
    topic: &'a str,
    key: &'a str,
    envelope: Envelope,
    payload: &'a [u8],
    extra_headers: &'a [u8],
}

/// Where a published row ended up in Kafka.
#[derive(Clone, Copy)]
struct Delivered {
    partition: i32,
    offset: i64,
}

/// What became of one row sent to the broker.
enum Outcome {
    Published,
    /// Refused for a reason that sending again cannot change (too large, an invalid or
    /// unknown topic, not authorized): to be parked.
    Refused(String),
    /// Failed for a reason that may pass (the broker away, a timeout): to be sent again.
    Failed(String),
}

impl Outcome {
    fn of(id: i64, what: &str, error: &rdkafka::error::KafkaError) -> (Outcome, Option<Delivered>) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let text = format!("{what} outbox row {id}: {error}");
        let outcome = match error.rdkafka_error_code() {
            Some(
                Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::MessageBatchTooLarge
                | Code::InvalidRecord
                | Code::InvalidTopic
                | Code::TopicAuthorizationFailed
                | Code::UnknownTopic
                | Code::UnknownTopicOrPartition
                | Code::InvalidArgument
                | Code::InvalidRequiredAcks,
            ) => Outcome::Refused(text),
            _ => Outcome::Failed(text),
        };
        (outcome, None)
    }

    fn with_delivery(
        self,
        delivery: rdkafka::producer::future_producer::Delivery,
    ) -> (Outcome, Option<Delivered>) {
        (
            self,
            Some(Delivered {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
        )
    }
}

/// Most span links from one `outbox.publish` span to the messages of its batch.
const MAX_PUBLISH_LINKS: usize = 32;

/// The span of publishing one batch: a child of the first message's producer, linked to the
/// others' (a batch mixes sagas). A batch of one names its topic, order and correlation id.
fn publish_span(records: &[OutboxRecord<'_>]) -> tracing::Span {
    let span = match records {
        [OutboxRecord {
            topic, envelope, ..
        }] => tracing::info_span!(
            "outbox.publish",
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "publish",
            messaging.batch.message_count = 1,
            messaging.destination.name = %topic,
            messaging.kafka.destination.partition = tracing::field::Empty,
            messaging.kafka.message.offset = tracing::field::Empty,
            messaging.message.id = %envelope.message_id,
            order_id = %envelope.saga_id,
            correlation_id = %envelope.correlation_id,
        ),
        _ => tracing::info_span!(
            "outbox.publish",
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "publish",
            messaging.batch.message_count = records.len(),
        ),
    };
    if propagation::enabled() {
        if let Some(first) = records.first() {
            propagation::set_parent(
                &span,
                &first.envelope.traceparent,
                &first.envelope.tracestate,
            );
        }
        for record in records.iter().skip(1).take(MAX_PUBLISH_LINKS) {
            let envelope = &record.envelope;
            if let Some(link) =
                propagation::remote_span_context(&envelope.traceparent, &envelope.tracestate)
            {
                propagation::add_link(&span, link);
            }
        }
    }
    span
}

/// Extra headers are stored as length-prefixed key and value strings (empty for most rows).
fn encode_extra_headers(headers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in headers {
        for part in [key, value] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
    out
}

fn decode_extra_headers(mut bytes: &[u8]) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    while bytes.len() >= 4 {
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let Some(part) = bytes.get(4..4 + len) else {
            break;
        };
        parts.push(String::from_utf8_lossy(part).into_owned());
        bytes = &bytes[4 + len..];
    }
    let mut pairs = Vec::with_capacity(parts.len() / 2);
    let mut iter = parts.into_iter();
    while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
        pairs.push((k, v));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_headers_round_trip() {
        let headers = vec![
            (
                "dlq-error".to_owned(),
                "unknown message type \"x\"".to_owned(),
            ),
            ("dlq-original-offset".to_owned(), "42".to_owned()),
            ("empty".to_owned(), String::new()),
        ];
        assert_eq!(
            decode_extra_headers(&encode_extra_headers(&headers)),
            headers
        );
        assert!(decode_extra_headers(&[]).is_empty());
    }
}
