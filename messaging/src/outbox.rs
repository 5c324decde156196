//! The transactional outbox: messages are recorded in the same transaction as the state change
//! that causes them, and the [`Relay`](crate::Relay) publishes them to Kafka at least once, in
//! order.
//!
//! Waking the relay costs no `NOTIFY` on the hot path: the process whose relay publishes (the
//! service's one relay holding the publishing lock) wakes it in memory after each commit that
//! wrote to the outbox; only the writers of other replicas, whose relay stands by, send a
//! `NOTIFY outbox` with their transaction. (A `NOTIFY` takes a lock that serializes every
//! notifying commit of the cluster, WAL flush included.) A writer that knows what it recorded
//! hands its messages to the relay with the wake ([`Outbox::committed_messages`]), and the
//! relay publishes them without reading them back when it has published the rows of their
//! keys that the writer found in the outbox (see `relay.rs`); [`Outbox::committed`] only wakes
//! it to read the outbox.

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use prost::{Message, Name};
use proto::messaging::v1::Envelope;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, Row as _};
use tokio::sync::Notify;
use uuid::Uuid;

use telemetry::propagation::{self, KeyValue, TraceContext};

use crate::envelope::MessageContext;
use crate::kafka::KafkaArgs;

/// Channel on which writers of a replica whose relay stands by notify the publishing one.
pub(crate) const CHANNEL: &str = "outbox";

/// Most transactions' messages waiting in memory for the relay: past them (the relay stuck on
/// an absent broker, say), they are dropped, and the relay reads them from the outbox.
const MAX_HANDED: usize = 10_000;

/// How the writers of one process reach its relay.
#[derive(Debug, Default)]
pub(crate) struct RelayWake {
    /// Woken after a commit that wrote to the outbox.
    pub(crate) notify: Notify,
    /// Whether this process's relay is the one publishing (holds the lock).
    pub(crate) publishing: AtomicBool,
    /// Messages of committed transactions, in the order they committed, for the relay to
    /// publish without reading them back.
    handed: Mutex<Vec<Handed>>,
    /// Whether a transaction committed rows that were not handed over: the relay has to read
    /// the outbox before it publishes anything handed over after them.
    unread: AtomicBool,
}

/// The messages of one committed transaction, handed to the relay.
#[derive(Debug)]
pub(crate) struct Handed {
    pub(crate) messages: Vec<OutboxMessage>,
    /// The rows of the same keys that were in the outbox when the transaction recorded them
    /// (by message id): published before these, or these wait for a read of the outbox.
    pub(crate) earlier: Vec<Uuid>,
}

impl RelayWake {
    /// The messages handed over since the last call, in order.
    pub(crate) fn take_handed(&self) -> Vec<Handed> {
        std::mem::take(&mut *self.handed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether rows were committed that the relay has to read from the outbox; cleared.
    pub(crate) fn take_unread(&self) -> bool {
        self.unread.swap(false, Ordering::AcqRel)
    }
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
    /// wakes this process's relay, which reads them from the outbox. (Forgetting it costs
    /// latency, not messages: the relay also polls.)
    pub fn committed(&self) {
        self.wake.unread.store(true, Ordering::Release);
        self.wake.notify.notify_one();
    }

    /// In place of [`committed`](Self::committed), for a writer that knows every message its
    /// committed transaction recorded (`messages`, in the order recorded) and which rows of
    /// their keys its statements found in the outbox (`earlier`, by message id: what
    /// [`OutboxRows::earlier_sql`] returned): hands them to this process's relay with the wake.
    /// The relay publishes them without reading the outbox back when it has published those
    /// earlier rows already; otherwise it reads the outbox, where they wait behind them.
    pub fn committed_messages(
        &self,
        messages: impl IntoIterator<Item = OutboxMessage>,
        earlier: Vec<Uuid>,
    ) {
        if !self.wake.publishing.load(Ordering::Relaxed) {
            // Another replica's relay publishes: it reads the rows (`recorded` notified it).
            self.committed();
            return;
        }
        let messages: Vec<OutboxMessage> = messages.into_iter().collect();
        if messages.is_empty() {
            return;
        }
        let mut handed = self.wake.handed.lock().unwrap_or_else(|e| e.into_inner());
        handed.push(Handed { messages, earlier });
        if handed.len() > MAX_HANDED {
            handed.clear();
            self.wake.unread.store(true, Ordering::Release);
        }
        drop(handed);
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
            .try_with(|held| held.borrow_mut().held.extend_from_slice(messages))
            .is_ok();
        if held {
            return Ok(());
        }
        self.record(conn, messages).await.map(drop)
    }

    /// As [`enqueue`](Self::enqueue) outside [`collect`]: records `messages` in a statement of
    /// their own, and returns the rows of their keys the statement found in the outbox
    /// ([`OutboxRows::earlier_sql`]), for [`committed_messages`](Self::committed_messages).
    pub async fn record(
        &self,
        conn: &mut PgConnection,
        messages: &[OutboxMessage],
    ) -> Result<Vec<Uuid>, sqlx::Error> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let rows = OutboxRows::new(messages)?;
        static INSERT: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH i AS ({}) SELECT {}",
                OutboxRows::insert_sql(1, None),
                OutboxRows::earlier_sql(1)
            )
        });
        let earlier: Vec<Uuid> = rows
            .bind(sqlx::query(&INSERT))
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        self.recorded(conn).await?;
        Ok(earlier)
    }

    /// After a handler's statement recorded the messages it took with [`take_held`], on the
    /// same connection: [`recorded`](Self::recorded), then gives them back with what that
    /// statement found in the outbox ([`held_recorded`]).
    pub async fn recorded_held(
        &self,
        conn: &mut PgConnection,
        messages: Vec<OutboxMessage>,
        earlier: Vec<Uuid>,
    ) -> Result<(), sqlx::Error> {
        if !messages.is_empty() {
            self.recorded(conn).await?;
            held_recorded(messages, earlier);
        }
        Ok(())
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

    /// An expression (for the statement's result) of the message ids of the rows of the same
    /// keys as the rows bound from parameter `$first` on that were in the outbox when the
    /// statement began (the statement's own are not, being inserted by it): for
    /// [`Outbox::committed_messages`]. One lookup by key per message.
    pub fn earlier_sql(first: usize) -> String {
        format!(
            "(SELECT COALESCE(array_agg(o.message_id), '{{}}') FROM outbox o \
               WHERE o.message_key = ANY(${}::text[]))",
            first + 2
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

/// What [`collect`] keeps of the messages enqueued inside it.
#[derive(Default)]
struct Held {
    /// Enqueued and not recorded yet, in the order they were enqueued.
    held: Vec<OutboxMessage>,
    /// Taken by a handler that recorded them itself and gave them back ([`held_recorded`]),
    /// in the order recorded.
    recorded: Vec<OutboxMessage>,
    /// What the statements that recorded them found in the outbox ([`held_recorded`]).
    earlier: Vec<Uuid>,
}

tokio::task_local! {
    static HELD: RefCell<Held>;
}

/// What [`collect`]'s work sent.
#[derive(Debug, Default)]
pub struct Collected {
    /// For the caller to record with one [`Outbox::enqueue`] before it commits.
    pub unrecorded: Vec<OutboxMessage>,
    /// Recorded by the handlers themselves ([`take_held`], [`held_recorded`]), before
    /// `unrecorded` is.
    pub recorded: Vec<OutboxMessage>,
    /// The rows of their keys the handlers' statements found in the outbox
    /// ([`held_recorded`]).
    pub earlier: Vec<Uuid>,
}

impl Collected {
    /// Every message, in the order the outbox holds them once `unrecorded` is recorded: for
    /// [`Outbox::committed_messages`].
    pub fn into_all(self) -> impl Iterator<Item = OutboxMessage> {
        self.recorded.into_iter().chain(self.unrecorded)
    }
}

/// Runs `work` (handlers writing in one transaction) holding back the messages it enqueues,
/// and returns them with its result, in order, for the caller to record in that transaction
/// with one [`Outbox::enqueue`] before it commits. The consumer runs each batch's handlers so.
pub async fn collect<T>(work: impl Future<Output = T>) -> (T, Collected) {
    HELD.scope(RefCell::new(Held::default()), async {
        let result = work.await;
        let held = HELD.with(|held| std::mem::take(&mut *held.borrow_mut()));
        (
            result,
            Collected {
                unrecorded: held.held,
                recorded: held.recorded,
                earlier: held.earlier,
            },
        )
    })
    .await
}

/// The messages held so far inside [`collect`] (a consumer's batch), taken: for a handler
/// that records them in a statement of its own ([`OutboxRows`] in the statement that saves its
/// state, one round trip fewer), then calls [`Outbox::recorded`] and gives them back with
/// [`held_recorded`]. The batch records only what is held after (and hands both to the relay
/// once it has committed). Outside [`collect`] there are none: [`Outbox::enqueue`] recorded
/// them.
pub fn take_held() -> Vec<OutboxMessage> {
    HELD.try_with(|held| std::mem::take(&mut held.borrow_mut().held))
        .unwrap_or_default()
}

/// Inside [`collect`]: gives back the messages of [`take_held`] once a statement has recorded
/// them, with what that statement found in the outbox ([`OutboxRows::earlier_sql`]), for the
/// relay to publish them after it. Outside, nothing. (Messages taken and never given back are
/// not handed to the relay, which then reads them from the outbox: later, never out of order.)
pub fn held_recorded(recorded: Vec<OutboxMessage>, earlier: Vec<Uuid>) {
    let _ = HELD.try_with(|held| {
        let mut held = held.borrow_mut();
        held.recorded.extend(recorded);
        held.earlier.extend(earlier);
    });
}
