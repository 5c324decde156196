//! The outbox relay: publishes a service's outbox to Kafka, oldest row first, at least once.
//!
//! One relay of a service publishes at a time: the one holding the session advisory lock
//! [`RELAY_LOCK`] on a connection of its own, which keeps each order's messages in order
//! whatever the number of replicas; the others stand by and try for the lock every poll, so
//! one takes over within a poll of the publisher's death (its session, and so its lock, ends
//! with it). The publisher needs no transaction per batch: it reads a batch, sends it, waits
//! for the broker's acknowledgements, and deletes what was acknowledged with its next read, or
//! a moment later on its own ([`DELETE_AFTER`]). A crash between the acknowledgement and the delete
//! publishes those rows again, which the consumers' inbox absorbs.
//!
//! The writers of its own process hand it the messages of their committed transactions
//! ([`Outbox::committed_messages`]), each with the rows of its keys that the statement which
//! recorded it found in the outbox. It publishes them without reading them back when it has
//! published those rows (or they come earlier in what was handed over); otherwise it reads the
//! outbox, and publishes in the outbox's order. Why that keeps each key's order whatever the
//! number of replicas: a message caused by another's effects was recorded after that other
//! committed, so its statement found the other's row, unless the row was gone, which only its
//! publication (or its parking) makes it. It reads the outbox too when it starts publishing (a backlog, a
//! predecessor's rows), after a failure, when a writer committed rows it did not hand over
//! ([`Outbox::committed`]: a timer's step, a dead letter), when another replica's writer
//! notifies, and at least every poll interval. The outbox stays the truth; the hand-over only
//! saves reading it back.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use uuid::Uuid;

use telemetry::metric;
use telemetry::propagation::{self, KeyValue};

use crate::envelope;
use crate::kafka::KafkaArgs;
use crate::outbox::{Handed, Outbox, OutboxMessage, RelayWake, CHANNEL};

/// Advisory lock held by the one relay publishing a service's outbox at a time.
const RELAY_LOCK: i64 = 0x6f75_7462_6f78;
/// Least time between two measures of the outbox's backlog.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a row the broker acknowledged waits for its delete, when no read of the outbox
/// comes first to delete it with, by default ([`Relay::with_delete_after`]).
pub const DELETE_AFTER: Duration = Duration::from_millis(100);

/// Publishes a service's outbox to Kafka: woken in memory by the writers of its own process,
/// by `NOTIFY outbox` from other replicas' writers, and by a poll as a fallback.
pub struct Relay {
    pool: PgPool,
    kafka: KafkaArgs,
    producer: FutureProducer,
    wake: Arc<RelayWake>,
    batch_size: i64,
    poll_interval: Duration,
    delete_after: Duration,
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
            delete_after: DELETE_AFTER,
        })
    }

    /// How long the relay waits, with nothing waking it, before it reads the outbox again
    /// (a quarter of a second by default): the fallback for a wake-up lost with a connection.
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// How long the first of the rows the broker acknowledged waits for its delete when no
    /// read of the outbox deletes it first ([`DELETE_AFTER`] by default).
    pub fn with_delete_after(mut self, after: Duration) -> Self {
        self.delete_after = after;
        self
    }

    /// Runs until `cancel`; database and broker failures are retried with backoff.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut publisher: Option<PgConnection> = None;
        let mut listener: Option<PgListener> = None;
        let mut backoff = crate::retry::backoff();
        let mut measured: Option<Instant> = None;
        // Rows the broker acknowledged, deleted with the next read of the outbox or soon after.
        let mut acknowledged = Acknowledged::default();
        // Whether the outbox may hold rows committed before what is handed over in memory.
        let mut must_read = true;
        let mut last_read = Instant::now();
        // The messages published lately, by id: what a hand-over may repeat of a read, and what
        // the writers found in the outbox before their messages.
        let mut published = Published::default();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if measured.is_none_or(|at| at.elapsed() >= BACKLOG_INTERVAL) {
                self.measure_backlog().await;
                measured = Some(Instant::now());
            }
            if publisher.is_none() {
                publisher = self.try_to_publish().await;
                self.wake
                    .publishing
                    .store(publisher.is_some(), Ordering::Relaxed);
                // A predecessor's rows, or what was written while no relay published.
                must_read = true;
            }
            if publisher.is_some() && listener.is_none() {
                listener = self.listen().await;
            }
            if let Some(conn) = publisher.as_mut() {
                let handed = self.wake.take_handed();
                if self.wake.take_unread() || last_read.elapsed() >= self.poll_interval {
                    must_read = true;
                }
                let outcome = if must_read {
                    // What was handed over so far has committed: this read finds it.
                    drop(handed);
                    last_read = Instant::now();
                    self.publish(conn, &mut acknowledged, &mut published)
                        .await
                        .inspect(|n| must_read = *n as i64 == self.batch_size)
                } else if !handed.is_empty() {
                    match published.in_order(handed) {
                        Some(handed) => self
                            .publish_handed(&handed, &mut acknowledged, &mut published)
                            .await
                            .map(|(n, all)| {
                                // What the broker did not take waits in the outbox, before
                                // anything handed over after it.
                                must_read = !all;
                                n
                            }),
                        None => {
                            // Rows of their keys wait in the outbox before them.
                            must_read = true;
                            continue;
                        }
                    }
                } else if acknowledged.is_due(self.delete_after, self.batch_size) {
                    acknowledged
                        .delete(conn)
                        .await
                        .map(|()| 0)
                        .map_err(anyhow::Error::from)
                } else {
                    Ok(0)
                };
                match outcome {
                    Ok(_) => {
                        backoff = crate::retry::backoff();
                        if must_read && !cancel.is_cancelled() {
                            continue;
                        }
                    }
                    Err(e) => {
                        must_read = true;
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
            // Until a commit of this process, another replica's NOTIFY, the poll, or the time
            // to delete what the broker acknowledged.
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
            let mut until = match publisher {
                Some(_) => last_read + self.poll_interval,
                // Standing by: try for the lock again a poll interval from now.
                None => Instant::now() + self.poll_interval,
            };
            if let Some(due) = acknowledged.due_at(self.delete_after) {
                until = until.min(due);
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notify.notified() => {}
                _ = notified => must_read = true,
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
        if let (Some(conn), false) = (publisher.as_mut(), acknowledged.is_empty()) {
            // What was acknowledged is deleted before the relay stops; should that fail, the
            // next relay publishes those rows again and the consumers' inbox absorbs them.
            if let Err(e) = acknowledged.delete(conn).await {
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
        let mut acknowledged = Acknowledged::default();
        let done = self
            .publish(&mut tx, &mut acknowledged, &mut Published::default())
            .await?;
        acknowledged.delete(&mut tx).await?;
        tx.commit().await.context("outbox: commit")?;
        Ok(done)
    }

    /// Reads up to one batch from the outbox, oldest first, and publishes it. The rows of
    /// `acknowledged` are deleted by the statement that reads, and `acknowledged` gets this
    /// batch's: should the relay stop before they are deleted, they are published again, which
    /// the consumers' inbox absorbs, as after any crash between the broker's answer and the
    /// delete. A row that can never be published (its envelope does not decode, the broker
    /// refuses it for good) is moved to `outbox_parked` with its error at once, and the rest
    /// goes on. Returns how many rows were done with (published or parked); an error when some
    /// failed for a reason that may pass (they are sent again).
    async fn publish(
        &self,
        conn: &mut PgConnection,
        acknowledged: &mut Acknowledged,
        published: &mut Published,
    ) -> anyhow::Result<usize> {
        // The delete's rows are still in the read's snapshot (one statement), hence the filter.
        let rows = sqlx::query(
            "WITH deleted AS (DELETE FROM outbox WHERE id = ANY($2) OR message_id = ANY($3)) \
             SELECT id, message_id, topic, message_key, envelope, payload, extra_headers \
             FROM outbox WHERE id <> ALL($2) AND message_id <> ALL($3) ORDER BY id LIMIT $1",
        )
        .bind(self.batch_size)
        .bind(&acknowledged.rows)
        .bind(&acknowledged.messages)
        .fetch_all(&mut *conn)
        .await?;
        acknowledged.clear();
        if rows.is_empty() {
            return Ok(0);
        }
        let rows = rows
            .iter()
            .map(OutboxRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut parked: Vec<(RowRef, &str, String)> = Vec::new();
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let id = RowRef::Row(row.id);
            match Envelope::decode(row.envelope) {
                Ok(envelope) => records.push(OutboxRecord {
                    id,
                    message_id: row.message_id,
                    topic: row.topic,
                    key: row.message_key,
                    payload: row.payload,
                    extra_headers: &row.extra_headers.0,
                    envelope: Cow::Owned(envelope),
                }),
                Err(e) => parked.push((id, row.topic, format!("undecodable envelope: {e}"))),
            }
        }
        let sent = self.send_all(&records, published).await;
        parked.extend(sent.refused);
        let done = sent.published.len() + parked.len();
        let ids = |refs: &mut dyn Iterator<Item = &RowRef>| -> Vec<i64> {
            refs.filter_map(|r| match r {
                RowRef::Row(id) => Some(*id),
                RowRef::Message(_) => None,
            })
            .collect()
        };
        if parked.is_empty() {
            acknowledged.add_rows(ids(&mut sent.published.iter()));
        } else {
            let parked_ids = ids(&mut parked.iter().map(|(id, ..)| id));
            let parked_errors: Vec<&str> = parked.iter().map(|(_, _, e)| e.as_str()).collect();
            let gone: Vec<i64> = ids(&mut sent
                .published
                .iter()
                .chain(parked.iter().map(|(id, ..)| id)));
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
            tracing::error!(outbox_row = %id, %topic, %error, "outbox row cannot be published: parked in outbox_parked for an operator");
            metrics::counter!(metric::OUTBOX_PARKED, "topic" => topic.to_string()).increment(1);
        }
        match sent.retry {
            Some(error) => Err(anyhow::anyhow!(error)),
            None => Ok(done),
        }
    }

    /// Publishes messages its writers handed over (committed, in the outbox too), without
    /// reading them back. Returns how many the broker acknowledged (deleted from the outbox
    /// later, by message id, with `acknowledged`), and whether that was all of them: the rest,
    /// refused or failed, is left in the outbox for a read to publish, retry or park.
    async fn publish_handed(
        &self,
        messages: &[(Uuid, OutboxMessage)],
        acknowledged: &mut Acknowledged,
        published: &mut Published,
    ) -> anyhow::Result<(usize, bool)> {
        let mut records = Vec::with_capacity(messages.len());
        for (id, m) in messages {
            records.push(OutboxRecord {
                id: RowRef::Message(*id),
                message_id: *id,
                topic: &m.topic,
                key: &m.key,
                payload: &m.payload,
                extra_headers: &m.extra_headers,
                envelope: Cow::Borrowed(&m.envelope),
            });
        }
        let sent = self.send_all(&records, published).await;
        let all = sent.refused.is_empty() && sent.retry.is_none();
        let published = sent.published.len();
        acknowledged.add_messages(sent.published.iter().filter_map(|r| match r {
            RowRef::Message(id) => Some(*id),
            RowRef::Row(_) => None,
        }));
        Ok((published, all))
    }

    /// Sends `records` to the broker and sorts its answers, with the batch's span, metrics and
    /// log line.
    async fn send_all<'r>(
        &self,
        records: &[OutboxRecord<'r>],
        published: &mut Published,
    ) -> Sent<'r> {
        let mut sent = Sent {
            published: Vec::with_capacity(records.len()),
            refused: Vec::new(),
            retry: None,
        };
        // Nothing to send (messages handed over that a read published first, rows none of
        // which decoded): no batch, so no span, sample or log line of one.
        if records.is_empty() {
            return sent;
        }
        let read_at_ms = envelope::now_ms();
        let waited = metrics::histogram!(metric::OUTBOX_WAIT);
        for record in records {
            let written = record.envelope.occurred_at_ms;
            if written > 0 {
                waited.record(read_at_ms.saturating_sub(written).max(0) as f64 / 1000.0);
            }
        }
        let span = publish_span(records);
        let started = Instant::now();
        let outcomes = self.send(records).instrument(span.clone()).await;
        metrics::histogram!(metric::OUTBOX_PUBLISH).record(started.elapsed().as_secs_f64());
        // One update per topic of the batch (a batch holds a few topics), not per message.
        let mut per_topic: Vec<(&str, u64)> = Vec::new();
        for (record, outcome) in records.iter().zip(outcomes) {
            match outcome {
                Outcome::Published => {
                    sent.published.push(record.id);
                    published.add(record.message_id);
                    match per_topic.iter_mut().find(|(t, _)| *t == record.topic) {
                        Some((_, count)) => *count += 1,
                        None => per_topic.push((record.topic, 1)),
                    }
                }
                Outcome::Refused(error) => sent.refused.push((record.id, record.topic, error)),
                Outcome::Failed(error) => {
                    sent.retry.get_or_insert(error);
                }
            }
        }
        for (topic, count) in per_topic {
            metrics::counter!(metric::OUTBOX_PUBLISHED, "topic" => topic.to_owned())
                .increment(count);
        }
        // In the batch's span, which names the order and its correlation id for a batch of one.
        span.in_scope(|| {
            tracing::debug!(
                published = sent.published.len(),
                refused = sent.refused.len(),
                "outbox: published"
            )
        });
        sent
    }

    /// Queues every record in order and waits for the broker's answer to each. Rows of one key
    /// go to one partition, where the idempotent producer keeps their order through its own
    /// retries.
    async fn send(&self, records: &[OutboxRecord<'_>]) -> Vec<Outcome> {
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let id = record.id;
            let mut headers = envelope::to_headers(&record.envelope);
            for (key, value) in record.extra_headers {
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
    message_id: Uuid,
    topic: &'r str,
    message_key: &'r str,
    envelope: &'r [u8],
    payload: &'r [u8],
    extra_headers: Json<Vec<(String, String)>>,
}

/// How the relay knows a row it publishes: by its id when it read it from the outbox, by its
/// message id when a writer handed it over.
#[derive(Clone, Copy, Debug)]
enum RowRef {
    Row(i64),
    Message(Uuid),
}

impl std::fmt::Display for RowRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Row(id) => write!(f, "{id}"),
            Self::Message(id) => write!(f, "of message {id}"),
        }
    }
}

/// An outbox row being published, its envelope decoded.
struct OutboxRecord<'r> {
    id: RowRef,
    message_id: Uuid,
    topic: &'r str,
    key: &'r str,
    payload: &'r [u8],
    extra_headers: &'r [(String, String)],
    envelope: Cow<'r, Envelope>,
}

/// The broker's answers to a batch, sorted.
struct Sent<'r> {
    published: Vec<RowRef>,
    /// Refused for good, with the topic and the error: to be parked.
    refused: Vec<(RowRef, &'r str, String)>,
    /// The first error of a row to send again, if any.
    retry: Option<String>,
}

/// How many published message ids the relay remembers ([`Published`]).
const REMEMBERED: usize = 16_384;

/// The message ids the relay published lately, the last [`REMEMBERED`]: a writer's statement
/// that found rows of its keys in the outbox saw them before their delete, a moment after
/// their publication at most.
#[derive(Debug, Default)]
struct Published {
    ids: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl Published {
    fn add(&mut self, id: Uuid) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED {
                if let Some(oldest) = self.order.pop_front() {
                    self.ids.remove(&oldest);
                }
            }
        }
    }

    /// The messages handed over, in order, with their ids, less any published already (a read
    /// of the outbox found them first); `None` when a row their writers found in the outbox
    /// before them is not known to be published (nor handed over before them): then they wait
    /// for a read of the outbox, which publishes by the outbox's order.
    fn in_order(&self, handed: Vec<Handed>) -> Option<Vec<(Uuid, OutboxMessage)>> {
        let mut ahead: HashSet<Uuid> = HashSet::new();
        let mut messages = Vec::new();
        for Handed {
            messages: of_one,
            earlier,
        } in handed
        {
            if !earlier
                .iter()
                .all(|id| self.ids.contains(id) || ahead.contains(id))
            {
                return None;
            }
            for message in of_one {
                // `Outbox::message` makes every id; one that does not parse is read instead.
                let id = Uuid::parse_str(&message.envelope.message_id).ok()?;
                if !self.ids.contains(&id) && ahead.insert(id) {
                    messages.push((id, message));
                }
            }
        }
        Some(messages)
    }
}

/// Rows the broker acknowledged, deleted with the relay's next read of the outbox, or on their
/// own once the first has waited [`Relay::with_delete_after`] or they fill a batch.
#[derive(Debug, Default)]
struct Acknowledged {
    /// Read from the outbox.
    rows: Vec<i64>,
    /// Handed over by the writers.
    messages: Vec<Uuid>,
    since: Option<Instant>,
}

impl Acknowledged {
    fn add_rows(&mut self, rows: impl IntoIterator<Item = i64>) {
        self.rows.extend(rows);
        self.started();
    }

    fn add_messages(&mut self, messages: impl IntoIterator<Item = Uuid>) {
        self.messages.extend(messages);
        self.started();
    }

    fn started(&mut self) {
        if self.since.is_none() && !self.is_empty() {
            self.since = Some(Instant::now());
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.messages.is_empty()
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.messages.clear();
        self.since = None;
    }

    /// When they are to be deleted on their own.
    fn due_at(&self, after: Duration) -> Option<Instant> {
        self.since.map(|since| since + after)
    }

    fn is_due(&self, after: Duration, batch_size: i64) -> bool {
        self.due_at(after).is_some_and(|due| due <= Instant::now())
            || (self.rows.len() + self.messages.len()) as i64 >= batch_size
    }

    /// Deletes them, in one statement.
    async fn delete(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if !self.is_empty() {
            sqlx::query("DELETE FROM outbox WHERE id = ANY($1) OR message_id = ANY($2)")
                .bind(&self.rows)
                .bind(&self.messages)
                .execute(conn)
                .await?;
        }
        self.clear();
        Ok(())
    }
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
    fn of(
        id: RowRef,
        what: &str,
        error: &rdkafka::error::KafkaError,
    ) -> (Outcome, Option<Delivered>) {
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
