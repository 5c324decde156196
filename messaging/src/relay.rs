//! The outbox relay: publishes a service's outbox to Kafka, oldest row first, at least once.
//!
//! One relay of a service publishes at a time: the one holding the session advisory lock
//! [`RELAY_LOCK`] on a connection of its own, which keeps each order's messages in order
//! whatever the number of replicas; the others stand by and try for the lock every poll, so
//! one takes over within a poll of the publisher's death (its session, and so its lock, ends
//! with it). The publisher needs no transaction per batch: it reads a batch, sends it, waits
//! for the broker's acknowledgements, and deletes what was acknowledged (with what it parks)
//! in one statement. A crash between the acknowledgement and the delete publishes those rows
//! again, which the consumers' inbox absorbs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prost::Message as _;
use proto::messaging::v1::Envelope;
use rdkafka::message::Header;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgListener;
use sqlx::types::Json;
use sqlx::{Connection as _, FromRow, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use telemetry::metric;
use telemetry::propagation::{self, KeyValue};

use crate::envelope;
use crate::kafka::KafkaArgs;
use crate::outbox::{Outbox, RelayWake, CHANNEL};

/// Advisory lock held by the one relay publishing a service's outbox at a time.
const RELAY_LOCK: i64 = 0x6f75_7462_6f78;
/// Least time between two measures of the outbox's backlog.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes a service's outbox to Kafka: woken in memory by the writers of its own process,
/// by `NOTIFY outbox` from other replicas' writers, and by a poll as a fallback.
pub struct Relay {
    pool: PgPool,
    kafka: KafkaArgs,
    producer: FutureProducer,
    wake: Arc<RelayWake>,
    batch_size: i64,
    poll_interval: Duration,
}

impl Relay {
    /// The relay of `outbox`'s process: its writers wake it after their commits.
    pub fn for_outbox(pool: PgPool, outbox: &Outbox) -> anyhow::Result<Self> {
        let mut relay = Self::new(pool, outbox.kafka())?;
        relay.wake = outbox.wake.clone();
        Ok(relay)
    }

    /// A relay woken only by `NOTIFY` and its poll (its writers are in other processes).
    pub fn new(pool: PgPool, kafka: &KafkaArgs) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            kafka: kafka.clone(),
            producer: kafka.producer()?,
            wake: Arc::default(),
            batch_size: 500,
            poll_interval: Duration::from_millis(250),
        })
    }

    /// How long the relay waits, with nothing waking it, before it reads the outbox again
    /// (a quarter of a second by default): the fallback for a wake-up lost with a connection.
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// Runs until `cancel`; database and broker failures are retried with backoff.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut publisher: Option<PgConnection> = None;
        let mut listener: Option<PgListener> = None;
        let mut backoff = crate::retry::backoff();
        let mut measured: Option<std::time::Instant> = None;
        // Rows the broker acknowledged, deleted with the next read of the outbox.
        let mut acknowledged: Vec<i64> = Vec::new();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if measured.is_none_or(|at| at.elapsed() >= BACKLOG_INTERVAL) {
                self.measure_backlog().await;
                measured = Some(std::time::Instant::now());
            }
            if publisher.is_none() {
                publisher = self.try_to_publish().await;
                self.wake
                    .publishing
                    .store(publisher.is_some(), Ordering::Relaxed);
            }
            if publisher.is_some() && listener.is_none() {
                listener = self.listen().await;
            }
            if let Some(conn) = publisher.as_mut() {
                match self.publish(conn, &mut acknowledged).await {
                    Ok(n) => {
                        backoff = crate::retry::backoff();
                        if n as i64 == self.batch_size {
                            continue;
                        }
                    }
                    Err(e) => {
                        self.replace_failed_producer();
                        if conn.ping().await.is_err() {
                            // The lock went with the session: stand by until it is ours again.
                            publisher = None;
                            self.wake.publishing.store(false, Ordering::Relaxed);
                        }
                        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                        tracing::warn!(
                            error = format!("{e:#}"),
                            ?delay,
                            "outbox relay: publish failed, retrying"
                        );
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                }
            }
            // Until a commit of this process, another replica's NOTIFY, or the poll.
            let notified = async {
                match listener.as_mut() {
                    Some(l) => match l.recv().await {
                        Ok(_) => while l.next_buffered().is_some() {},
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox relay: listener lost");
                            listener = None;
                        }
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notify.notified() => {}
                _ = notified => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
        if let (Some(conn), false) = (publisher.as_mut(), acknowledged.is_empty()) {
            // What was acknowledged is deleted before the relay stops; should that fail, the
            // next relay publishes those rows again and the consumers' inbox absorbs them.
            if let Err(e) = delete(conn, &acknowledged).await {
                tracing::debug!(error = %e, "outbox relay: deleting the last acknowledged rows");
            }
        }
        self.wake.publishing.store(false, Ordering::Relaxed);
    }

    /// A connection holding the publishing lock, or `None` while another relay holds it.
    async fn try_to_publish(&self) -> Option<PgConnection> {
        let connected = async {
            let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
            runtime::database::prefer_keys(&mut conn).await?;
            Ok::<_, sqlx::Error>(conn)
        };
        let mut conn = match connected.await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: cannot connect");
                return None;
            }
        };
        // The publisher's own writes (deleting what the broker acknowledged, parking what it
        // refused) commit without waiting for their WAL flush: one lost in a crash only
        // publishes its rows again, which the consumers' inbox absorbs. The flush a service's
        // own transactions wait for stays.
        match sqlx::query_scalar::<_, bool>(
            "SELECT pg_try_advisory_lock($1) FROM set_config('synchronous_commit', 'off', false)",
        )
        .bind(RELAY_LOCK)
        .fetch_one(&mut conn)
        .await
        {
            Ok(true) => {
                tracing::debug!("outbox relay: publishing");
                Some(conn)
            }
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: taking the publishing lock failed");
                None
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen(CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay: LISTEN failed");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: cannot connect to listen");
                None
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

    /// Publishes one batch now, if no other relay of the service is publishing (for tools and
    /// tests; [`Relay::run`] is the relay). Returns how many rows were done with.
    pub async fn publish_batch(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await.context("outbox: begin")?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(0);
        }
        let mut acknowledged = Vec::new();
        let done = self.publish(&mut tx, &mut acknowledged).await?;
        delete(&mut tx, &acknowledged).await?;
        tx.commit().await.context("outbox: commit")?;
        Ok(done)
    }

    /// Publishes up to one batch, oldest first. The rows of `acknowledged` (the last batch's,
    /// which the broker acknowledged) are deleted by the statement that reads this one, and
    /// `acknowledged` becomes this batch's: one round trip a batch, not two. Should the relay
    /// stop before that next read, those rows are published again, which the consumers' inbox
    /// absorbs, as it does after any crash between the broker's answer and the delete.
    /// A row that can never be published (its envelope does not decode, the broker refuses it
    /// for good) is moved to `outbox_parked` with its error at once, and the rest goes on.
    /// Returns how many rows were done with (published or parked); an error when some failed
    /// for a reason that may pass (they are sent again).
    async fn publish(
        &self,
        conn: &mut PgConnection,
        acknowledged: &mut Vec<i64>,
    ) -> anyhow::Result<usize> {
        // The delete's rows are still in the read's snapshot (one statement), hence the filter.
        let rows = sqlx::query(
            "WITH deleted AS (DELETE FROM outbox WHERE id = ANY($2)) \
             SELECT id, topic, message_key, envelope, payload, extra_headers FROM outbox \
             WHERE id <> ALL($2) ORDER BY id LIMIT $1",
        )
        .bind(self.batch_size)
        .bind(&*acknowledged)
        .fetch_all(&mut *conn)
        .await?;
        acknowledged.clear();
        if rows.is_empty() {
            return Ok(0);
        }
        let mut parked: Vec<(i64, &str, String)> = Vec::new();
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let row = OutboxRow::from_row(row)?;
            match Envelope::decode(row.envelope) {
                Ok(envelope) => records.push(OutboxRecord { row, envelope }),
                Err(e) => parked.push((row.id, row.topic, format!("undecodable envelope: {e}"))),
            }
        }
        let read_at_ms = envelope::now_ms();
        let waited = metrics::histogram!(metric::OUTBOX_WAIT);
        for record in &records {
            let written = record.envelope.occurred_at_ms;
            if written > 0 {
                waited.record(read_at_ms.saturating_sub(written).max(0) as f64 / 1000.0);
            }
        }
        let span = publish_span(&records);
        let sent = std::time::Instant::now();
        let outcomes = self.send(&records).instrument(span.clone()).await;
        metrics::histogram!(metric::OUTBOX_PUBLISH).record(sent.elapsed().as_secs_f64());
        let mut published = Vec::with_capacity(records.len());
        let mut retry: Option<String> = None;
        for (record, outcome) in records.iter().zip(outcomes) {
            match outcome {
                Outcome::Published => published.push(record.row.id),
                Outcome::Refused(error) => parked.push((record.row.id, record.row.topic, error)),
                Outcome::Failed(error) => {
                    retry.get_or_insert(error);
                }
            }
        }
        let done = published.len() + parked.len();
        if parked.is_empty() {
            acknowledged.extend_from_slice(&published);
        } else {
            let parked_ids: Vec<i64> = parked.iter().map(|(id, ..)| *id).collect();
            let parked_errors: Vec<&str> = parked.iter().map(|(_, _, e)| e.as_str()).collect();
            let gone: Vec<i64> = published.iter().chain(&parked_ids).copied().collect();
            // One statement, so atomic without a transaction: the parked rows are copied and
            // every row done with is deleted.
            sqlx::query(
                "WITH parked AS ( \
                   INSERT INTO outbox_parked (id, message_id, topic, message_key, message_type, \
                     envelope, payload, extra_headers, created_at, error) \
                   SELECT o.id, o.message_id, o.topic, o.message_key, o.message_type, o.envelope, \
                     o.payload, o.extra_headers, o.created_at, p.error \
                   FROM outbox o JOIN unnest($1::bigint[], $2::text[]) AS p(id, error) ON o.id = p.id \
                   ON CONFLICT (id) DO NOTHING) \
                 DELETE FROM outbox WHERE id = ANY($3)",
            )
            .bind(&parked_ids)
            .bind(&parked_errors)
            .bind(&gone)
            .execute(&mut *conn)
            .await?;
        }
        for (id, topic, error) in &parked {
            tracing::error!(outbox_row = id, %topic, %error, "outbox row cannot be published: parked in outbox_parked for an operator");
            metrics::counter!(metric::OUTBOX_PARKED, "topic" => topic.to_string()).increment(1);
        }
        // One update per topic of the batch (a batch holds a few topics), not per message.
        let mut per_topic: Vec<(&str, u64)> = Vec::new();
        for record in records.iter().filter(|r| published.contains(&r.row.id)) {
            match per_topic.iter_mut().find(|(t, _)| *t == record.row.topic) {
                Some((_, count)) => *count += 1,
                None => per_topic.push((record.row.topic, 1)),
            }
        }
        for (topic, count) in per_topic {
            metrics::counter!(metric::OUTBOX_PUBLISHED, "topic" => topic.to_owned())
                .increment(count);
        }
        // In the batch's span, which names the order and its correlation id for a batch of one.
        span.in_scope(|| {
            tracing::debug!(
                published = published.len(),
                parked = parked.len(),
                "outbox: published"
            )
        });
        match retry {
            Some(error) => Err(anyhow::anyhow!(error)),
            None => Ok(done),
        }
    }
    /// Queues every record in order and waits for the broker's answer to each. Rows of one key
    /// go to one partition, where the idempotent producer keeps their order through its own
    /// retries.
    async fn send(&self, records: &[OutboxRecord<'_>]) -> Vec<Outcome> {
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let row = &record.row;
            let id = row.id;
            let mut headers = envelope::to_headers(&record.envelope);
            for (key, value) in row.extra_headers.iter() {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let message = FutureRecord::to(row.topic)
                .key(row.message_key)
                .payload(row.payload)
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
                        KeyValue::new("messaging.destination.name", record.row.topic.to_string()),
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
        let measured = async {
            let mut tx = self.pool.begin().await?;
            // A count of the whole table, which a sequential scan does best: the one statement
            // of a service that should scan (its connections find rows by key otherwise, see
            // `runtime::database::prefer_keys`).
            sqlx::query("SET LOCAL enable_seqscan = on")
                .execute(&mut *tx)
                .await?;
            let measured: (i64, f64, i64) = sqlx::query_as(
                "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0), \
                   (SELECT count(*) FROM outbox_parked) FROM outbox",
            )
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(measured)
        }
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

/// An outbox row as the relay reads it, borrowed from the fetched row.
#[derive(FromRow)]
struct OutboxRow<'r> {
    id: i64,
    topic: &'r str,
    message_key: &'r str,
    envelope: &'r [u8],
    payload: &'r [u8],
    extra_headers: Json<Vec<(String, String)>>,
}

/// An outbox row being published, its envelope decoded.
struct OutboxRecord<'r> {
    row: OutboxRow<'r>,
    envelope: Envelope,
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
            row: OutboxRow { topic, .. },
            envelope,
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

/// Deletes the outbox rows of `ids` (done with: acknowledged by the broker).
async fn delete(conn: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    if !ids.is_empty() {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(conn)
            .await?;
    }
    Ok(())
}
