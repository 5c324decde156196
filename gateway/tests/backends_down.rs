//! What the gateway owns, with every service down: its probes, its error bodies for bad
//! input, the correlation id and the request timeout.

mod common;

use std::time::Duration;

use common::{closed_url, error_body, Gateway};
use serde_json::json;

async fn gateway() -> Gateway {
    Gateway::start(&closed_url(), &closed_url(), &closed_url(), 10_000).await
}

fn valid_order() -> serde_json::Value {
    json!({"customer_id": "cust-1", "items": [{"sku": "SKU-1", "quantity": 1}], "payment_method": "pm_card_visa"})
}

#[tokio::test]
async fn create_order_is_503_naming_the_order_service() {
    let gateway = gateway().await;
    let response = gateway
        .client
        .post(gateway.url("/orders"))
        .json(&valid_order())
        .send()
        .await
        .unwrap();
    let body = error_body(response, 503, "service_unavailable").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("order service"), "{message}");
    gateway.stop().await;
}

#[tokio::test]
async fn verify_payment_and_products_are_503_naming_their_service() {
    let gateway = gateway().await;
    let response = gateway
        .client
        .post(gateway.url("/payment/verify"))
        .json(&json!({"payment_id": "0190f3f0-0000-7000-8000-000000000001"}))
        .send()
        .await
        .unwrap();
    let body = error_body(response, 503, "service_unavailable").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("payment service"),
        "{body}"
    );

    let response = gateway
        .client
        .get(gateway.url("/products"))
        .send()
        .await
        .unwrap();
    error_body(response, 503, "service_unavailable").await;
    gateway.stop().await;
}

#[tokio::test]
async fn readyz_is_503_naming_every_service_down_and_healthz_is_200() {
    let gateway = gateway().await;
    let response = gateway
        .client
        .get(gateway.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("x-correlation-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(
        body["unavailable"],
        json!(["inventory-svc", "order-svc", "payment-svc"])
    );
    assert_eq!(body["services"]["order-svc"], "unreachable");

    let response = gateway
        .client
        .get(gateway.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers().contains_key("x-correlation-id"));
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({"status": "ok"})
    );
    gateway.stop().await;
}

async fn post_orders(
    gateway: &Gateway,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = gateway.client.post(gateway.url("/orders")).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn bad_bodies_get_json_errors_before_any_service_is_called() {
    let gateway = gateway().await;
    let json = Some("application/json");

    let response = post_orders(&gateway, json, r#"{"customer_id": "c", "items": ["#).await;
    let body = error_body(response, 400, "malformed_json").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("malformed JSON"),
        "{body}"
    );

    let response = post_orders(
        &gateway,
        json,
        r#"{"customer_id": "cust-1", "payment_method": "pm_card_visa"}"#,
    )
    .await;
    let body = error_body(response, 422, "invalid_request").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("items"),
        "{body}"
    );

    let wrong_type = r#"{"customer_id": "c", "items": [{"sku": "A", "quantity": "two"}], "payment_method": "p"}"#;
    let body = error_body(
        post_orders(&gateway, json, wrong_type).await,
        422,
        "invalid_request",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("items[0].quantity"),
        "{body}"
    );

    let too_big = r#"{"customer_id": "c", "items": [{"sku": "A", "quantity": 4294967296}], "payment_method": "p"}"#;
    let body = error_body(
        post_orders(&gateway, json, too_big).await,
        422,
        "invalid_request",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("items[0].quantity"),
        "{body}"
    );

    let negative =
        r#"{"customer_id": "c", "items": [{"sku": "A", "quantity": -1}], "payment_method": "p"}"#;
    error_body(
        post_orders(&gateway, json, negative).await,
        422,
        "invalid_request",
    )
    .await;

    let valid = valid_order().to_string();
    error_body(
        post_orders(&gateway, None, valid.clone()).await,
        415,
        "unsupported_media_type",
    )
    .await;
    error_body(
        post_orders(&gateway, Some("text/plain"), valid).await,
        415,
        "unsupported_media_type",
    )
    .await;

    let padding = "x".repeat(gateway::BODY_LIMIT_BYTES);
    let oversized = json!({"customer_id": padding, "items": [], "payment_method": "p"}).to_string();
    error_body(
        post_orders(&gateway, json, oversized).await,
        413,
        "payload_too_large",
    )
    .await;

    let response = gateway
        .client
        .post(gateway.url("/payment/verify"))
        .json(&json!({"payment_id": 42}))
        .send()
        .await
        .unwrap();
    error_body(response, 422, "invalid_request").await;
    gateway.stop().await;
}

#[tokio::test]
async fn bad_paths_and_methods_get_json_errors() {
    let gateway = gateway().await;
    let response = gateway
        .client
        .get(gateway.url("/orders/not-a-uuid"))
        .send()
        .await
        .unwrap();
    let body = error_body(response, 400, "bad_request").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not-a-uuid"),
        "{body}"
    );

    let response = gateway
        .client
        .get(gateway.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    error_body(response, 404, "not_found").await;

    let response = gateway
        .client
        .delete(gateway.url("/orders"))
        .send()
        .await
        .unwrap();
    error_body(response, 405, "method_not_allowed").await;
    let response = gateway
        .client
        .get(gateway.url("/payment/verify"))
        .send()
        .await
        .unwrap();
    error_body(response, 405, "method_not_allowed").await;
    gateway.stop().await;
}

#[tokio::test]
async fn a_given_correlation_id_is_echoed_and_a_missing_one_is_made() {
    let gateway = gateway().await;
    let response = gateway
        .client
        .get(gateway.url("/no/such/route"))
        .header("x-correlation-id", "test-corr-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "test-corr-42");
    let body = error_body(response, 404, "not_found").await;
    assert_eq!(body["correlation_id"], "test-corr-42");

    let response = gateway
        .client
        .get(gateway.url("/healthz"))
        .header("x-correlation-id", "test-corr-43")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "test-corr-43");

    let response = gateway
        .client
        .get(gateway.url("/healthz"))
        .send()
        .await
        .unwrap();
    let made = response.headers()["x-correlation-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(made).is_ok(), "{made}");
    gateway.stop().await;
}

#[tokio::test]
async fn a_service_that_never_answers_gets_a_504_after_the_request_timeout() {
    // Accepts connections and never speaks HTTP/2.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            connections.push(socket);
        }
    });
    let gateway = Gateway::start(&silent_url, &closed_url(), &closed_url(), 300).await;
    let started = std::time::Instant::now();
    let response = gateway
        .client
        .post(gateway.url("/orders"))
        .json(&valid_order())
        .send()
        .await
        .unwrap();
    let body = error_body(response, 504, "timeout").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("300 ms"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    gateway.stop().await;
    held.abort();
}
