//! The saga's commands, handled as the consumer does, in a committed transaction.

mod common;

use common::{charge, TestApp, CORRELATION_ID, TRACEPARENT};
use messaging::HandlerError;
use proto::payment::v1 as pb;
use proto::topics::SAGA_REPLIES;
use uuid::Uuid;

#[tokio::test]
async fn charge_records_one_awaiting_payment_and_replies_initiated() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();

    app.handle(order_id, &charge(order_id, "pm_card_visa"))
        .await
        .unwrap();

    let row: (
        Uuid,
        i64,
        String,
        String,
        String,
        Option<String>,
        String,
        String,
    ) = sqlx::query_as(
        "SELECT payment_id, amount_cents, currency, payment_method, status, decline_reason, \
                correlation_id, traceparent FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (payment_id, amount, currency, method, status, reason, correlation_id, traceparent) = row;
    assert_eq!(
        (amount, currency.as_str(), method.as_str()),
        (4_250, "USD", "pm_card_visa")
    );
    assert_eq!(status, "AWAITING_VERIFICATION");
    assert_eq!(reason, None);
    // Kept for the replies a verification causes later.
    assert_eq!(correlation_id, CORRELATION_ID);
    assert_eq!(traceparent, TRACEPARENT);

    let sent = app.sent(order_id).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].topic, app.topic(SAGA_REPLIES));
    assert_eq!(sent[0].envelope.correlation_id, CORRELATION_ID);
    assert_eq!(sent[0].envelope.traceparent, TRACEPARENT);
    assert_eq!(sent[0].envelope.source, "payment-svc");
    let reply: pb::PaymentInitiated = sent[0].decode();
    assert_eq!(reply.order_id, order_id.to_string());
    assert_eq!(reply.payment_id, payment_id.to_string());
}

#[tokio::test]
async fn charge_sent_twice_keeps_one_payment_and_replies_the_same_id() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();

    // Two deliveries with different message ids: the inbox does not catch the second.
    app.handle(order_id, &charge(order_id, "pm_card_visa"))
        .await
        .unwrap();
    app.handle(order_id, &charge(order_id, "pm_card_visa"))
        .await
        .unwrap();

    assert_eq!(app.payment_count(order_id).await, 1);
    let sent = app.sent(order_id).await;
    assert_eq!(sent.len(), 2);
    let first: pb::PaymentInitiated = sent[0].decode();
    let second: pb::PaymentInitiated = sent[1].decode();
    assert!(!first.payment_id.is_empty());
    assert_eq!(first, second);
}

#[tokio::test]
async fn charge_with_a_refused_method_declines_and_replies_failed() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();

    app.handle(order_id, &charge(order_id, "pm_card_bogus"))
        .await
        .unwrap();
    // Sent again: the same outcome.
    app.handle(order_id, &charge(order_id, "pm_card_bogus"))
        .await
        .unwrap();

    let (status, reason): (String, Option<String>) =
        sqlx::query_as("SELECT status, decline_reason FROM payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(status, "DECLINED");
    let reason = reason.unwrap();
    assert!(
        reason.contains("pm_card_bogus") && reason.contains("pm_card_visa"),
        "{reason}"
    );

    let sent = app.sent(order_id).await;
    assert_eq!(sent.len(), 2);
    for message in &sent {
        let failed: pb::PaymentFailed = message.decode();
        assert_eq!(failed.order_id, order_id.to_string());
        assert!(!failed.payment_id.is_empty());
        assert_eq!(failed.reason, reason);
    }
}

#[tokio::test]
async fn invalid_commands_are_permanent_errors_with_no_effect() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();

    let mut negative = charge(order_id, "pm_card_visa");
    negative.amount_cents = -1;
    let error = app.handle(order_id, &negative).await.unwrap_err();
    assert!(
        matches!(&error, HandlerError::Permanent(m) if m.contains("amount_cents")),
        "{error}"
    );

    let mut bad_id = charge(order_id, "pm_card_visa");
    bad_id.order_id = "not-a-uuid".into();
    let error = app.handle(order_id, &bad_id).await.unwrap_err();
    assert!(
        matches!(&error, HandlerError::Permanent(m) if m.contains("not-a-uuid")),
        "{error}"
    );

    let void = pb::VoidPayment {
        order_id: "".into(),
        reason: "deadline".into(),
    };
    let error = app.handle(order_id, &void).await.unwrap_err();
    assert!(matches!(error, HandlerError::Permanent(_)), "{error}");

    // A payload this service does not consume.
    let unknown = pb::PaymentInitiated {
        order_id: order_id.to_string(),
        payment_id: String::new(),
    };
    let error = app.handle(order_id, &unknown).await.unwrap_err();
    assert!(
        matches!(&error, HandlerError::Permanent(m) if m.contains("payment.v1.PaymentInitiated")),
        "{error}"
    );

    assert_eq!(app.payment_count(order_id).await, 0);
    assert!(app.sent(order_id).await.is_empty());
}

fn void(order_id: Uuid) -> pb::VoidPayment {
    pb::VoidPayment {
        order_id: order_id.to_string(),
        reason: "payment deadline passed".into(),
    }
}

fn refund(order_id: Uuid) -> pb::RefundPayment {
    pb::RefundPayment {
        order_id: order_id.to_string(),
        reason: "inventory commit failed".into(),
    }
}

#[tokio::test]
async fn void_before_verification_voids_and_a_later_verification_is_refused() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;

    app.handle(order_id, &void(order_id)).await.unwrap();
    assert_eq!(app.status(order_id).await.as_deref(), Some("VOIDED"));
    let sent = app.sent(order_id).await;
    let voided: pb::PaymentVoided = sent.last().unwrap().decode();
    assert_eq!(voided.payment_id, payment_id);
    assert_eq!(voided.status(), pb::PaymentStatus::Voided);
    assert_eq!(sent.last().unwrap().envelope.correlation_id, CORRELATION_ID);

    let status = app
        .grpc
        .verify_payment(pb::VerifyPaymentRequest {
            payment_id: payment_id.clone(),
            customer_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("voided"), "{}", status.message());
    assert!(
        status.message().contains("no money was taken"),
        "{}",
        status.message()
    );
    // Still voided, and nothing told the saga.
    assert_eq!(app.status(order_id).await.as_deref(), Some("VOIDED"));
    assert_eq!(app.sent(order_id).await.len(), sent.len());

    // Voided again: unchanged, same reply.
    app.handle(order_id, &void(order_id)).await.unwrap();
    let again: pb::PaymentVoided = app.sent(order_id).await.last().unwrap().decode();
    assert_eq!(again, voided);
}

#[tokio::test]
async fn void_after_success_refunds_the_money() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_mastercard").await;
    app.grpc
        .verify_payment(pb::VerifyPaymentRequest {
            payment_id: payment_id.clone(),
            customer_id: String::new(),
        })
        .await
        .unwrap();

    app.handle(order_id, &void(order_id)).await.unwrap();

    assert_eq!(app.status(order_id).await.as_deref(), Some("REFUNDED"));
    let voided: pb::PaymentVoided = app.sent(order_id).await.last().unwrap().decode();
    assert_eq!(voided.payment_id, payment_id);
    assert_eq!(voided.status(), pb::PaymentStatus::Refunded);
}

#[tokio::test]
async fn void_of_a_declined_payment_leaves_it_declined() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    app.charge(order_id, "pm_card_unknown").await;

    app.handle(order_id, &void(order_id)).await.unwrap();

    assert_eq!(app.status(order_id).await.as_deref(), Some("DECLINED"));
    let voided: pb::PaymentVoided = app.sent(order_id).await.last().unwrap().decode();
    assert_eq!(voided.status(), pb::PaymentStatus::Declined);
}

#[tokio::test]
async fn compensations_of_an_order_without_payment_reply_unspecified() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();

    app.handle(order_id, &void(order_id)).await.unwrap();
    app.handle(order_id, &refund(order_id)).await.unwrap();

    assert_eq!(app.payment_count(order_id).await, 0);
    let sent = app.sent(order_id).await;
    assert_eq!(sent.len(), 2);
    let voided: pb::PaymentVoided = sent[0].decode();
    assert_eq!(voided.order_id, order_id.to_string());
    assert_eq!(voided.payment_id, "");
    assert_eq!(voided.status(), pb::PaymentStatus::Unspecified);
    let refunded: pb::PaymentRefunded = sent[1].decode();
    assert_eq!(refunded.payment_id, "");
    assert_eq!(refunded.status(), pb::PaymentStatus::Unspecified);
}

#[tokio::test]
async fn refund_gives_back_a_successful_payment_once() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_amex").await;
    app.grpc
        .verify_payment(pb::VerifyPaymentRequest {
            payment_id: payment_id.clone(),
            customer_id: String::new(),
        })
        .await
        .unwrap();

    app.handle(order_id, &refund(order_id)).await.unwrap();
    app.handle(order_id, &refund(order_id)).await.unwrap();

    assert_eq!(app.status(order_id).await.as_deref(), Some("REFUNDED"));
    let sent = app.sent(order_id).await;
    // PaymentInitiated, PaymentSucceeded, then one PaymentRefunded per command.
    assert_eq!(sent.len(), 4, "{sent:?}");
    for message in &sent[2..] {
        let refunded: pb::PaymentRefunded = message.decode();
        assert_eq!(refunded.payment_id, payment_id);
        assert_eq!(refunded.status(), pb::PaymentStatus::Refunded);
    }

    // A refunded payment cannot be verified into a second charge.
    let status = app
        .grpc
        .verify_payment(pb::VerifyPaymentRequest {
            payment_id,
            customer_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("refunded"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn refund_before_verification_changes_nothing() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;

    app.handle(order_id, &refund(order_id)).await.unwrap();

    assert_eq!(
        app.status(order_id).await.as_deref(),
        Some("AWAITING_VERIFICATION")
    );
    let refunded: pb::PaymentRefunded = app.sent(order_id).await.last().unwrap().decode();
    assert_eq!(refunded.payment_id, payment_id);
    assert_eq!(refunded.status(), pb::PaymentStatus::AwaitingVerification);
}

#[tokio::test]
async fn charge_after_a_void_of_no_payment_is_refused_and_takes_nothing() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();

    // The deadline's void overtook the charge (a redelivery, a replayed dead letter).
    app.handle(order_id, &void(order_id)).await.unwrap();
    app.handle(order_id, &charge(order_id, "pm_card_visa"))
        .await
        .unwrap();

    // No payment awaits verification: nothing the client can verify into a charge.
    let status = app.status(order_id).await;
    assert_ne!(status.as_deref(), Some("AWAITING_VERIFICATION"));
    assert_ne!(status.as_deref(), Some("SUCCEEDED"));
    let by_order = app
        .grpc
        .get_payment(pb::GetPaymentRequest {
            payment_id: String::new(),
            order_id: order_id.to_string(),
        })
        .await;
    if let Ok(payment) = &by_order {
        let payment = payment.get_ref();
        assert_eq!(payment.status(), pb::PaymentStatus::Voided, "{payment:?}");
        let status = app
            .grpc
            .verify_payment(pb::VerifyPaymentRequest {
                payment_id: payment.payment_id.clone(),
                customer_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }

    // The saga is told the charge failed (which its state machine handles in every state),
    // not left waiting for an answer.
    let sent = app.sent(order_id).await;
    assert_eq!(sent.len(), 2, "{sent:?}");
    let voided: pb::PaymentVoided = sent[0].decode();
    assert_eq!(voided.payment_id, "");
    assert_eq!(voided.status(), pb::PaymentStatus::Unspecified);
    let failed: pb::PaymentFailed = sent[1].decode();
    assert_eq!(failed.order_id, order_id.to_string());
    assert!(failed.reason.contains("voided"), "{}", failed.reason);

    // Sent again, the same refusal; voided again, the same answer.
    app.handle(order_id, &charge(order_id, "pm_card_visa"))
        .await
        .unwrap();
    app.handle(order_id, &void(order_id)).await.unwrap();
    let sent = app.sent(order_id).await;
    let again: pb::PaymentFailed = sent[2].decode();
    assert_eq!(again, failed);
    let voided_again: pb::PaymentVoided = sent[3].decode();
    assert_eq!(voided_again, voided);
}

/// The types of messages `sent`, in order.
fn replies(sent: Vec<common::Sent>) -> Vec<String> {
    sent.into_iter().map(|s| s.message_type).collect()
}

/// A batch's charges are recorded by the statement that records its inbox rows; delivered
/// again, the batch charges nothing and replies nothing.
#[tokio::test]
async fn a_batch_of_charges_is_one_statement_and_delivered_again_changes_nothing() {
    let app = TestApp::start().await;
    let (paying, also_paying, declined) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let batch = [
        common::incoming(paying, &charge(paying, "pm_card_visa")),
        common::incoming(also_paying, &charge(also_paying, "pm_card_mastercard")),
        common::incoming(declined, &charge(declined, "pm_card_unknown")),
    ];
    let (new, statements) = test_support::statements_of(&app.pool, app.handle_batch(&batch)).await;
    assert_eq!(new.unwrap(), 3);
    // The running service's relay reads the outbox meanwhile: only the statements on the inbox
    // and the payments are the batch's.
    let batch_statements: Vec<&(String, i64)> = statements
        .iter()
        .filter(|(q, _)| q.contains("inbox") || q.contains("payments"))
        .collect();
    assert_eq!(batch_statements.len(), 1, "{batch_statements:#?}");
    assert_eq!(batch_statements[0].1, 1, "{batch_statements:#?}");
    assert_eq!(
        replies(app.sent(paying).await),
        ["payment.v1.PaymentInitiated"]
    );
    assert_eq!(
        replies(app.sent(also_paying).await),
        ["payment.v1.PaymentInitiated"]
    );
    assert_eq!(
        replies(app.sent(declined).await),
        ["payment.v1.PaymentFailed"]
    );
    assert_eq!(app.status(declined).await.as_deref(), Some("DECLINED"));

    assert_eq!(app.handle_batch(&batch).await.unwrap(), 0);
    for order_id in [paying, also_paying, declined] {
        assert_eq!(app.payment_count(order_id).await, 1);
        assert_eq!(app.sent(order_id).await.len(), 1, "replied once");
    }
}

/// In a batch, a charge that follows a void of its order is applied after it, as one by one:
/// refused, nothing taken.
#[tokio::test]
async fn a_charge_after_a_void_of_its_order_in_one_batch_is_refused() {
    let app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let batch = [
        common::incoming(order_id, &void(order_id)),
        common::incoming(order_id, &charge(order_id, "pm_card_visa")),
    ];
    assert_eq!(app.handle_batch(&batch).await.unwrap(), 2);
    assert_eq!(app.payment_count(order_id).await, 0);
    let sent: Vec<String> = app
        .sent(order_id)
        .await
        .into_iter()
        .map(|s| s.message_type)
        .collect();
    assert_eq!(
        sent,
        ["payment.v1.PaymentVoided", "payment.v1.PaymentFailed"]
    );
}

/// A batch of charges of new orders is one statement with no transaction around it: the
/// payments, the batch's inbox rows and the replies. Delivered again, that statement refuses it
/// (the orders have their payments, the messages are in the inbox), and the consumer's
/// transaction finds it handled: nothing is charged or replied twice.
#[tokio::test]
async fn a_batch_of_new_charges_is_one_statement_without_a_transaction_and_delivered_again_changes_nothing(
) {
    let app = TestApp::start().await;
    let (paying, declined) = (Uuid::new_v4(), Uuid::new_v4());
    let batch = [
        common::incoming(paying, &charge(paying, "pm_card_visa")),
        common::incoming(declined, &charge(declined, "pm_card_unknown")),
    ];
    let (handled, statements) =
        test_support::statements_of(&app.pool, app.handle_received(&batch)).await;
    handled.expect("handled");
    // The running service's relay reads the outbox meanwhile: only the statements on the inbox
    // and the payments, and transactions, are the batch's.
    let batch_statements: Vec<&(String, i64)> = statements
        .iter()
        .filter(|(q, _)| q.contains("inbox") || q.contains("payments") || q == "BEGIN")
        .collect();
    assert_eq!(batch_statements.len(), 1, "{batch_statements:#?}");
    assert!(
        batch_statements[0].0.contains("INSERT INTO outbox"),
        "the replies in the same statement: {batch_statements:#?}"
    );
    assert_eq!(batch_statements[0].1, 1, "{batch_statements:#?}");
    assert_eq!(
        replies(app.sent(paying).await),
        ["payment.v1.PaymentInitiated"]
    );
    assert_eq!(
        replies(app.sent(declined).await),
        ["payment.v1.PaymentFailed"]
    );
    assert_eq!(app.status(declined).await.as_deref(), Some("DECLINED"));
    let initiated: pb::PaymentInitiated = app.sent(paying).await[0].decode();
    let recorded: Uuid = sqlx::query_scalar("SELECT payment_id FROM payments WHERE order_id = $1")
        .bind(paying)
        .fetch_one(&app.pool)
        .await
        .expect("payment");
    assert_eq!(
        initiated.payment_id,
        recorded.to_string(),
        "the reply names the payment recorded"
    );

    let (handled, statements) =
        test_support::statements_of(&app.pool, app.handle_received(&batch)).await;
    handled.expect("handled again");
    assert!(
        statements.iter().any(|(q, _)| q == "BEGIN"),
        "refused alone, decided in a transaction: {statements:#?}"
    );
    for order_id in [paying, declined] {
        assert_eq!(app.payment_count(order_id).await, 1);
        assert_eq!(app.sent(order_id).await.len(), 1, "replied once");
    }
}

/// A charge of an order voided in an earlier batch (its tombstone) makes the one statement of
/// a batch of charges refuse the whole batch, which is then applied in a transaction: that
/// charge refused, nothing taken, the other charged.
#[tokio::test]
async fn a_charge_of_an_order_voided_before_is_refused_and_the_rest_of_its_batch_charged() {
    let app = TestApp::start().await;
    let (voided, paying) = (Uuid::new_v4(), Uuid::new_v4());
    app.handle_received(&[common::incoming(voided, &void(voided))])
        .await
        .expect("void");
    let batch = [
        common::incoming(voided, &charge(voided, "pm_card_visa")),
        common::incoming(paying, &charge(paying, "pm_card_visa")),
    ];
    app.handle_received(&batch).await.expect("charges");
    assert_eq!(app.payment_count(voided).await, 0, "nothing taken");
    assert_eq!(app.payment_count(paying).await, 1);
    assert_eq!(
        replies(app.sent(voided).await),
        ["payment.v1.PaymentVoided", "payment.v1.PaymentFailed"]
    );
    assert_eq!(
        replies(app.sent(paying).await),
        ["payment.v1.PaymentInitiated"]
    );
}
