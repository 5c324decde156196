//! The transactional outbox: messages are recorded in the same transaction as the state change
//! that causes them, and the [`Relay`](crate::Relay) publishes them to Kafka at least once, in
//! order.
//!
//! Waking the relay costs no `NOTIFY` on the hot path: the process whose relay publishes (the
//! service's one relay holding the publishing lock) wakes it in memory after each commit that
//! wrote to the outbox ([`Outbox::committed`]); only the writers of other replicas, whose
//! relay stands by, send a `NOTIFY outbox` with their transaction. (A `NOTIFY` takes a lock
//! that serializes every notifying commit of the cluster, WAL flush included.)

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use prost::{Message, Name};
use proto::messaging::v1::Envelope;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres};
use tokio::sync::Notify;
use uuid::Uuid;

use telemetry::propagation::{self, KeyValue, TraceContext};

use crate::envelope::MessageContext;
use crate::kafka::KafkaArgs;

/// Channel on which writers of a replica whose relay stands by notify the publishing one.
pub(crate) const CHANNEL: &str = "outbox";

/// How the writers of one process reach its relay.
#[derive(Debug, Default)]
pub(crate) struct RelayWake {
    /// Woken after a commit that wrote to the outbox.
    pub(crate) notify: Notify,
    /// Whether this process's relay is the one publishing (holds the lock).
    pub(crate) publishing: AtomicBool,
}

/// One message to record in the outbox.
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    pub topic: String,
    pub key: String,
    pub envelope: Envelope,
    pub payload: Vec<u8>,
    /// Headers sent besides the envelope's (the error of a dead letter, say), in order. Stored
    /// as a jsonb array of `[key, value]` pairs.
    pub extra_headers: Vec<(String, String)>,
}

/// Makes outbox messages for one service and records them.
#[derive(Clone, Debug)]
pub struct Outbox {
    source: String,
    kafka: KafkaArgs,
    pub(crate) wake: Arc<RelayWake>,
}

impl Outbox {
    pub fn new(source: impl Into<String>, kafka: KafkaArgs) -> Self {
        Self {
            source: source.into(),
            kafka,
            wake: Arc::default(),
        }
    }

    pub(crate) fn kafka(&self) -> &KafkaArgs {
        &self.kafka
    }

    /// To call once a transaction that [`enqueue`](Self::enqueue)d messages has committed:
    /// wakes this process's relay. (Forgetting it costs latency, not messages: the relay also
    /// polls.)
    pub fn committed(&self) {
        self.wake.notify.notify_one();
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
        let occurred_at_ms = crate::envelope::now_ms();
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

    /// Records messages in the caller's transaction. They are published once it commits (call
    /// [`committed`](Self::committed) then).
    ///
    /// Inside [`collect`] (the consumer's batch), the messages are held and recorded with the
    /// rest of the batch's, in one statement, before the batch's transaction commits.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        messages: &[OutboxMessage],
    ) -> Result<(), sqlx::Error> {
        if messages.is_empty() {
            return Ok(());
        }
        let held = HELD
            .try_with(|held| held.borrow_mut().extend_from_slice(messages))
            .is_ok();
        if held {
            return Ok(());
        }
        let rows = OutboxRows::new(messages)?;
        static INSERT: LazyLock<String> = LazyLock::new(|| OutboxRows::insert_sql(1, None));
        rows.bind(sqlx::query(&INSERT)).execute(&mut *conn).await?;
        self.recorded(conn).await
    }

    /// To call after a statement of the caller's own recorded messages ([`OutboxRows`]), on
    /// the same connection (in its transaction, or after it when it was one statement): tells
    /// the replica whose relay publishes, when that is not this one. ([`committed`] wakes this
    /// process's relay.)
    ///
    /// [`committed`]: Self::committed
    pub async fn recorded(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if !self.wake.publishing.load(Ordering::Relaxed) {
            // Another replica's relay publishes: it hears of the rows when the caller commits.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(CHANNEL)
                .execute(conn)
                .await?;
        }
        Ok(())
    }
}

/// Messages as the arrays that one `INSERT INTO outbox` binds, for a writer that records them
/// in a statement of its own: an order and its event in one statement, with no transaction
/// around it, say. Call [`Outbox::recorded`] after it, and [`Outbox::committed`] once it has
/// committed.
#[derive(Debug)]
pub struct OutboxRows<'a> {
    ids: Vec<Uuid>,
    topics: Vec<&'a str>,
    keys: Vec<&'a str>,
    types: Vec<&'a str>,
    envelopes: Vec<Vec<u8>>,
    payloads: Vec<&'a [u8]>,
    extra_headers: Vec<Json<&'a [(String, String)]>>,
}

impl<'a> OutboxRows<'a> {
    /// The number of parameters [`bind`](Self::bind) adds.
    pub const PARAMETERS: usize = 7;

    pub fn new(messages: &'a [OutboxMessage]) -> Result<Self, sqlx::Error> {
        let mut rows = Self {
            ids: Vec::with_capacity(messages.len()),
            topics: Vec::with_capacity(messages.len()),
            keys: Vec::with_capacity(messages.len()),
            types: Vec::with_capacity(messages.len()),
            envelopes: Vec::with_capacity(messages.len()),
            payloads: Vec::with_capacity(messages.len()),
            extra_headers: Vec::with_capacity(messages.len()),
        };
        for m in messages {
            let id = Uuid::parse_str(&m.envelope.message_id)
                .map_err(|e| sqlx::Error::Protocol(format!("outbox message id: {e}")))?;
            rows.ids.push(id);
            rows.topics.push(m.topic.as_str());
            rows.keys.push(m.key.as_str());
            rows.types.push(m.envelope.message_type.as_str());
            rows.envelopes.push(m.envelope.encode_to_vec());
            rows.payloads.push(m.payload.as_slice());
            rows.extra_headers.push(Json(m.extra_headers.as_slice()));
        }
        Ok(rows)
    }

    /// The `INSERT` (a statement, or the body of a data-modifying `WITH` query) of the rows
    /// bound from parameter `$first` on, when `only_if` (an SQL condition) holds. Rows are
    /// inserted in the order of the messages (`WITH ORDINALITY ... ORDER BY`), so the ids, and
    /// so the relay, keep that order.
    pub fn insert_sql(first: usize, only_if: Option<&str>) -> String {
        let p: Vec<usize> = (first..first + Self::PARAMETERS).collect();
        let only_if = only_if.map(|c| format!(" WHERE {c}")).unwrap_or_default();
        format!(
            "INSERT INTO outbox (message_id, topic, message_key, message_type, envelope, payload, extra_headers) \
             SELECT message_id, topic, message_key, message_type, envelope, payload, extra_headers \
             FROM unnest(${}::uuid[], ${}::text[], ${}::text[], ${}::text[], ${}::bytea[], ${}::bytea[], ${}::jsonb[]) \
               WITH ORDINALITY AS m(message_id, topic, message_key, message_type, envelope, payload, extra_headers, n){only_if} \
             ORDER BY n",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6]
        )
    }

    /// Binds the rows' arrays, in the order [`insert_sql`](Self::insert_sql) numbers them.
    pub fn bind<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.topics)
            .bind(&self.keys)
            .bind(&self.types)
            .bind(&self.envelopes)
            .bind(&self.payloads)
            .bind(&self.extra_headers)
    }
}

tokio::task_local! {
    /// Messages enqueued inside [`collect`], in the order they were enqueued.
    static HELD: RefCell<Vec<OutboxMessage>>;
}

/// Runs `work` (handlers writing in one transaction) holding back the messages it enqueues,
/// and returns them with its result, in order, for the caller to record in that transaction
/// with one [`Outbox::enqueue`] before it commits. The consumer runs each batch's handlers so.
pub async fn collect<T>(work: impl Future<Output = T>) -> (T, Vec<OutboxMessage>) {
    HELD.scope(RefCell::new(Vec::new()), async {
        let result = work.await;
        let held = HELD.with(|held| std::mem::take(&mut *held.borrow_mut()));
        (result, held)
    })
    .await
}

/// The messages held so far inside [`collect`] (a consumer's batch), taken: for a handler
/// that records them in a statement of its own ([`OutboxRows`] in the statement that saves its
/// state, one round trip fewer), then calls [`Outbox::recorded`]. The batch records only what
/// is held after. Outside [`collect`] there are none: [`Outbox::enqueue`] recorded them.
pub fn take_held() -> Vec<OutboxMessage> {
    HELD.try_with(|held| std::mem::take(&mut *held.borrow_mut()))
        .unwrap_or_default()
}
