//! End to end: the five real service binaries, the real PostgreSQL and broker, and a client
//! that only speaks REST to the gateway, as users do.

use std::time::Duration;

use e2e::TestPlatform;
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use proto::inventory::v1::GetStockRequest;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use proto::payment::v1::{GetPaymentRequest, PaymentStatus};
use serde_json::{json, Value};

const SAGA_TIMEOUT: Duration = Duration::from_secs(60);

async fn stock(platform: &TestPlatform, sku: &str) -> (i64, i64, i64) {
    let mut client = InventoryServiceClient::connect(platform.grpc_url("inventory-svc"))
        .await
        .expect("inventory gRPC");
    let levels = client
        .get_stock(GetStockRequest {
            skus: vec![sku.to_owned()],
        })
        .await
        .expect("GetStock")
        .into_inner()
        .levels;
    let level = &levels[0];
    (level.available, level.reserved, level.committed)
}

fn str_field<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {value}"))
}

#[tokio::test]
async fn one_order_goes_from_post_to_completed_through_all_five_services() {
    let platform = TestPlatform::start(&[]).await;

    let (status, products) = platform.get("/products").await;
    assert_eq!(status, 200, "{products}");
    let mouse = products["products"]
        .as_array()
        .expect("products")
        .iter()
        .find(|p| p["sku"] == "SKU-MOUSE")
        .expect("SKU-MOUSE in the catalog")
        .clone();
    let unit_price = mouse["unit_price_cents"].as_i64().expect("price");
    let (available_before, reserved_before, committed_before) = stock(&platform, "SKU-MOUSE").await;
    assert_eq!(mouse["available"].as_i64(), Some(available_before));

    // Place the order; the client never sets a price.
    let (status, created) = platform
        .post(
            "/orders",
            &json!({
                "items": [{"sku": "SKU-MOUSE", "quantity": 3}],
                "payment_method": "pm_card_visa"
            }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"], "PENDING");
    assert_eq!(created["total_cents"].as_i64(), Some(3 * unit_price));
    let order_id = str_field(&created, "order_id").to_owned();

    // The saga reserves the stock and records a payment awaiting verification.
    let initiated = platform
        .wait_for_order(&order_id, SAGA_TIMEOUT, |o| {
            o["status"] == "PAYMENT_INITIATED"
        })
        .await;
    let payment_id = str_field(&initiated, "payment_id").to_owned();
    let (available, reserved, _) = stock(&platform, "SKU-MOUSE").await;
    assert_eq!(
        (available, reserved),
        (available_before - 3, reserved_before + 3)
    );

    // The client verifies the payment, as soon as it can.
    let (status, verified) = platform
        .post("/payment/verify", &json!({ "payment_id": payment_id }))
        .await;
    assert_eq!(status, 200, "{verified}");
    assert_eq!(verified["status"], "SUCCEEDED");
    assert_eq!(verified["order_id"], order_id.as_str());

    let completed = platform
        .wait_for_order(&order_id, SAGA_TIMEOUT, |o| {
            o["status"] == "COMPLETED" || o["status"] == "FAILED"
        })
        .await;
    assert_eq!(completed["status"], "COMPLETED", "{completed}");
    assert_eq!(completed["payment_id"], payment_id.as_str());
    assert!(completed["failure_reason"].is_null());

    // Every service's own state agrees: the stock went down by exactly the quantity and the
    // payment of exactly the total succeeded.
    let (available, reserved, committed) = stock(&platform, "SKU-MOUSE").await;
    assert_eq!(available, available_before - 3);
    assert_eq!(reserved, reserved_before);
    assert_eq!(committed, committed_before + 3);
    let mut payments = PaymentServiceClient::connect(platform.grpc_url("payment-svc"))
        .await
        .expect("payment gRPC");
    let payment = payments
        .get_payment(GetPaymentRequest {
            payment_id: payment_id.clone(),
            order_id: String::new(),
        })
        .await
        .expect("GetPayment")
        .into_inner();
    assert_eq!(payment.status(), PaymentStatus::Succeeded);
    assert_eq!(payment.amount_cents, 3 * unit_price);
    assert_eq!(payment.order_id, order_id);

    // Verifying again answers the same outcome and takes no more money.
    let (status, again) = platform
        .post("/payment/verify", &json!({ "payment_id": payment_id }))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["status"], "SUCCEEDED");
}

#[tokio::test]
async fn a_retried_post_with_the_same_idempotency_key_returns_the_same_order() {
    let platform = TestPlatform::start(&[]).await;
    let body = json!({
        "items": [{"sku": "SKU-KEYBOARD", "quantity": 1}],
        "payment_method": "pm_card_visa"
    });
    let post = || platform.post_order_with_key("retry-me-1", &body);
    let (first_status, first) = post().await;
    let (second_status, second) = post().await;
    assert_eq!(first_status, 201, "{first}");
    assert_eq!(second_status, 201, "{second}");
    assert_eq!(first["order_id"], second["order_id"]);

    // Only one saga ran: exactly one unit is reserved for it.
    let order_id = str_field(&first, "order_id");
    platform
        .wait_for_order(order_id, SAGA_TIMEOUT, |o| {
            o["status"] == "PAYMENT_INITIATED"
        })
        .await;
    let (_, reserved, _) = stock(&platform, "SKU-KEYBOARD").await;
    assert_eq!(reserved, 1);
}
