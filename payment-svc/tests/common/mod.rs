//! The real App on a fresh database and its own topics, and what tests read back from it.
#![allow(dead_code)] // Each test file uses its own part of this.

use messaging::{Handler as _, HandlerError, InboxRows, Incoming, MessageContext};
use payment_svc::handler::PaymentCommands;
use payment_svc::{App, Config};
use prost::Message as _;
use proto::messaging::v1::Envelope;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use sqlx::{PgPool, Row as _};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

pub const CORRELATION_ID: &str = "corr-saga-1";
/// The customer of the orders these tests charge.
pub const CUSTOMER: &str = "c-1";
pub const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

pub struct TestApp {
    pub pool: PgPool,
    pub config: Config,
    pub handler: PaymentCommands,
    pub grpc: PaymentServiceClient<Channel>,
    /// Where the gRPC server listens, `http://host:port`.
    pub grpc_url: String,
    cancel: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn config(database_url: &str) -> Config {
    let mut config = <Config as clap::Parser>::parse_from([
        "payment-svc",
        "--database-url",
        database_url,
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    config.kafka.brokers = test_support::kafka_brokers();
    config.kafka.topic_prefix = test_support::topic_prefix();
    config
}

impl TestApp {
    pub async fn start() -> TestApp {
        Self::start_with(|app| app).await
    }

    /// Starts the App, letting `customize` change it (its provider, say) before it runs.
    pub async fn start_with(customize: impl FnOnce(App) -> App) -> TestApp {
        Self::start_configured(|_| {}, customize).await
    }

    /// Starts the App with its settings changed by `configure`, and itself by `customize`.
    pub async fn start_configured(
        configure: impl FnOnce(&mut Config),
        customize: impl FnOnce(App) -> App,
    ) -> TestApp {
        let url = test_support::fresh_database("payment").await;
        let mut config = config(&url);
        configure(&mut config);
        let app = customize(App::build(config.clone()).await.expect("App::build"));
        let pool = app.pool().clone();
        record_outbox(&pool).await;
        let handler = app.handler();
        let addr = app.grpc_addr();
        let cancel = CancellationToken::new();
        tokio::spawn(app.run(cancel.clone()));
        let grpc_url = format!("http://{addr}");
        let grpc = PaymentServiceClient::connect(grpc_url.clone())
            .await
            .expect("connecting to the gRPC server");
        TestApp {
            pool,
            config,
            handler,
            grpc,
            grpc_url,
            cancel,
        }
    }

    /// Hands `messages` to a consumer as one batch it received: it applies them alone or in a
    /// transaction, as it decides ([`messaging::Handler::takes_alone`]).
    pub async fn handle_received(&self, messages: &[Incoming]) -> Result<(), HandlerError> {
        messaging::Consumer::new(
            &self.config.kafka,
            "payment-svc-test",
            &[proto::topics::PAYMENT_COMMANDS],
            self.pool.clone(),
            messaging::Outbox::new("payment-svc", self.config.kafka.clone()),
        )
        .handle_received(&self.handler, messages)
        .await
    }

    /// Hands `command` for `order_id` to the handler, as the consumer would (a new message id),
    /// in a transaction committed when it succeeds.
    pub async fn handle<M: prost::Message + prost::Name>(
        &self,
        order_id: Uuid,
        command: &M,
    ) -> Result<(), HandlerError> {
        let message = incoming(order_id, command);
        let mut tx = self.pool.begin().await.unwrap();
        self.handler.handle(&mut tx, &message).await?;
        tx.commit().await.unwrap();
        Ok(())
    }

    /// Hands `messages` to the handler as one batch, as the consumer does: the batch prepared
    /// (its inbox rows recorded with its charges), each new message handled, then flushed, in
    /// a transaction committed when it succeeds. Returns how many were new.
    pub async fn handle_batch(&self, messages: &[Incoming]) -> Result<usize, HandlerError> {
        let ids: Vec<(Uuid, &str, &str)> = messages
            .iter()
            .map(|m| (m.message_id().unwrap(), m.message_type(), m.topic.as_str()))
            .collect();
        let batch: Vec<&Incoming> = messages.iter().collect();
        let mut tx = self.pool.begin().await.unwrap();
        let fresh = self
            .handler
            .prepare_recording(&mut tx, &batch, &InboxRows::new(&ids))
            .await?
            .expect("payment-svc records a batch's inbox rows with its charges");
        for message in messages {
            if fresh.contains(&message.message_id().unwrap()) {
                self.handler.handle(&mut tx, message).await?;
            }
        }
        self.handler.flush(&mut tx).await?;
        tx.commit().await.unwrap();
        Ok(fresh.len())
    }

    /// Every message this service has recorded in its outbox for `order_id`, oldest first
    /// (also those the relay has already published and deleted).
    pub async fn sent(&self, order_id: Uuid) -> Vec<Sent> {
        sqlx::query(
            "SELECT topic, message_type, envelope, payload FROM test_outbox_log \
             WHERE message_key = $1 ORDER BY id",
        )
        .bind(order_id.to_string())
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|row| Sent {
            topic: row.get("topic"),
            message_type: row.get("message_type"),
            envelope: Envelope::decode(row.get::<&[u8], _>("envelope")).unwrap(),
            payload: row.get("payload"),
        })
        .collect()
    }

    /// The stored status of the order's payment, or `None`.
    pub async fn status(&self, order_id: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    /// How many payments the order has (tombstones, which hold no money, are not payments).
    pub async fn payment_count(&self, order_id: Uuid) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM payments WHERE order_id = $1 AND NOT tombstone")
            .bind(order_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Charges `order_id` with `method` through the handler and returns the payment id.
    pub async fn charge(&self, order_id: Uuid, method: &str) -> String {
        self.handle(order_id, &charge(order_id, method))
            .await
            .unwrap();
        sqlx::query_scalar::<_, Uuid>("SELECT payment_id FROM payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .to_string()
    }

    /// The topic name as deployed for this test.
    pub fn topic(&self, name: &str) -> String {
        self.config.kafka.topic(name)
    }
}

/// Keeps a copy of every outbox row: the running relay deletes rows once published, and tests
/// check what was sent.
async fn record_outbox(pool: &PgPool) {
    for statement in [
        "CREATE TABLE test_outbox_log (LIKE outbox)",
        "CREATE FUNCTION test_outbox_log() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO test_outbox_log VALUES (NEW.*); RETURN NULL; END $$",
        "CREATE TRIGGER test_outbox_log AFTER INSERT ON outbox \
         FOR EACH ROW EXECUTE FUNCTION test_outbox_log()",
    ] {
        sqlx::query(statement).execute(pool).await.unwrap();
    }
}

/// A message recorded in the outbox.
#[derive(Debug)]
pub struct Sent {
    pub topic: String,
    pub message_type: String,
    pub envelope: Envelope,
    pub payload: Vec<u8>,
}

impl Sent {
    pub fn decode<M: prost::Message + prost::Name + Default>(&self) -> M {
        assert_eq!(self.message_type, M::full_name());
        M::decode(self.payload.as_slice()).unwrap()
    }
}

pub fn charge(order_id: Uuid, method: &str) -> proto::payment::v1::ChargePayment {
    proto::payment::v1::ChargePayment {
        order_id: order_id.to_string(),
        amount_cents: 4_250,
        currency: "USD".into(),
        payment_method: method.into(),
        customer_id: CUSTOMER.into(),
    }
}

/// A command as the orchestrator sends it, with the saga's correlation id and trace context.
pub fn incoming<M: prost::Message + prost::Name>(order_id: Uuid, command: &M) -> Incoming {
    Incoming {
        topic: "payment.commands".into(),
        partition: 0,
        offset: 0,
        key: Some(order_id.to_string()),
        envelope: Envelope {
            message_id: Uuid::now_v7().to_string(),
            message_type: M::full_name(),
            saga_id: order_id.to_string(),
            correlation_id: CORRELATION_ID.into(),
            causation_id: Uuid::now_v7().to_string(),
            traceparent: TRACEPARENT.into(),
            tracestate: String::new(),
            source: "orchestrator".into(),
            occurred_at_ms: 0,
        },
        payload: command.encode_to_vec(),
    }
}

/// The context the orchestrator's commands carry in these tests.
pub fn saga_context() -> MessageContext {
    MessageContext {
        correlation_id: CORRELATION_ID.into(),
        causation_id: Uuid::now_v7().to_string(),
        traceparent: TRACEPARENT.into(),
        tracestate: String::new(),
    }
}

/// The VoidPayment the orchestrator sends when the payment deadline passes.
pub fn void(order_id: Uuid) -> proto::payment::v1::VoidPayment {
    proto::payment::v1::VoidPayment {
        order_id: order_id.to_string(),
        reason: "payment not verified before the deadline".into(),
    }
}
