//! `order.v1.OrderService` over the real gRPC socket, on a real database and broker.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{order_request, TestApp};
use futures::future::join_all;
use prost::{Message as _, Name as _};
use proto::order::v1 as pb;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use tonic::Code;

#[tokio::test]
async fn create_prices_from_the_catalog_and_records_one_order_created() {
    let app = TestApp::start().await;
    // The catalog decides the price: change it and the next order follows.
    sqlx::query("UPDATE products SET unit_price_cents = 3100 WHERE sku = 'SKU-MOUSE'")
        .execute(&app.pool)
        .await
        .unwrap();

    let mut request = tonic::Request::new(order_request(
        "cust-42",
        &[("SKU-MOUSE", 1), ("SKU-KEYBOARD", 2), ("SKU-MOUSE", 2)],
        "pm_card_visa",
        "",
    ));
    request
        .metadata_mut()
        .insert("x-correlation-id", "corr-create-1".parse().unwrap());
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let response = app.client.clone().create_order(request).await.unwrap();
    assert_eq!(
        response
            .metadata()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some("corr-create-1")
    );
    let reply = response.into_inner();
    assert!(!reply.replayed);
    let order = reply.order.unwrap();

    let expected_lines = vec![
        pb::PricedLine {
            sku: "SKU-KEYBOARD".into(),
            quantity: 2,
            unit_price_cents: 8900,
            line_total_cents: 17800,
        },
        pb::PricedLine {
            sku: "SKU-MOUSE".into(),
            quantity: 3,
            unit_price_cents: 3100,
            line_total_cents: 9300,
        },
    ];
    let order_id = uuid::Uuid::parse_str(&order.order_id).unwrap();
    assert_eq!(order_id.get_version_num(), 7);
    assert_eq!(order.customer_id, "cust-42");
    assert_eq!(order.status(), pb::OrderStatus::Pending);
    assert_eq!(order.lines, expected_lines);
    assert_eq!(order.total_cents, 27100);
    assert_eq!(order.currency, "USD");
    assert_eq!(order.payment_method, "pm_card_visa");
    assert_eq!(order.payment_id, "");
    assert_eq!(order.correlation_id, "corr-create-1");
    assert!(order.created_at_ms > 0);

    // Stored as it was answered.
    assert_eq!(app.get(&order.order_id).await.unwrap(), order);
    let (status, total, correlation): (String, i64, String) = sqlx::query_as(
        "SELECT status, total_cents, correlation_id FROM orders WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), total, correlation.as_str()),
        ("PENDING", 27100, "corr-create-1")
    );
    assert_eq!(app.count("order_lines").await, 2);

    // Exactly one OrderCreated, keyed by the order id, with the request's context.
    let writes = app.outbox_writes().await;
    assert_eq!(writes.len(), 1, "{writes:?}");
    let write = &writes[0];
    assert_eq!(write.topic, app.topic(proto::topics::ORDER_EVENTS));
    assert_eq!(write.key, order.order_id);
    assert_eq!(write.message_type, pb::OrderCreated::full_name());
    assert_eq!(write.envelope.saga_id, order.order_id);
    assert_eq!(write.envelope.correlation_id, "corr-create-1");
    assert_eq!(write.envelope.traceparent, traceparent);
    assert_eq!(write.envelope.source, "order-svc");
    assert!(!write.envelope.causation_id.is_empty());
    assert_eq!(
        pb::OrderCreated::decode(write.payload.as_slice()).unwrap(),
        pb::OrderCreated {
            order_id: order.order_id.clone(),
            customer_id: "cust-42".into(),
            lines: expected_lines,
            total_cents: 27100,
            currency: "USD".into(),
            payment_method: "pm_card_visa".into(),
        }
    );
    app.stop().await;
}

/// Placing an order is one statement: priced from the service's copy of the catalog, checked
/// against the catalog by the statement that stores the order, its lines and its event. A price
/// changed meanwhile is the price of the next order.
#[tokio::test]
async fn placing_an_order_is_one_statement_and_a_changed_price_is_the_next_orders_price() {
    let app = TestApp::start().await;
    let price_of_one_mouse = |order: &pb::Order| order.lines[0].unit_price_cents;
    let first = app.place_order().await;
    assert_eq!(price_of_one_mouse(&first), 2900);

    let (placed, statements) = test_support::statements_of(&app.pool, app.place_order()).await;
    assert_eq!(price_of_one_mouse(&placed), 2900);
    // The running service's relay reads the outbox meanwhile: only the statements on orders
    // and the catalog are the placing's.
    let placing: Vec<&(String, i64)> = statements
        .iter()
        .filter(|(q, _)| q.contains("orders") || q.contains("products"))
        .collect();
    assert_eq!(placing.len(), 1, "{placing:#?}");
    assert!(placing[0].0.starts_with("WITH priced AS"), "{placing:#?}");
    assert_eq!(placing[0].1, 1, "{placing:#?}");

    sqlx::query("UPDATE products SET unit_price_cents = 3100 WHERE sku = 'SKU-MOUSE'")
        .execute(&app.pool)
        .await
        .unwrap();
    let repriced = app.place_order().await;
    assert_eq!(price_of_one_mouse(&repriced), 3100);
    assert_eq!(repriced.total_cents, 3100);
    let stored: i64 =
        sqlx::query_scalar("SELECT unit_price_cents FROM order_lines WHERE order_id = $1::uuid")
            .bind(&repriced.order_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, 3100);
    app.stop().await;
}

#[tokio::test]
async fn a_correlation_id_is_made_when_the_request_has_none() {
    let app = TestApp::start().await;
    let order = app.place_order().await;
    assert!(
        uuid::Uuid::parse_str(&order.correlation_id).is_ok(),
        "{:?}",
        order.correlation_id
    );
    let writes = app.outbox_writes().await;
    assert_eq!(writes[0].envelope.correlation_id, order.correlation_id);
    app.stop().await;
}

#[tokio::test]
async fn order_created_is_published_to_the_broker() {
    let app = TestApp::start().await;
    let order = app.place_order().await;

    let reader: StreamConsumer = app.config.kafka.consumer("test-reader").unwrap();
    reader
        .subscribe(&[&app.topic(proto::topics::ORDER_EVENTS)])
        .unwrap();
    // A consumer may report the topic unknown until the broker's metadata reaches it: such
    // errors pass, and the message comes after.
    let message = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match reader.recv().await {
                Ok(message) => break message,
                Err(e) => eprintln!("reading {}: {e}", proto::topics::ORDER_EVENTS),
            }
        }
    })
    .await
    .expect("OrderCreated is published within 60 s");
    assert_eq!(message.key(), Some(order.order_id.as_bytes()));
    let envelope = messaging::envelope::from_headers(message.headers().expect("headers"));
    assert_eq!(envelope.message_type, "order.v1.OrderCreated");
    assert_eq!(envelope.saga_id, order.order_id);
    let event = pb::OrderCreated::decode(message.payload().unwrap()).unwrap();
    assert_eq!(event.order_id, order.order_id);
    assert_eq!(event.total_cents, 2900);

    // Published rows leave the outbox.
    test_support::eventually(Duration::from_secs(10), "the outbox to empty", || async {
        (app.count("outbox").await == 0).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_returns_the_same_order() {
    let app = TestApp::start().await;
    let first = app
        .create(order_request(
            "cust-1",
            &[("SKU-MONITOR", 1), ("SKU-WEBCAM", 2)],
            "pm_card_visa",
            "key-1",
        ))
        .await
        .unwrap();
    assert!(!first.replayed);
    // The same request, its items listed differently.
    let again = app
        .create(order_request(
            "cust-1",
            &[("SKU-WEBCAM", 1), ("SKU-MONITOR", 1), ("SKU-WEBCAM", 1)],
            "pm_card_visa",
            "key-1",
        ))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.order, first.order);
    assert_eq!(app.count("orders").await, 1);
    assert_eq!(app.outbox_writes().await.len(), 1);
    // A replay does not ask payment-svc again.
    assert_eq!(
        app.payments.calls.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // A different key is a different order.
    let other = app
        .create(order_request(
            "cust-1",
            &[("SKU-MONITOR", 1), ("SKU-WEBCAM", 2)],
            "pm_card_visa",
            "key-2",
        ))
        .await
        .unwrap();
    assert!(!other.replayed);
    assert_ne!(other.order.unwrap().order_id, first.order.unwrap().order_id);
    assert_eq!(app.count("orders").await, 2);
    app.stop().await;
}

/// Two orders of two customers, both paying with `pm_card_visa`.
async fn place_two_paid_by_visa(app: &TestApp) {
    for customer in ["cust-1", "cust-2"] {
        let request = order_request(customer, &[("SKU-MOUSE", 1)], "pm_card_visa", "");
        app.create(request).await.unwrap();
    }
}

#[tokio::test]
async fn a_payment_method_accepted_lately_is_not_asked_about_again_a_refused_one_is() {
    let calls = |app: &TestApp| app.payments.calls.load(std::sync::atomic::Ordering::SeqCst);
    let app = TestApp::start().await;
    place_two_paid_by_visa(&app).await;
    assert_eq!(calls(&app), 1, "the second order's method was remembered");
    for _ in 0..2 {
        let refused = app
            .create(order_request("cust-1", &[("SKU-MOUSE", 1)], "pm_bogus", ""))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    }
    assert_eq!(calls(&app), 3, "a refusal is asked about every time");
    assert_eq!(app.count("orders").await, 2);
    app.stop().await;

    // PAYMENT_METHOD_CACHE_SECS=0: every order asks.
    let app = TestApp::start_with_args(true, &["--payment-method-cache-secs", "0"]).await;
    place_two_paid_by_visa(&app).await;
    assert_eq!(calls(&app), 2);
    app.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_for_a_different_request_is_refused() {
    let app = TestApp::start().await;
    app.create(order_request(
        "cust-1",
        &[("SKU-MOUSE", 1)],
        "pm_card_visa",
        "key-1",
    ))
    .await
    .unwrap();
    for different in [
        order_request("cust-1", &[("SKU-MOUSE", 2)], "pm_card_visa", "key-1"),
        order_request("cust-2", &[("SKU-MOUSE", 1)], "pm_card_visa", "key-1"),
        order_request(
            "cust-1",
            &[("SKU-MOUSE", 1)],
            "pm_card_chargeDeclined",
            "key-1",
        ),
        order_request(
            "cust-1",
            &[("SKU-MOUSE", 1), ("SKU-WEBCAM", 1)],
            "pm_card_visa",
            "key-1",
        ),
    ] {
        let status = app.create(different).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert!(status.message().contains("Idempotency-Key"), "{status:?}");
        assert!(status.message().contains("different request"), "{status:?}");
    }
    assert_eq!(app.count("orders").await, 1);
    assert_eq!(app.outbox_writes().await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_creates_with_one_key_make_one_order() {
    let app = TestApp::start().await;
    let replies = join_all((0..8).map(|_| {
        app.create(order_request(
            "cust-1",
            &[("SKU-HEADSET", 2)],
            "pm_card_visa",
            "key-concurrent",
        ))
    }))
    .await;
    let replies: Vec<_> = replies.into_iter().map(|r| r.unwrap()).collect();
    let ids: HashSet<_> = replies
        .iter()
        .map(|r| r.order.as_ref().unwrap().order_id.clone())
        .collect();
    assert_eq!(ids.len(), 1, "every request gets the same order: {ids:?}");
    assert_eq!(replies.iter().filter(|r| !r.replayed).count(), 1);
    assert_eq!(app.count("orders").await, 1);
    assert_eq!(app.count("order_lines").await, 1);
    assert_eq!(app.outbox_writes().await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_and_store_nothing() {
    let app = TestApp::start().await;
    let too_many: Vec<(&str, u32)> = vec![("SKU-MOUSE", 1); 51];
    let cases = [
        (
            order_request("", &[("SKU-MOUSE", 1)], "pm_card_visa", ""),
            "customer_id",
        ),
        (
            order_request(&"c".repeat(129), &[("SKU-MOUSE", 1)], "pm_card_visa", ""),
            "customer_id",
        ),
        (order_request("cust-1", &[], "pm_card_visa", ""), "items"),
        (
            order_request("cust-1", &too_many, "pm_card_visa", ""),
            "items",
        ),
        (
            order_request("cust-1", &[("SKU-MOUSE", 0)], "pm_card_visa", ""),
            "items[0].quantity",
        ),
        (
            order_request(
                "cust-1",
                &[("SKU-MOUSE", 1), ("SKU-WEBCAM", 1001)],
                "pm_card_visa",
                "",
            ),
            "items[1].quantity",
        ),
        (
            order_request(
                "cust-1",
                &[("SKU-MOUSE", 1), ("SKU-NOPE", 1)],
                "pm_card_visa",
                "",
            ),
            "unknown SKU: SKU-NOPE",
        ),
        (
            order_request("cust-1", &[("SKU-MOUSE", 1)], "", ""),
            "payment_method",
        ),
        // payment-svc's refusal is passed through.
        (
            order_request("cust-1", &[("SKU-MOUSE", 1)], "pm_card_bogus", ""),
            "unknown payment method \"pm_card_bogus\"",
        ),
        (
            order_request(
                "cust-1",
                &[("SKU-MOUSE", 1)],
                "pm_card_visa",
                &"k".repeat(256),
            ),
            "idempotency_key",
        ),
    ];
    for (request, field) in cases {
        let status = app.create(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    assert_eq!(app.count("orders").await, 0);
    assert_eq!(app.count("order_lines").await, 0);
    assert!(app.outbox_writes().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn payment_svc_unreachable_is_unavailable_and_stores_nothing() {
    let app = TestApp::start_with(false).await;
    let status = app
        .create(order_request(
            "cust-1",
            &[("SKU-MOUSE", 1)],
            "pm_card_visa",
            "key-1",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("payment-svc"), "{status:?}");
    assert_eq!(app.count("orders").await, 0);
    assert!(app.outbox_writes().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn get_order_refuses_unknown_and_invalid_ids() {
    let app = TestApp::start().await;
    let status = app
        .get(&uuid::Uuid::now_v7().to_string())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = app.get("not-a-uuid").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("order_id"), "{status:?}");
    app.stop().await;
}

#[tokio::test]
async fn list_products_returns_the_catalog_by_sku() {
    let app = TestApp::start().await;
    let products = app
        .client
        .clone()
        .list_products(pb::ListProductsRequest {})
        .await
        .unwrap()
        .into_inner()
        .products;
    let summary: Vec<_> = products
        .iter()
        .map(|p| {
            (
                p.sku.as_str(),
                p.name.as_str(),
                p.unit_price_cents,
                p.currency.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("SKU-HEADSET", "USB headset", 5900, "USD"),
            ("SKU-KEYBOARD", "Mechanical keyboard", 8900, "USD"),
            ("SKU-MONITOR", "27-inch monitor", 32900, "USD"),
            ("SKU-MOUSE", "Wireless mouse", 2900, "USD"),
            ("SKU-WEBCAM", "HD webcam", 4900, "USD"),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_create_racing_a_twin_with_the_same_key_returns_the_twins_order() {
    use order_svc::domain::{Order, OrderId, OrderLine, OrderRequest, OrderStatus};
    use order_svc::store::{self, NewOrder};

    let app = TestApp::start().await;
    // The twin: the same request, whose transaction has inserted its order but not committed.
    let request = OrderRequest::new(
        "cust-1".into(),
        vec![("SKU-MOUSE".into(), 1)],
        "pm_card_visa".into(),
        "key-race".into(),
    )
    .unwrap();
    let now = chrono::Utc::now();
    let twin = Order {
        id: OrderId::generate(),
        customer_id: "cust-1".into(),
        status: OrderStatus::Pending,
        lines: vec![OrderLine {
            sku: "SKU-MOUSE".into(),
            quantity: 1,
            unit_price_cents: 2900,
        }],
        total_cents: 2900,
        currency: "USD".into(),
        payment_method: "pm_card_visa".into(),
        payment_id: None,
        failure_reason: None,
        correlation_id: "corr-twin".into(),
        created_at: now,
        updated_at: now,
    };
    let mut tx = app.pool.begin().await.unwrap();
    let fingerprint = request.fingerprint();
    let new = NewOrder {
        order: &twin,
        idempotency_key: Some("key-race"),
        request_fingerprint: &fingerprint,
    };
    let no_events = messaging::OutboxRows::new(&[]).unwrap();
    assert_eq!(
        store::insert_order(&mut tx, &new, &no_events)
            .await
            .unwrap(),
        store::Inserted::Inserted
    );

    let mut client = app.client.clone();
    let create = tokio::spawn(async move {
        client
            .create_order(order_request(
                "cust-1",
                &[("SKU-MOUSE", 1)],
                "pm_card_visa",
                "key-race",
            ))
            .await
    });
    // The request's insert waits on the twin's key ...
    test_support::eventually(
        Duration::from_secs(10),
        "the insert to wait on the twin",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            (waiting == 1).then_some(())
        },
    )
    .await;
    // ... and once the twin commits, answers with the twin's order.
    tx.commit().await.unwrap();
    let reply = create.await.unwrap().unwrap().into_inner();
    assert!(reply.replayed);
    let order = reply.order.unwrap();
    assert_eq!(order.order_id, twin.id.to_string());
    assert_eq!(order.correlation_id, "corr-twin");
    assert_eq!(app.count("orders").await, 1);
    assert!(
        app.outbox_writes().await.is_empty(),
        "the losing request enqueues nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn hostile_strings_are_refused_as_invalid_and_store_nothing() {
    let app = TestApp::start().await;
    let long_sku = "S".repeat(10_000);
    let cases = [
        // What PostgreSQL refuses to store: a NUL byte, in every string field.
        (
            order_request("cust-1", &[("SKU\u{0}X", 1)], "pm_card_visa", ""),
            "items[0].sku",
        ),
        (
            order_request("c\u{0}", &[("SKU-MOUSE", 1)], "pm_card_visa", ""),
            "customer_id",
        ),
        (
            order_request("cust-1", &[("SKU-MOUSE", 1)], "pm_card_visa\u{0}", ""),
            "payment_method",
        ),
        (
            order_request("cust-1", &[("SKU-MOUSE", 1)], "pm_card_visa", "key\u{0}"),
            "idempotency_key",
        ),
        // Other control characters, and lengths no field may have.
        (
            order_request(
                "cust-1",
                &[("SKU-MOUSE", 1), ("SKU\nX", 1)],
                "pm_card_visa",
                "",
            ),
            "items[1].sku",
        ),
        (
            order_request("cust-1", &[(&long_sku, 1)], "pm_card_visa", ""),
            "items[0].sku",
        ),
    ];
    for (request, field) in cases {
        let status = app.create(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
        assert!(status.message().len() < 300, "{field}: {status:?}");
    }
    assert_eq!(app.count("orders").await, 0);
    assert!(app.outbox_writes().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_database_error_that_retrying_cannot_cure_is_internal_not_unavailable() {
    let app = TestApp::start().await;
    // A schema out of step with the code fails the same way every time.
    sqlx::query("ALTER TABLE products RENAME TO products_elsewhere")
        .execute(&app.pool)
        .await
        .unwrap();
    let status = app
        .create(order_request(
            "cust-1",
            &[("SKU-MOUSE", 1)],
            "pm_card_visa",
            "",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    // The details are in the service's log, not in the answer.
    assert!(!status.message().contains("products"), "{status:?}");
    app.stop().await;
}
