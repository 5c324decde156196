//! ListCustomerOrders pages through one customer's orders, newest first, and GetOrder with a
//! customer answers another customer's order as if it did not exist.

mod common;

use common::{order_request, TestApp};
use proto::order::v1 as pb;
use tonic::Code;

async fn page(
    app: &TestApp,
    customer: &str,
    size: u32,
    token: &str,
) -> pb::ListCustomerOrdersResponse {
    app.client
        .clone()
        .list_customer_orders(pb::ListCustomerOrdersRequest {
            customer_id: customer.to_owned(),
            page_size: size,
            page_token: token.to_owned(),
        })
        .await
        .expect("ListCustomerOrders")
        .into_inner()
}

#[tokio::test]
async fn a_customer_pages_through_their_own_orders_newest_first() {
    let app = TestApp::start().await;
    let mut placed = Vec::new();
    for _ in 0..5 {
        let reply = app
            .create(order_request(
                "alice",
                &[("SKU-MOUSE", 1)],
                "pm_card_visa",
                "",
            ))
            .await
            .expect("placing an order");
        placed.push(reply.order.expect("order").order_id);
    }
    let bob = app
        .create(order_request(
            "bob",
            &[("SKU-MOUSE", 1)],
            "pm_card_visa",
            "",
        ))
        .await
        .expect("placing an order")
        .order
        .expect("order");

    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let reply = page(&app, "alice", 2, &token).await;
        assert!(reply.orders.len() <= 2);
        listed.extend(reply.orders.into_iter().map(|o| {
            assert_eq!(o.customer_id, "alice");
            assert_eq!(o.lines.len(), 1, "with its lines");
            o.order_id
        }));
        if reply.next_page_token.is_empty() {
            break;
        }
        token = reply.next_page_token;
    }
    placed.reverse();
    assert_eq!(listed, placed, "every order of alice's once, newest first");
    assert_eq!(page(&app, "nobody", 0, "").await.orders.len(), 0);

    let status = app
        .client
        .clone()
        .list_customer_orders(pb::ListCustomerOrdersRequest {
            customer_id: "alice".into(),
            page_size: 0,
            page_token: "not-a-token".into(),
        })
        .await
        .expect_err("a token this service did not give");
    assert_eq!(status.code(), Code::InvalidArgument);

    let get = |customer: &str| {
        let mut client = app.client.clone();
        let request = pb::GetOrderRequest {
            order_id: bob.order_id.clone(),
            customer_id: customer.to_owned(),
            wait_while_status: pb::OrderStatus::Pending.into(),
            wait_timeout_ms: 10_000,
        };
        async move { client.get_order(request).await }
    };
    let started = std::time::Instant::now();
    let theirs = get("alice").await.expect_err("another customer's order");
    assert_eq!(theirs.code(), Code::NotFound);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "answered without waiting"
    );
    assert_eq!(
        theirs.message(),
        format!("order {} not found", bob.order_id)
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = app.get(&unknown).await.expect_err("unknown order");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        status.message(),
        format!("order {unknown} not found"),
        "the same answer as for an order that does not exist"
    );
    let own = app
        .client
        .clone()
        .get_order(pb::GetOrderRequest {
            order_id: bob.order_id.clone(),
            customer_id: "bob".into(),
            ..Default::default()
        })
        .await
        .expect("the customer's own order");
    assert_eq!(own.into_inner().order_id, bob.order_id);
    app.stop().await;
}
