//! ListPayments streams every payment in order id order, page after page, so that an audit
//! can go through any number of them.

mod common;

use common::TestApp;
use proto::payment::v1 as pb;
use uuid::Uuid;

#[tokio::test]
async fn list_payments_streams_every_payment_in_order_id_order() {
    let app = TestApp::start().await;
    let order_id = Uuid::now_v7();
    let payment_id = app.charge(order_id, "pm_card_visa").await;
    // More than two pages of payments, straight in the database.
    sqlx::query(
        "INSERT INTO payments (payment_id, order_id, amount_cents, currency, payment_method, status) \
         SELECT md5('p' || i)::uuid, md5('o' || i)::uuid, i, 'USD', 'pm_card_visa', \
             CASE WHEN i % 2 = 0 THEN 'SUCCEEDED' ELSE 'VOIDED' END \
         FROM generate_series(1, 2345) AS i",
    )
    .execute(&app.pool)
    .await
    .expect("seed");

    let mut stream = app
        .grpc
        .clone()
        .list_payments(pb::ListPaymentsRequest {})
        .await
        .expect("ListPayments")
        .into_inner();
    let mut payments = Vec::new();
    while let Some(payment) = stream.message().await.expect("next payment") {
        payments.push(payment);
    }
    assert_eq!(payments.len(), 2346);
    let order_ids: Vec<Uuid> = payments
        .iter()
        .map(|p| Uuid::parse_str(&p.order_id).expect("uuid"))
        .collect();
    assert!(
        order_ids.windows(2).all(|w| w[0] < w[1]),
        "in order id order, each once"
    );
    let mine = payments
        .iter()
        .find(|p| p.order_id == order_id.to_string())
        .expect("the charged payment is listed");
    assert_eq!(mine.payment_id, payment_id);
    assert_eq!(mine.status(), pb::PaymentStatus::AwaitingVerification);
    let succeeded = payments
        .iter()
        .filter(|p| p.status() == pb::PaymentStatus::Succeeded)
        .count();
    assert_eq!(succeeded, 2345 / 2);
}
