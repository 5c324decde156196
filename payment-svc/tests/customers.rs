//! VerifyPayment on a customer's behalf: only that customer's payment, checked by the statement
//! that starts the verification; and payments charged before payments knew their customer.

mod common;

use common::{charge, TestApp, CUSTOMER};
use messaging::HandlerError;
use proto::payment::v1::{self as pb, OWNER_UNKNOWN_KEY, OWNER_UNKNOWN_VALUE};
use tonic::Code;
use uuid::Uuid;

fn verify_as(payment_id: &str, customer_id: &str) -> pb::VerifyPaymentRequest {
    pb::VerifyPaymentRequest {
        payment_id: payment_id.to_owned(),
        customer_id: customer_id.to_owned(),
    }
}

/// The error of a `VerifyCustomerPayment` of `payment_id` on `customer_id`'s behalf, which
/// must fail.
async fn refused(app: &mut TestApp, payment_id: &str, customer_id: &str) -> tonic::Status {
    app.grpc
        .verify_customer_payment(verify_as(payment_id, customer_id))
        .await
        .unwrap_err()
}

/// What a verification changes in the payment's row: its status, its attempt, its customer.
async fn row(app: &TestApp, order_id: Uuid) -> (String, Option<Uuid>, Option<String>) {
    sqlx::query_as("SELECT status, attempt_key, customer_id FROM payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Whether `status` is the signal that the payment's customer is unknown to payment-svc.
fn owner_unknown(status: &tonic::Status) -> bool {
    status.code() == Code::FailedPrecondition
        && status
            .metadata()
            .get(OWNER_UNKNOWN_KEY)
            .is_some_and(|v| v == OWNER_UNKNOWN_VALUE)
}

#[tokio::test]
async fn another_customers_payment_is_not_found_word_for_word_and_stays_unverified() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;
    assert_eq!(row(&app, order_id).await.2.as_deref(), Some(CUSTOMER));

    let missing = Uuid::now_v7().to_string();
    let none = refused(&mut app, &missing, CUSTOMER).await;
    assert_eq!(none.code(), Code::NotFound);
    let long = "c".repeat(10_000);
    for customer in ["c-2", "C-1", "c-1 ", "c-1\u{0}", long.as_str()] {
        let theirs = refused(&mut app, &payment_id, customer).await;
        assert_eq!(theirs.code(), Code::NotFound, "{customer:?}: {theirs:?}");
        assert_eq!(
            theirs.message().replace(&payment_id, "ID"),
            none.message().replace(&missing, "ID"),
            "{customer:?}"
        );
        assert!(theirs.metadata().get(OWNER_UNKNOWN_KEY).is_none());
    }
    // Nothing changed: no attempt recorded, nothing sent after PaymentInitiated.
    assert_eq!(
        row(&app, order_id).await,
        ("AWAITING_VERIFICATION".into(), None, Some(CUSTOMER.into()))
    );
    assert_eq!(app.sent(order_id).await.len(), 1);

    // Its customer verifies it.
    let payment = app
        .grpc
        .verify_customer_payment(verify_as(&payment_id, CUSTOMER))
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    assert_eq!(payment.status(), pb::PaymentStatus::Succeeded);
    assert_eq!(app.sent(order_id).await.len(), 2);

    // Decided, its outcome is still none of another customer's business.
    let theirs = refused(&mut app, &payment_id, "c-2").await;
    assert_eq!(theirs.code(), Code::NotFound);
    assert_eq!(
        theirs.message().replace(&payment_id, "ID"),
        none.message().replace(&missing, "ID")
    );
    assert_eq!(app.sent(order_id).await.len(), 2);
}

#[tokio::test]
async fn verify_customer_payment_without_a_customer_is_refused_and_changes_nothing() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;
    let refusal = refused(&mut app, &payment_id, "").await;
    assert_eq!(refusal.code(), Code::InvalidArgument, "{refusal:?}");
    assert!(refusal.message().contains("customer_id"), "{refusal:?}");
    assert_eq!(
        row(&app, order_id).await,
        ("AWAITING_VERIFICATION".into(), None, Some(CUSTOMER.into())),
        "nothing attempted"
    );
}

#[tokio::test]
async fn a_voided_payment_is_refused_to_its_customer_and_not_found_for_another() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;
    app.handle(order_id, &common::void(order_id)).await.unwrap();

    let theirs = refused(&mut app, &payment_id, "c-2").await;
    assert_eq!(theirs.code(), Code::NotFound, "{theirs:?}");

    let refusal = refused(&mut app, &payment_id, CUSTOMER).await;
    assert_eq!(refusal.code(), Code::FailedPrecondition);
    assert!(refusal.message().contains("voided"), "{refusal:?}");
    assert!(!owner_unknown(&refusal), "a refusal, not a question");
}

#[tokio::test]
async fn a_payment_charged_before_customers_were_known_asks_the_caller_to_check_the_order() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;
    // As a payment recorded before the column existed.
    sqlx::query("UPDATE payments SET customer_id = NULL WHERE order_id = $1")
        .bind(order_id)
        .execute(&app.pool)
        .await
        .unwrap();

    for customer in [CUSTOMER, "c-2"] {
        let status = refused(&mut app, &payment_id, customer).await;
        assert!(owner_unknown(&status), "{customer}: {status:?}");
        assert!(status.message().contains(&payment_id), "{status:?}");
    }
    assert_eq!(
        row(&app, order_id).await,
        ("AWAITING_VERIFICATION".into(), None, None),
        "nothing attempted"
    );
    assert_eq!(app.sent(order_id).await.len(), 1);

    // The caller has checked the order's customer: it verifies without one.
    let payment = app
        .grpc
        .verify_payment(verify_as(&payment_id, ""))
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    assert_eq!(payment.status(), pb::PaymentStatus::Succeeded);
    // Verified, the same question again (its customer is still unknown here).
    let status = refused(&mut app, &payment_id, CUSTOMER).await;
    assert!(owner_unknown(&status), "{status:?}");
}

#[tokio::test]
async fn a_charge_that_names_no_customer_records_none_and_a_malformed_one_is_refused() {
    let mut app = TestApp::start().await;

    // From an orchestrator older than ChargePayment.customer_id.
    let order_id = Uuid::new_v4();
    let mut command = charge(order_id, "pm_card_visa");
    command.customer_id = String::new();
    app.handle(order_id, &command).await.unwrap();
    let (status, _, customer) = row(&app, order_id).await;
    assert_eq!((status.as_str(), customer), ("AWAITING_VERIFICATION", None));
    let payment_id = app.charge(order_id, "pm_card_visa").await;
    let status = refused(&mut app, &payment_id, CUSTOMER).await;
    assert!(owner_unknown(&status), "{status:?}");

    let order_id = Uuid::new_v4();
    let mut command = charge(order_id, "pm_card_visa");
    command.customer_id = "c\u{0}1".into();
    let error = app.handle(order_id, &command).await.unwrap_err();
    assert!(
        matches!(&error, HandlerError::Permanent(m) if m.contains("customer_id")),
        "{error}"
    );
    assert_eq!(app.payment_count(order_id).await, 0);
}
