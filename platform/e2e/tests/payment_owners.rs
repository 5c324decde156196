//! `POST /payment/verify` of the customer's own payments only, through the five real services:
//! payment-svc checks the customer in the one `VerifyCustomerPayment` call; a payment charged before it
//! knew customers (its `customer_id` NULL) is checked by its order, as before.

use e2e::{TestPlatform, TEST_CUSTOMER};
use proto::payment::v1::PaymentStatus;
use reqwest::header::AUTHORIZATION;
use serde_json::{json, Value};
use sqlx::Connection as _;

#[tokio::test]
async fn only_its_customer_verifies_a_payment_charged_now_or_before_payments_knew_customers() {
    let platform = TestPlatform::start(&[]).await;
    let other = format!("Bearer {}", platform.token("someone-else"));
    let verify = |payment_id: &str, authorization: Option<&str>| {
        let mut request = platform
            .http
            .post(format!("{}/payment/verify", platform.gateway))
            .json(&json!({ "payment_id": payment_id }));
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        async move {
            let response = request.send().await.expect("POST /payment/verify");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("a JSON body"))
        }
    };

    let current = platform.place_order("SKU-MOUSE", 1, "pm_card_visa").await;
    let legacy = platform.place_order("SKU-MOUSE", 1, "pm_card_visa").await;
    let current_payment = platform.payment_id(&current).await;
    let legacy_payment = platform.payment_id(&legacy).await;
    let mut payments = sqlx::PgConnection::connect(&platform.config.database_url("payments"))
        .await
        .expect("payment-svc's database");
    let customer: Option<String> =
        sqlx::query_scalar("SELECT customer_id FROM payments WHERE payment_id = $1")
            .bind(uuid::Uuid::parse_str(&current_payment).unwrap())
            .fetch_one(&mut payments)
            .await
            .expect("the payment's row");
    assert_eq!(
        customer.as_deref(),
        Some(TEST_CUSTOMER),
        "the charge named the customer"
    );
    // As a payment recorded before payments had a customer.
    let changed = sqlx::query("UPDATE payments SET customer_id = NULL WHERE payment_id = $1")
        .bind(uuid::Uuid::parse_str(&legacy_payment).unwrap())
        .execute(&mut payments)
        .await
        .expect("update")
        .rows_affected();
    assert_eq!(changed, 1);

    // Another customer's payment, of either kind: the 404 of one that does not exist, word
    // for word, and it stays unverified.
    let unknown = uuid::Uuid::now_v7().to_string();
    let (status, none) = verify(&unknown, None).await;
    assert_eq!(status, 404, "{none}");
    let none = none["error"].to_string().replace(&unknown, "ID");
    for (order_id, payment_id) in [(&current, &current_payment), (&legacy, &legacy_payment)] {
        let (status, theirs) = verify(payment_id, Some(&other)).await;
        assert_eq!(status, 404, "{theirs}");
        assert_eq!(
            theirs["error"]
                .to_string()
                .replace(payment_id.as_str(), "ID"),
            none
        );
        let payment = platform.payment_of_order(order_id).await.expect("payment");
        assert_eq!(payment.status(), PaymentStatus::AwaitingVerification);
        let (_, order) = platform.get(&format!("/orders/{order_id}")).await;
        assert_eq!(order["status"], "PAYMENT_INITIATED", "{order}");
    }

    // Its customer verifies either, and the saga completes.
    for (order_id, payment_id) in [(&current, &current_payment), (&legacy, &legacy_payment)] {
        let (status, verified) = verify(payment_id, None).await;
        assert_eq!(status, 200, "{verified}");
        assert_eq!(verified["status"], "SUCCEEDED");
        assert_eq!(verified["order_id"], order_id.as_str());
        let order = platform.final_order(order_id).await;
        assert_eq!(order["status"], "COMPLETED", "{order}");
        // Verifying again answers the same, through the order's check for the old payment too.
        let (status, again) = verify(payment_id, None).await;
        assert_eq!(
            (status, &again["status"]),
            (200, &json!("SUCCEEDED")),
            "{again}"
        );
    }
}
