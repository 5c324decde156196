//! Every failure path of the saga, end to end through the REST API, with the final state of
//! every service checked: the order, the reservation, the stock and the payment.

use std::time::Duration;

use e2e::TestPlatform;
use futures::future::join_all;
use proto::inventory::v1::{ReservationStatus, WriteOffStockRequest};
use proto::payment::v1::PaymentStatus;
use serde_json::{json, Value};
use sqlx::Connection as _;

/// Available, reserved, committed and written off.
async fn levels(platform: &TestPlatform, sku: &str) -> (i64, i64, i64, i64) {
    let l = platform.stock(sku).await;
    (l.available, l.reserved, l.committed, l.written_off)
}

fn reason(order: &Value) -> &str {
    order["failure_reason"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_reservation_that_fails_fails_the_order_and_holds_nothing() {
    let platform = TestPlatform::start(&[]).await;
    platform.set_stock("SKU-MONITOR", 1).await;

    // Not enough stock.
    let order_id = platform.place_order("SKU-MONITOR", 2, "pm_card_visa").await;
    let order = platform.final_order(&order_id).await;
    assert_eq!(order["status"], "FAILED", "{order}");
    assert!(
        reason(&order).contains("out of stock: SKU-MONITOR (asked 2, available 1)"),
        "{order}"
    );
    assert!(order["payment_id"].is_null());
    assert_eq!(levels(&platform, "SKU-MONITOR").await, (1, 0, 0, 0));
    assert!(
        platform.payment_of_order(&order_id).await.is_none(),
        "no payment was recorded"
    );
    assert!(
        platform.reservation(&order_id).await.is_none(),
        "nothing was reserved"
    );

    // A SKU the catalog sells but the inventory does not know (catalog and stock drifted
    // apart: the catalog has no API of its own, so the product is added in its database).
    let mut orders_db = sqlx::PgConnection::connect(&platform.config.database_url("orders"))
        .await
        .expect("orders database");
    sqlx::query("INSERT INTO products (sku, name, unit_price_cents, currency) VALUES ('SKU-GHOST', 'Ghost', 100, 'USD')")
        .execute(&mut orders_db)
        .await
        .expect("add a product");
    let order_id = platform.place_order("SKU-GHOST", 1, "pm_card_visa").await;
    let order = platform.final_order(&order_id).await;
    assert_eq!(order["status"], "FAILED", "{order}");
    assert!(reason(&order).contains("unknown SKU: SKU-GHOST"), "{order}");
    assert!(platform.payment_of_order(&order_id).await.is_none());
}

#[tokio::test]
async fn a_declined_payment_releases_the_stock_and_fails_the_order() {
    let platform = TestPlatform::start(&[]).await;
    let before = levels(&platform, "SKU-HEADSET").await;
    let tokens = [
        ("pm_card_chargeDeclined", "card_declined"),
        (
            "pm_card_chargeDeclinedInsufficientFunds",
            "insufficient_funds",
        ),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card"),
        ("pm_card_chargeDeclinedFraudulent", "fraudulent"),
    ];
    for (token, decline) in tokens {
        let order_id = platform.place_order("SKU-HEADSET", 2, token).await;
        let payment_id = platform.payment_id(&order_id).await;
        let (status, verified) = platform
            .post("/payment/verify", &json!({ "payment_id": payment_id }))
            .await;
        assert_eq!(status, 200, "{verified}");
        assert_eq!(verified["status"], "DECLINED");
        assert_eq!(verified["decline_reason"], decline);

        let order = platform.final_order(&order_id).await;
        assert_eq!(order["status"], "FAILED", "{order}");
        assert!(reason(&order).contains(decline), "{order}");
        let payment = platform.payment_of_order(&order_id).await.expect("payment");
        assert_eq!(payment.status(), PaymentStatus::Declined);
        let reservation = platform.reservation(&order_id).await.expect("reservation");
        assert_eq!(reservation.status(), ReservationStatus::Released);
    }
    assert_eq!(
        levels(&platform, "SKU-HEADSET").await,
        before,
        "the stock is available again"
    );
}

#[tokio::test]
async fn no_verification_before_the_deadline_voids_the_payment_and_releases_the_stock() {
    let platform = TestPlatform::start(&[("PAYMENT_DEADLINE_SECS", "2")]).await;
    platform.warm_up().await;
    let before = levels(&platform, "SKU-KEYBOARD").await;
    let order_id = platform
        .place_order("SKU-KEYBOARD", 1, "pm_card_visa")
        .await;
    let payment_id = platform.payment_id(&order_id).await;

    let order = platform.final_order(&order_id).await;
    assert_eq!(order["status"], "FAILED", "{order}");
    assert!(
        reason(&order).contains("payment not verified before the deadline"),
        "{order}"
    );
    let payment = platform.payment_of_order(&order_id).await.expect("payment");
    assert_eq!(payment.status(), PaymentStatus::Voided);
    assert_eq!(levels(&platform, "SKU-KEYBOARD").await, before);

    // A verification after the deadline is refused and takes no money.
    let (status, body) = platform
        .post("/payment/verify", &json!({ "payment_id": payment_id }))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("deadline"),
        "{body}"
    );
    let payment = platform.payment_of_order(&order_id).await.expect("payment");
    assert_eq!(payment.status(), PaymentStatus::Voided);
}

#[tokio::test]
async fn a_commit_that_fails_after_the_reservation_expired_refunds_the_payment() {
    let platform = TestPlatform::start(&[
        ("RESERVATION_TTL_SECS", "1"),
        ("RESERVATION_SWEEP_INTERVAL_MS", "100"),
    ])
    .await;
    let before = levels(&platform, "SKU-MOUSE").await;
    let order_id = platform.place_order("SKU-MOUSE", 2, "pm_card_visa").await;
    let payment_id = platform.payment_id(&order_id).await;
    // Let the reservation's time to live run out before the client verifies.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while platform.reservation(&order_id).await.map(|r| r.status())
        != Some(ReservationStatus::Released)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the reservation never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, verified) = platform
        .post("/payment/verify", &json!({ "payment_id": payment_id }))
        .await;
    assert_eq!(status, 200, "{verified}");
    assert_eq!(verified["status"], "SUCCEEDED");

    let order = platform.final_order(&order_id).await;
    assert_eq!(order["status"], "FAILED", "{order}");
    assert!(
        reason(&order).contains("inventory commit failed: reservation expired"),
        "{order}"
    );
    let payment = platform.payment_of_order(&order_id).await.expect("payment");
    assert_eq!(
        payment.status(),
        PaymentStatus::Refunded,
        "the money taken is given back"
    );
    assert_eq!(levels(&platform, "SKU-MOUSE").await, before);
}

#[tokio::test]
async fn a_commit_that_fails_after_a_write_off_refunds_the_payment() {
    let platform = TestPlatform::start(&[]).await;
    platform.set_stock("SKU-WEBCAM", 10).await;
    let order_id = platform.place_order("SKU-WEBCAM", 2, "pm_card_visa").await;
    let payment_id = platform.payment_id(&order_id).await;
    // An operator writes off more than is available: the reservation is given up.
    let written = platform
        .inventory()
        .await
        .write_off_stock(WriteOffStockRequest {
            sku: "SKU-WEBCAM".into(),
            quantity: 9,
            reason: "flooded warehouse".into(),
        })
        .await
        .expect("write off")
        .into_inner();
    assert_eq!(written.released_order_ids, std::slice::from_ref(&order_id));

    let (status, verified) = platform
        .post("/payment/verify", &json!({ "payment_id": payment_id }))
        .await;
    assert_eq!(status, 200, "{verified}");
    let order = platform.final_order(&order_id).await;
    assert_eq!(order["status"], "FAILED", "{order}");
    assert!(
        reason(&order).contains("stock written off: flooded warehouse"),
        "{order}"
    );
    let payment = platform.payment_of_order(&order_id).await.expect("payment");
    assert_eq!(payment.status(), PaymentStatus::Refunded);
    // 10 set = 1 available + 9 written off; nothing held, nothing sold.
    assert_eq!(levels(&platform, "SKU-WEBCAM").await, (1, 0, 0, 9));
}

#[tokio::test]
async fn verify_sent_twice_at_once_charges_once() {
    let platform = TestPlatform::start(&[]).await;
    let order_id = platform.place_order("SKU-MOUSE", 1, "pm_card_visa").await;
    let payment_id = platform.payment_id(&order_id).await;
    let body = json!({ "payment_id": payment_id });
    let answers = join_all((0..4).map(|_| platform.post("/payment/verify", &body))).await;
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(answer["status"], "SUCCEEDED");
    }
    let order = platform.final_order(&order_id).await;
    assert_eq!(order["status"], "COMPLETED", "{order}");
    let mouse = platform.stock("SKU-MOUSE").await;
    assert_eq!(
        (mouse.reserved, mouse.committed),
        (0, 1),
        "one unit sold, once"
    );
}

#[tokio::test]
async fn verify_racing_the_deadline_has_one_outcome_and_keeps_no_money_of_a_failed_order() {
    let platform = TestPlatform::start(&[
        ("PAYMENT_DEADLINE_SECS", "2"),
        ("TIMER_POLL_INTERVAL_MS", "10"),
    ])
    .await;
    platform.warm_up().await;

    let before = levels(&platform, "SKU-HEADSET").await;
    let mut orders = Vec::new();
    let mut placed = Vec::new();
    for _ in 0..8 {
        placed.push(std::time::Instant::now());
        orders.push(platform.place_order("SKU-HEADSET", 1, "pm_card_visa").await);
    }
    // Verify each close to its deadline (two seconds after it was placed), from 500 ms before
    // to 200 ms after.
    let verifications = orders
        .iter()
        .zip(&placed)
        .enumerate()
        .map(|(i, (order_id, placed))| {
            let platform = &platform;
            async move {
                let order = platform
                    .wait_for_order(order_id, Duration::from_secs(30), |o| {
                        o["status"] == "PAYMENT_INITIATED" || o["status"] == "FAILED"
                    })
                    .await;
                let payment_id = order["payment_id"].as_str()?.to_owned();
                tokio::time::sleep_until(
                    (*placed + Duration::from_millis(1500 + 100 * i as u64)).into(),
                )
                .await;
                Some(
                    platform
                        .post("/payment/verify", &json!({ "payment_id": payment_id }))
                        .await,
                )
            }
        });
    let answers = join_all(verifications).await;
    let mut completed = 0;
    for (order_id, answer) in orders.iter().zip(&answers) {
        let order = platform.final_order(order_id).await;
        let payment = platform.payment_of_order(order_id).await;
        match order["status"].as_str() {
            Some("COMPLETED") => {
                completed += 1;
                let (status, answer) = answer.as_ref().expect("a completed order was verified");
                assert_eq!(*status, 200, "{answer}");
                assert_eq!(payment.expect("payment").status(), PaymentStatus::Succeeded);
            }
            Some("FAILED") => {
                // Voided before it was verified, or verified and then given back.
                if let Some(payment) = payment {
                    assert!(
                        matches!(
                            payment.status(),
                            PaymentStatus::Voided | PaymentStatus::Refunded
                        ),
                        "order {order_id} failed but its payment is {:?}",
                        payment.status()
                    );
                }
                if let Some((status, answer)) = answer {
                    assert!(
                        *status == 409 || answer["status"] == "SUCCEEDED",
                        "{status} {answer}"
                    );
                }
            }
            other => panic!("order {order_id} ended {other:?}"),
        }
    }
    eprintln!(
        "verify racing the deadline: {completed} of {} completed",
        orders.len()
    );
    let after = levels(&platform, "SKU-HEADSET").await;
    assert_eq!(after.1, 0, "nothing is left reserved");
    assert_eq!(
        after.2 - before.2,
        completed,
        "exactly the completed orders were sold"
    );
    assert_eq!(after.0, before.0 - completed);
}

#[tokio::test]
async fn the_same_order_placed_at_once_with_one_idempotency_key_is_placed_once() {
    let platform = TestPlatform::start(&[]).await;
    let body = json!({
        "items": [{"sku": "SKU-KEYBOARD", "quantity": 1}],
        "payment_method": "pm_card_visa"
    });
    let post = || platform.post_order_with_key("double-click-1", &body);
    let answers = join_all((0..6).map(|_| post())).await;
    let ids: std::collections::HashSet<_> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 201, "{body}");
            body["order_id"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one order: {ids:?}");
    let order_id = ids.into_iter().next().unwrap_or_default();
    platform.payment_id(&order_id).await;
    assert_eq!(
        platform.stock("SKU-KEYBOARD").await.reserved,
        1,
        "one saga ran"
    );
}

#[tokio::test]
async fn fifty_orders_for_the_last_ten_units_reserve_exactly_ten() {
    let platform = TestPlatform::start(&[]).await;
    platform.set_stock("SKU-MONITOR", 10).await;
    let orders =
        join_all((0..50).map(|_| platform.place_order("SKU-MONITOR", 1, "pm_card_visa"))).await;
    let mut reserved = 0;
    let mut out_of_stock = 0;
    for order_id in &orders {
        let order = platform
            .wait_for_order(order_id, Duration::from_secs(60), |o| {
                o["status"] == "PAYMENT_INITIATED" || o["status"] == "FAILED"
            })
            .await;
        if order["status"] == "PAYMENT_INITIATED" {
            reserved += 1;
        } else {
            assert!(reason(&order).contains("out of stock"), "{order}");
            out_of_stock += 1;
        }
    }
    assert_eq!((reserved, out_of_stock), (10, 40));
    assert_eq!(levels(&platform, "SKU-MONITOR").await, (0, 10, 0, 0));
}

/// `/readyz` until `check` holds of its status and body, or panics after `within`.
async fn readiness_until(
    platform: &TestPlatform,
    within: Duration,
    what: &str,
    check: impl Fn(reqwest::StatusCode, &Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (status, body) = platform.get("/readyz").await;
        if check(status, &body) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never said {what} within {within:?}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_service_whose_database_goes_away_is_not_ready_until_it_returns() {
    let platform = TestPlatform::start(&[]).await;
    let database = platform
        .config
        .database_url("inventory")
        .parse::<sqlx::postgres::PgConnectOptions>()
        .expect("a database URL")
        .get_database()
        .expect("a database name")
        .to_owned();
    let mut server = sqlx::PgConnection::connect(&platform.config.database_server_url)
        .await
        .expect("the database server");
    // The database goes away for inventory-svc: no new connection, the open ones cut.
    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS false"
    ))
    .execute(&mut server)
    .await
    .expect("refuse connections");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&database)
        .execute(&mut server)
        .await
        .expect("cut connections");
    let body = readiness_until(
        &platform,
        Duration::from_secs(20),
        "inventory-svc not ready",
        |status, body| {
            status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && body["unavailable"] == json!(["inventory-svc"])
        },
    )
    .await;
    assert_eq!(body["status"], "not_ready", "{body}");
    assert_eq!(
        body["services"]["inventory-svc"], "not_serving",
        "it answers, and says it cannot serve: {body}"
    );
    assert_eq!(body["services"]["order-svc"], "serving", "{body}");

    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS true"
    ))
    .execute(&mut server)
    .await
    .expect("allow connections");
    let body = readiness_until(
        &platform,
        Duration::from_secs(20),
        "ready again",
        |status, _| status == reqwest::StatusCode::OK,
    )
    .await;
    assert_eq!(body["status"], "ready", "{body}");
}
