//! `payment.v1.PaymentService` over a real socket.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use common::{TestApp, CORRELATION_ID, TRACEPARENT};
use payment_svc::payment::Payment;
use payment_svc::provider::{Decision, PaymentProvider, Simulator};
use proto::payment::v1 as pb;
use proto::topics::SAGA_REPLIES;
use tonic::Code;
use uuid::Uuid;

fn verify(payment_id: &str) -> pb::VerifyPaymentRequest {
    pb::VerifyPaymentRequest {
        payment_id: payment_id.to_owned(),
        customer_id: String::new(),
    }
}

#[tokio::test]
async fn verify_with_an_approving_card_succeeds_and_tells_the_saga() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;

    // The client's request has a correlation id of its own; the saga's one wins.
    let mut request = tonic::Request::new(verify(&payment_id));
    request
        .metadata_mut()
        .insert("x-correlation-id", "client-request".parse().unwrap());
    let payment = app
        .grpc
        .verify_payment(request)
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();

    assert_eq!(payment.payment_id, payment_id);
    assert_eq!(payment.order_id, order_id.to_string());
    assert_eq!(payment.status(), pb::PaymentStatus::Succeeded);
    assert_eq!(payment.amount_cents, 4_250);
    assert_eq!(payment.decline_reason, "");
    assert!(payment.updated_at_ms >= payment.created_at_ms && payment.created_at_ms > 0);
    assert_eq!(app.status(order_id).await.as_deref(), Some("SUCCEEDED"));

    let sent = app.sent(order_id).await;
    assert_eq!(
        sent.len(),
        2,
        "PaymentInitiated then PaymentSucceeded: {sent:?}"
    );
    let outcome = &sent[1];
    assert_eq!(outcome.topic, app.topic(SAGA_REPLIES));
    assert_eq!(outcome.envelope.correlation_id, CORRELATION_ID);
    assert_eq!(outcome.envelope.traceparent, TRACEPARENT);
    assert!(Uuid::parse_str(&outcome.envelope.causation_id).is_ok());
    assert_eq!(outcome.envelope.saga_id, order_id.to_string());
    let succeeded: pb::PaymentSucceeded = outcome.decode();
    assert_eq!(succeeded.order_id, order_id.to_string());
    assert_eq!(succeeded.payment_id, payment_id);
}

#[tokio::test]
async fn verify_with_a_declining_card_declines_with_the_reason() {
    let mut app = TestApp::start().await;
    for (token, reason) in [
        ("pm_card_chargeDeclined", "card_declined"),
        (
            "pm_card_chargeDeclinedInsufficientFunds",
            "insufficient_funds",
        ),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card"),
        ("pm_card_chargeDeclinedFraudulent", "fraudulent"),
    ] {
        let order_id = Uuid::new_v4();
        let payment_id = app.charge(order_id, token).await;

        let payment = app
            .grpc
            .verify_payment(verify(&payment_id))
            .await
            .unwrap()
            .into_inner()
            .payment
            .unwrap();

        assert_eq!(payment.status(), pb::PaymentStatus::Declined, "{token}");
        assert_eq!(payment.decline_reason, reason);
        assert_eq!(app.status(order_id).await.as_deref(), Some("DECLINED"));
        let sent = app.sent(order_id).await;
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1].envelope.correlation_id, CORRELATION_ID);
        let failed: pb::PaymentFailed = sent[1].decode();
        assert_eq!(failed.payment_id, payment_id);
        assert_eq!(failed.order_id, order_id.to_string());
        assert_eq!(failed.reason, reason);
    }
}

#[tokio::test]
async fn verify_twice_answers_the_same_and_sends_one_outcome() {
    let mut app = TestApp::start().await;
    for token in ["pm_card_visa", "pm_card_chargeDeclined"] {
        let order_id = Uuid::new_v4();
        let payment_id = app.charge(order_id, token).await;

        let first = app
            .grpc
            .verify_payment(verify(&payment_id))
            .await
            .unwrap()
            .into_inner();
        let second = app
            .grpc
            .verify_payment(verify(&payment_id))
            .await
            .unwrap()
            .into_inner();

        assert_eq!(first, second, "{token}");
        let outcomes = app.sent(order_id).await.len() - 1;
        assert_eq!(outcomes, 1, "{token}: one outcome message");
    }
}

/// The simulator, counting the verifications it is asked for and the attempts (idempotency
/// keys) they name: one charge per attempt.
#[derive(Default)]
struct CountingProvider {
    verifications: AtomicUsize,
    keys: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[async_trait]
impl PaymentProvider for CountingProvider {
    fn check_method(&self, method: &str) -> Result<(), String> {
        Simulator.check_method(method)
    }

    async fn verify(&self, payment: &Payment, idempotency_key: &str) -> Decision {
        self.verifications.fetch_add(1, Ordering::SeqCst);
        self.keys.lock().unwrap().insert(idempotency_key.to_owned());
        Simulator.verify(payment, idempotency_key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verifications_charge_once_and_send_one_outcome() {
    let provider = Arc::new(CountingProvider::default());
    let app = TestApp::start_with({
        let provider = provider.clone();
        move |app| app.with_provider(provider)
    })
    .await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;

    let verifications = (0..10).map(|_| {
        let mut client = app.grpc.clone();
        let request = verify(&payment_id);
        async move { client.verify_payment(request).await }
    });
    let results = futures::future::join_all(verifications).await;

    for result in results {
        let payment = result.unwrap().into_inner().payment.unwrap();
        assert_eq!(payment.status(), pb::PaymentStatus::Succeeded);
    }
    // Each verification may ask the provider (none waits for another's lock), but all name
    // the same attempt, which the provider charges once.
    assert!(provider.verifications.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        provider.keys.lock().unwrap().len(),
        1,
        "the provider charged once"
    );
    let sent = app.sent(order_id).await;
    let outcomes: Vec<_> = sent
        .iter()
        .filter(|m| m.message_type == "payment.v1.PaymentSucceeded")
        .collect();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(sent.len(), 2, "{sent:?}");
}

#[tokio::test]
async fn verify_refuses_bad_and_unknown_ids() {
    let mut app = TestApp::start().await;

    let status = app
        .grpc
        .verify_payment(verify("not-a-uuid"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("payment_id"),
        "{}",
        status.message()
    );

    let status = app.grpc.verify_payment(verify("")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let unknown = Uuid::new_v4().to_string();
    let status = app.grpc.verify_payment(verify(&unknown)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(&unknown), "{}", status.message());
}

#[tokio::test]
async fn get_payment_by_payment_id_or_order_id() {
    let mut app = TestApp::start().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;

    let by_id = app
        .grpc
        .get_payment(pb::GetPaymentRequest {
            payment_id: payment_id.clone(),
            order_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let by_order = app
        .grpc
        .get_payment(pb::GetPaymentRequest {
            payment_id: String::new(),
            order_id: order_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id, by_order);
    assert_eq!(by_id.payment_id, payment_id);
    assert_eq!(by_id.order_id, order_id.to_string());
    assert_eq!(by_id.status(), pb::PaymentStatus::AwaitingVerification);
    assert_eq!(by_id.payment_method, "pm_card_visa");
    assert_eq!(by_id.currency, "USD");

    for (payment_id, order_id, code) in [
        (String::new(), String::new(), Code::InvalidArgument),
        (
            payment_id.clone(),
            order_id.to_string(),
            Code::InvalidArgument,
        ),
        ("nope".to_owned(), String::new(), Code::InvalidArgument),
        (String::new(), "nope".to_owned(), Code::InvalidArgument),
        (Uuid::new_v4().to_string(), String::new(), Code::NotFound),
        (String::new(), Uuid::new_v4().to_string(), Code::NotFound),
    ] {
        let request = pb::GetPaymentRequest {
            payment_id: payment_id.clone(),
            order_id: order_id.clone(),
        };
        let status = app.grpc.get_payment(request).await.unwrap_err();
        assert_eq!(
            status.code(),
            code,
            "payment_id {payment_id:?}, order_id {order_id:?}"
        );
    }
}

#[tokio::test]
async fn validate_payment_method_accepts_test_cards_and_refuses_the_rest() {
    let mut app = TestApp::start().await;
    let validate = |method: &str| pb::ValidatePaymentMethodRequest {
        payment_method: method.to_owned(),
    };

    for token in ["pm_card_visa", "pm_card_chargeDeclinedFraudulent"] {
        let response = app
            .grpc
            .validate_payment_method(validate(token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.payment_method, token);
    }

    let status = app
        .grpc
        .validate_payment_method(validate("pm_card_bogus"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("pm_card_bogus"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("pm_card_mastercard"),
        "lists the accepted tokens: {}",
        status.message()
    );

    let status = app
        .grpc
        .validate_payment_method(validate(""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "payment_method is required");
}

#[tokio::test]
async fn hostile_strings_are_refused_as_invalid() {
    let mut app = TestApp::start().await;
    for method in ["pm_card_visa\u{0}".to_owned(), "p".repeat(10_000)] {
        let status = app
            .grpc
            .validate_payment_method(pb::ValidatePaymentMethodRequest {
                payment_method: method,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("payment_method"), "{status:?}");
        assert!(status.message().len() < 1000, "{status:?}");
    }
}

#[tokio::test]
async fn a_database_error_that_retrying_cannot_cure_is_internal_not_unavailable() {
    let mut app = TestApp::start().await;
    // A schema out of step with the code fails the same way every time.
    sqlx::query("ALTER TABLE payments RENAME TO payments_elsewhere")
        .execute(&app.pool)
        .await
        .unwrap();
    let status = app
        .grpc
        .get_payment(pb::GetPaymentRequest {
            payment_id: Uuid::new_v4().to_string(),
            order_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
}

/// A provider that takes the money on the first verification of a payment and then never
/// answers (a slow provider, or the service crashing before it records the outcome); asked
/// again with the same idempotency key it answers as the first time, charging nothing more.
#[derive(Default)]
struct ChargesThenHangs {
    charges: std::sync::Mutex<Vec<String>>,
    calls: AtomicUsize,
}

#[async_trait]
impl PaymentProvider for ChargesThenHangs {
    fn check_method(&self, method: &str) -> Result<(), String> {
        Simulator.check_method(method)
    }

    async fn verify(&self, payment: &Payment, idempotency_key: &str) -> Decision {
        let first_call = self.calls.fetch_add(1, Ordering::SeqCst) == 0;
        // A new key is a new charge; a known one replays its answer.
        let key = idempotency_key.to_owned();
        {
            let mut charges = self.charges.lock().unwrap();
            if !charges.contains(&key) {
                charges.push(key);
            }
        }
        if first_call {
            std::future::pending::<()>().await;
        }
        Simulator.verify(payment, idempotency_key).await
    }
}

impl ChargesThenHangs {
    fn charges(&self) -> usize {
        self.charges.lock().unwrap().len()
    }

    async fn called(&self, times: usize) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.calls.load(Ordering::SeqCst) < times {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the provider was not asked"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

async fn start_with_hanging_provider() -> (TestApp, Arc<ChargesThenHangs>) {
    let provider = Arc::new(ChargesThenHangs::default());
    let app = TestApp::start_configured(|config| config.payment_provider_timeout_ms = 1_000, {
        let provider = provider.clone();
        move |app| app.with_provider(provider)
    })
    .await;
    (app, provider)
}

const PATIENCE: std::time::Duration = std::time::Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_void_is_not_held_up_by_the_provider_and_settles_its_attempt() {
    let (app, provider) = start_with_hanging_provider().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;

    // The client verifies; the provider takes the money and does not answer.
    let verification = tokio::spawn({
        let mut client = app.grpc.clone();
        let request = verify(&payment_id);
        async move { client.verify_payment(request).await }
    });
    provider.called(1).await;

    // The payment deadline passes meanwhile: the void must neither wait for the provider nor
    // keep the money on the failed order.
    tokio::time::timeout(PATIENCE, app.handle(order_id, &common::void(order_id)))
        .await
        .expect("the void waited for the provider")
        .unwrap();
    assert_eq!(app.status(order_id).await.as_deref(), Some("REFUNDED"));
    let voided: pb::PaymentVoided = app.sent(order_id).await.last().unwrap().decode();
    assert_eq!(voided.status(), pb::PaymentStatus::Refunded);
    assert_eq!(provider.charges(), 1, "charged once");

    // The hung verification ends with an error the client may retry, and changes nothing.
    let status = tokio::time::timeout(PATIENCE, verification)
        .await
        .expect("the verification never ended")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::DeadlineExceeded | Code::FailedPrecondition
        ),
        "{status:?}"
    );
    assert_eq!(app.status(order_id).await.as_deref(), Some("REFUNDED"));
    assert_eq!(provider.charges(), 1, "charged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_retried_after_a_lost_answer_settles_the_same_attempt_and_charges_once() {
    let (mut app, provider) = start_with_hanging_provider().await;
    let order_id = Uuid::new_v4();
    let payment_id = app.charge(order_id, "pm_card_visa").await;

    // The first verification takes the money and its answer is lost.
    let first = tokio::time::timeout(PATIENCE, app.grpc.verify_payment(verify(&payment_id))).await;
    if let Ok(answer) = first {
        let status = answer.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    assert_eq!(provider.charges(), 1);

    // The client retries: the same attempt is settled, and nothing is charged again.
    let payment = tokio::time::timeout(PATIENCE, app.grpc.verify_payment(verify(&payment_id)))
        .await
        .expect("the retried verification waited for the first")
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    assert_eq!(payment.status(), pb::PaymentStatus::Succeeded);
    assert_eq!(provider.charges(), 1, "charged once");
    let outcomes: Vec<_> = app
        .sent(order_id)
        .await
        .into_iter()
        .filter(|m| m.message_type == "payment.v1.PaymentSucceeded")
        .collect();
    assert_eq!(outcomes.len(), 1);
}
