//! ListOrders streams every order with its lines, in order id order, page after page, so that
//! an audit can go through any number of orders.

mod common;

use common::TestApp;
use proto::order::v1 as pb;
use tonic::Code;
use uuid::Uuid;

async fn list(app: &TestApp, statuses: &[pb::OrderStatus]) -> Vec<pb::Order> {
    let mut stream = app
        .client
        .clone()
        .list_orders(pb::ListOrdersRequest {
            statuses: statuses.iter().map(|s| (*s).into()).collect(),
        })
        .await
        .expect("ListOrders")
        .into_inner();
    let mut orders = Vec::new();
    while let Some(order) = stream.message().await.expect("next order") {
        orders.push(order);
    }
    orders
}

#[tokio::test]
async fn list_orders_streams_every_order_with_its_lines_in_order_id_order() {
    let app = TestApp::start().await;
    let placed = app.place_order().await;
    // More than two pages of orders, straight in the database; every third has two lines.
    for sql in [
        "INSERT INTO orders (order_id, customer_id, status, total_cents, currency, payment_method, \
             request_fingerprint, correlation_id) \
         SELECT md5('o' || i)::uuid, 'seeded', CASE WHEN i % 2 = 0 THEN 'COMPLETED' ELSE 'FAILED' END, \
             100 * i, 'USD', 'pm_card_visa', '', '' FROM generate_series(1, 2345) AS i",
        "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents) \
         SELECT md5('o' || i)::uuid, 'SKU-MOUSE', 1 + i % 7, 2900 FROM generate_series(1, 2345) AS i",
        "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents) \
         SELECT md5('o' || i)::uuid, 'SKU-WEBCAM', 1, 4900 FROM generate_series(3, 2345, 3) AS i",
    ] {
        sqlx::query(sql).execute(&app.pool).await.expect("seed");
    }

    let orders = list(&app, &[]).await;
    assert_eq!(orders.len(), 2346);
    let ids: Vec<Uuid> = orders
        .iter()
        .map(|o| Uuid::parse_str(&o.order_id).expect("uuid"))
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in order id order, each once"
    );
    let mine = orders
        .iter()
        .find(|o| o.order_id == placed.order_id)
        .expect("the placed order is listed");
    assert_eq!(mine, &placed, "listed as GetOrder shows it");
    let two_lines = orders.iter().filter(|o| o.lines.len() == 2).count();
    assert_eq!(two_lines, 2345 / 3);
    assert!(orders
        .iter()
        .filter(|o| o.customer_id == "seeded")
        .all(|o| o.lines[0].sku == "SKU-MOUSE" && o.lines[0].quantity >= 1));

    let completed = list(&app, &[pb::OrderStatus::Completed]).await;
    assert_eq!(completed.len(), 2345 / 2);
    assert!(completed
        .iter()
        .all(|o| o.status() == pb::OrderStatus::Completed));
    let some = list(&app, &[pb::OrderStatus::Pending, pb::OrderStatus::Failed]).await;
    assert_eq!(some.len(), 1 + 2345 - 2345 / 2);

    let status = app
        .client
        .clone()
        .list_orders(pb::ListOrdersRequest { statuses: vec![0] })
        .await
        .expect_err("unspecified status");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("statuses"));
    app.stop().await;
}
