//! The harness of order-svc's integration tests: the real `App` on a fresh database and its own
//! topics, reached over its gRPC socket.

#![allow(dead_code)] // Each test binary uses its own part of the harness.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use messaging::Incoming;
use order_svc::{App, Config};
use prost::Message as _;
use proto::messaging::v1::Envelope;
use proto::order::v1 as pb;
use proto::order::v1::order_service_client::OrderServiceClient;
use proto::payment::v1 as pay;
use proto::payment::v1::payment_service_server::{PaymentService, PaymentServiceServer};
use sqlx::{PgPool, Row as _};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Payment methods the fake payment provider accepts, like the simulator's test cards.
pub const ACCEPTED_METHODS: &[&str] = &["pm_card_visa", "pm_card_chargeDeclined"];

/// Stands in for payment-svc, of which order-svc uses one call: whether a payment method is
/// accepted. payment-svc is a separate service with its own tests; for order-svc it is an
/// outside dependency, so a fake of that one call over a real gRPC socket tests this service's
/// side of the contract without starting another (the end-to-end tests run the real one).
#[derive(Clone, Default)]
pub struct FakePayments {
    pub calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl PaymentService for FakePayments {
    type ListPaymentsStream = tonic::codegen::BoxStream<pay::Payment>;

    async fn list_payments(
        &self,
        _request: Request<pay::ListPaymentsRequest>,
    ) -> Result<Response<Self::ListPaymentsStream>, Status> {
        Err(Status::unimplemented("not part of the fake"))
    }

    async fn verify_payment(
        &self,
        _request: Request<pay::VerifyPaymentRequest>,
    ) -> Result<Response<pay::VerifyPaymentResponse>, Status> {
        Err(Status::unimplemented("not part of the fake"))
    }

    async fn verify_customer_payment(
        &self,
        _request: Request<pay::VerifyPaymentRequest>,
    ) -> Result<Response<pay::VerifyPaymentResponse>, Status> {
        Err(Status::unimplemented("not part of the fake"))
    }

    async fn get_payment(
        &self,
        _request: Request<pay::GetPaymentRequest>,
    ) -> Result<Response<pay::Payment>, Status> {
        Err(Status::unimplemented("not part of the fake"))
    }

    async fn validate_payment_method(
        &self,
        request: Request<pay::ValidatePaymentMethodRequest>,
    ) -> Result<Response<pay::ValidatePaymentMethodResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let method = request.into_inner().payment_method;
        if ACCEPTED_METHODS.contains(&method.as_str()) {
            Ok(Response::new(pay::ValidatePaymentMethodResponse {
                payment_method: method,
            }))
        } else {
            Err(Status::invalid_argument(format!(
                "payment_method: unknown payment method {method:?}"
            )))
        }
    }
}

/// Serves the fake until `cancel`; returns its URL.
async fn serve_fake_payments(fake: FakePayments, cancel: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PaymentServiceServer::new(fake))
            .serve_with_incoming_shutdown(
                runtime::grpc::incoming(listener),
                cancel.cancelled_owned(),
            ),
    );
    format!("http://{addr}")
}

/// A URL where nothing listens.
async fn unreachable_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

pub struct TestApp {
    pub client: OrderServiceClient<Channel>,
    /// Where the gRPC server listens, `http://host:port`.
    pub grpc_url: String,
    pub pool: PgPool,
    pub config: Config,
    pub payments: FakePayments,
    pub cancel: CancellationToken,
    run: Option<JoinHandle<anyhow::Result<()>>>,
    _stop_on_drop: DropGuard,
}

impl TestApp {
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    /// With `payments_up` false, payment-svc cannot be reached.
    pub async fn start_with(payments_up: bool) -> Self {
        Self::start_with_args(payments_up, &[]).await
    }

    /// With `payments_up` false, payment-svc cannot be reached; `args` are more settings.
    pub async fn start_with_args(payments_up: bool, args: &[&str]) -> Self {
        let cancel = CancellationToken::new();
        let payments = FakePayments::default();
        let payment_url = if payments_up {
            serve_fake_payments(payments.clone(), cancel.clone()).await
        } else {
            unreachable_url().await
        };
        let database_url = test_support::fresh_database("order_svc").await;
        let brokers = test_support::kafka_brokers();
        let prefix = test_support::topic_prefix();
        let config = Config::parse_from(
            [
                "order-svc",
                "--database-url",
                &database_url,
                "--grpc-addr",
                "127.0.0.1:0",
                "--payment-svc-url",
                &payment_url,
                "--payment-svc-timeout-ms",
                "2000",
                "--kafka-brokers",
                &brokers,
                "--kafka-topic-prefix",
                &prefix,
            ]
            .into_iter()
            .chain(args.iter().copied()),
        );
        let app = App::build(config.clone()).await.expect("building the app");
        let pool = app.pool().clone();
        record_outbox_writes(&pool).await;
        let addr = app.grpc_addr();
        let run = tokio::spawn(app.run(cancel.clone()));
        let grpc_url = format!("http://{addr}");
        let client = OrderServiceClient::connect(grpc_url.clone())
            .await
            .expect("connecting to order-svc");
        Self {
            client,
            grpc_url,
            pool,
            config,
            payments,
            cancel: cancel.clone(),
            run: Some(run),
            _stop_on_drop: cancel.drop_guard(),
        }
    }

    /// Stops the app and checks that it shut down cleanly.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(run) = self.run.take() {
            tokio::time::timeout(Duration::from_secs(15), run)
                .await
                .expect("the app stops within its grace period")
                .expect("the app task does not panic")
                .expect("the app stops without error");
        }
    }

    pub async fn create(
        &self,
        request: pb::CreateOrderRequest,
    ) -> Result<pb::CreateOrderResponse, Status> {
        self.client
            .clone()
            .create_order(request)
            .await
            .map(Response::into_inner)
    }

    /// Waits until the service's status listener listens (a long poll then waits for a change
    /// rather than answering at once, and orders placed are kept for long polls).
    pub async fn status_listener_listening(&self) {
        test_support::eventually(Duration::from_secs(10), "the status listener", || async {
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND query LIKE 'LISTEN%'",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            (listening >= 1).then_some(())
        })
        .await;
        // Its LISTEN is seen here a moment before the listener takes its answer.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Places a valid order and returns it.
    pub async fn place_order(&self) -> pb::Order {
        self.create(order_request(
            "cust-1",
            &[("SKU-MOUSE", 1)],
            "pm_card_visa",
            "",
        ))
        .await
        .expect("placing an order")
        .order
        .expect("the reply carries the order")
    }

    pub async fn get(&self, order_id: &str) -> Result<pb::Order, Status> {
        self.client
            .clone()
            .get_order(pb::GetOrderRequest {
                order_id: order_id.to_owned(),
                ..Default::default()
            })
            .await
            .map(Response::into_inner)
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Every message ever written to the outbox (the relay deletes published rows, so they
    /// are read from the copy kept by [`record_outbox_writes`]), oldest first.
    pub async fn outbox_writes(&self) -> Vec<OutboxWrite> {
        sqlx::query("SELECT topic, message_key, message_type, envelope, payload FROM outbox_writes ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|row| OutboxWrite {
                topic: row.get("topic"),
                key: row.get("message_key"),
                message_type: row.get("message_type"),
                envelope: Envelope::decode(row.get::<&[u8], _>("envelope")).unwrap(),
                payload: row.get("payload"),
            })
            .collect()
    }

    pub fn topic(&self, name: &str) -> String {
        self.config.kafka.topic(name)
    }
}

#[derive(Debug)]
pub struct OutboxWrite {
    pub topic: String,
    pub key: String,
    pub message_type: String,
    pub envelope: Envelope,
    pub payload: Vec<u8>,
}

/// Keeps a copy of every row written to the outbox, since the running relay deletes rows once
/// published: tests can then count exactly what a request enqueued. Test-only, in the test's
/// own database.
async fn record_outbox_writes(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE outbox_writes (LIKE outbox);
         CREATE FUNCTION copy_outbox_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO outbox_writes SELECT NEW.*;
             RETURN NULL;
         END $$;
         CREATE TRIGGER copy_outbox_write AFTER INSERT ON outbox
             FOR EACH ROW EXECUTE FUNCTION copy_outbox_write();",
    )
    .execute(pool)
    .await
    .unwrap();
}

pub fn order_request(
    customer_id: &str,
    items: &[(&str, u32)],
    payment_method: &str,
    key: &str,
) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest {
        customer_id: customer_id.to_owned(),
        items: items
            .iter()
            .map(|(sku, quantity)| pb::LineItem {
                sku: (*sku).to_owned(),
                quantity: *quantity,
            })
            .collect(),
        payment_method: payment_method.to_owned(),
        idempotency_key: key.to_owned(),
    }
}

/// A message as the consumer would hand it to the handler, from the orchestrator.
pub fn incoming<M: prost::Message + prost::Name>(order_id: &str, payload: &M) -> Incoming {
    Incoming {
        topic: "order.commands".to_owned(),
        partition: 0,
        offset: 0,
        key: Some(order_id.to_owned()),
        envelope: Envelope {
            message_id: Uuid::now_v7().to_string(),
            message_type: M::full_name(),
            saga_id: order_id.to_owned(),
            correlation_id: "corr-test".to_owned(),
            source: "orchestrator".to_owned(),
            ..Envelope::default()
        },
        payload: payload.encode_to_vec(),
    }
}
