//! What the messaging tests share: a database and topics of the test's own, a handler that
//! records its effects, and a producer that sends as another service's relay would.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use messaging::envelope;
use messaging::{Consumer, Handler, HandlerError, Incoming, KafkaArgs, Outbox, Relay};
use proto::order::v1::CompleteOrder;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const TOPIC: &str = proto::topics::ORDER_COMMANDS;

pub struct Setup {
    pub pool: PgPool,
    pub kafka: KafkaArgs,
    pub outbox: Outbox,
}

pub async fn setup(label: &str) -> Setup {
    let url = test_support::fresh_database(label).await;
    let pool = runtime::database::connect(&url, 4, &[&messaging::MIGRATOR])
        .await
        .expect("migrate");
    sqlx::query("CREATE TABLE effects (message_id UUID NOT NULL, order_id TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("effects table");
    let kafka = kafka().await;
    let outbox = Outbox::new("test", kafka.clone());
    Setup {
        pool,
        kafka,
        outbox,
    }
}

/// Settings for the test broker with a topic prefix of the test's own, its topics created.
pub async fn kafka() -> KafkaArgs {
    let kafka = KafkaArgs {
        brokers: test_support::kafka_brokers(),
        topic_prefix: test_support::topic_prefix(),
        partitions: 1,
        fetch_wait_max_ms: 500,
        session_timeout_ms: 6000,
        group_instance_id: None,
        linger_ms: 1,
        batch_max: 64,
        batch_linger_ms: 2,
    };
    kafka.ensure_topics().await.expect("topics");
    kafka
}

/// A consumer of `topic` from its beginning, in a group of its own.
pub fn reader(kafka: &KafkaArgs, topic: &str) -> StreamConsumer {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("{}reader-{topic}", kafka.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("reader");
    reader.subscribe(&[topic]).expect("subscribe");
    reader
}

/// Records one effect row per handled message; fails transiently `fail_first` times first,
/// and permanently for payloads it cannot decode.
pub struct Recorder {
    pub calls: Arc<AtomicUsize>,
    pub fail_first: usize,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(
        &self,
        conn: &mut sqlx::PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if message.message_type() != <CompleteOrder as prost::Name>::full_name() {
            return Err(message.unknown_type());
        }
        let command: CompleteOrder = message.decode()?;
        // The effect is written before the failure, so a retry that did not roll it back
        // would show twice.
        sqlx::query("INSERT INTO effects (message_id, order_id) VALUES ($1, $2)")
            .bind(message.message_id()?)
            .bind(&command.order_id)
            .execute(&mut *conn)
            .await?;
        if call < self.fail_first {
            return Err(HandlerError::Transient(
                "database briefly unavailable".into(),
            ));
        }
        Ok(())
    }
}

impl Recorder {
    /// A recorder that never fails transiently.
    pub fn new(calls: Arc<AtomicUsize>) -> Self {
        Self {
            calls,
            fail_first: 0,
        }
    }
}

pub fn producer(kafka: &KafkaArgs) -> FutureProducer {
    kafka.producer().expect("producer")
}

/// Sends a message as another service's relay would, with the given message id and type.
pub async fn send(kafka: &KafkaArgs, message_id: Uuid, message_type: &str, payload: &[u8]) {
    let envelope = proto::messaging::v1::Envelope {
        message_id: message_id.to_string(),
        message_type: message_type.to_owned(),
        saga_id: "saga".into(),
        ..Default::default()
    };
    let topic = kafka.topic(TOPIC);
    producer(kafka)
        .send(
            FutureRecord::to(&topic)
                .key("k")
                .payload(payload)
                .headers(envelope::to_headers(&envelope)),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
}

/// Sends a `CompleteOrder` for `order_id`, as [`send`] does.
pub async fn send_complete(kafka: &KafkaArgs, message_id: Uuid, order_id: &str) {
    let message_type = <CompleteOrder as prost::Name>::full_name();
    send(kafka, message_id, &message_type, &complete(order_id)).await;
}

pub fn complete(order_id: &str) -> Vec<u8> {
    prost::Message::encode_to_vec(&CompleteOrder {
        order_id: order_id.to_owned(),
    })
}

/// The order ids of `effects`, in their order.
pub fn orders(effects: &[(Uuid, String)]) -> Vec<&str> {
    effects.iter().map(|e| e.1.as_str()).collect()
}

pub async fn wait_for_effects(pool: &PgPool, count: i64) -> Vec<(Uuid, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT message_id, order_id FROM effects ORDER BY order_id")
                .fetch_all(pool)
                .await
                .expect("effects");
        if rows.len() as i64 >= count || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the relay has published (and deleted) every outbox row, or panics after
/// `within`.
pub async fn wait_for_empty_outbox(pool: &PgPool, within: Duration) {
    wait_for_empty(pool, "outbox", within).await;
}

/// Waits until `table` has no rows, or panics after `within`.
pub async fn wait_for_empty(pool: &PgPool, table: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .expect("count");
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} rows still in {table} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A consumer running in a task of its own.
pub struct RunningConsumer {
    pub cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningConsumer {
    /// Cancels it (and whatever else shares its token), and waits until it has stopped.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.expect("join").expect("consumer");
    }
}

pub fn start_consumer<H: Handler>(setup: &Setup, group: &str, handler: H) -> RunningConsumer {
    let cancel = CancellationToken::new();
    let consumer = Consumer::new(
        &setup.kafka,
        group,
        &[TOPIC],
        setup.pool.clone(),
        setup.outbox.clone(),
    );
    let task = tokio::spawn(consumer.run(handler, cancel.clone()));
    RunningConsumer { cancel, task }
}

/// The relay of `setup`'s outbox, with no poll (only its writers' wake-ups make it read the
/// outbox), once it has taken the publishing lock and read the outbox a first time.
pub async fn relay_without_poll(setup: &Setup) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let relay = Relay::for_outbox(setup.pool.clone(), &setup.outbox)
        .expect("relay")
        .with_poll_interval(Duration::from_secs(3600));
    let task = tokio::spawn(relay.run(cancel.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    (cancel, task)
}
