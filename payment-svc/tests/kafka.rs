//! The whole path through the broker: a command published on `payment.commands` is consumed,
//! and the reply is published on `saga.replies`.

mod common;

use std::time::{Duration, Instant};

use common::{TestApp, CORRELATION_ID};
use prost::Message as _;
use proto::payment::v1 as pb;
use proto::topics::{PAYMENT_COMMANDS, SAGA_REPLIES};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::Message as _;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charge_from_the_broker_is_consumed_and_its_reply_published() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();

    // Published as the orchestrator does: through an outbox (here this test's database's, which
    // the App's relay publishes).
    let outbox = messaging::Outbox::new("orchestrator", app.config.kafka.clone());
    let command = outbox.message(
        PAYMENT_COMMANDS,
        order_id,
        &common::charge(order_id, "pm_card_visa"),
        &common::saga_context(),
    );
    let mut conn = app.pool.acquire().await.unwrap();
    outbox.enqueue(&mut conn, &[command]).await.unwrap();
    drop(conn);

    let replies: StreamConsumer = app.config.kafka.consumer("test-reader").unwrap();
    replies
        .subscribe(&[app.topic(SAGA_REPLIES).as_str()])
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let initiated = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(remaining, replies.recv())
            .await
            .expect("no PaymentInitiated on saga.replies in time")
            .unwrap();
        let headers = message
            .headers()
            .map(messaging::envelope::from_headers)
            .unwrap_or_default();
        if message.key() == Some(order_id.to_string().as_bytes())
            && headers.message_type == "payment.v1.PaymentInitiated"
        {
            assert_eq!(headers.correlation_id, CORRELATION_ID);
            assert_eq!(headers.source, "payment-svc");
            break pb::PaymentInitiated::decode(message.payload().unwrap_or_default()).unwrap();
        }
    };

    assert_eq!(initiated.order_id, order_id.to_string());
    let stored: Uuid = sqlx::query_scalar("SELECT payment_id FROM payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(initiated.payment_id, stored.to_string());
    assert_eq!(
        app.status(order_id).await.as_deref(),
        Some("AWAITING_VERIFICATION")
    );
}
