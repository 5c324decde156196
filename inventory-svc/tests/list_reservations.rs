//! ListReservations streams every reservation with its lines in order id order, page after
//! page, so that an audit can go through any number of them.

mod common;

use common::{handle, release, reserve, running_app};
use proto::inventory::v1 as pb;
use uuid::Uuid;

#[tokio::test]
async fn list_reservations_streams_every_reservation_with_its_lines_in_order_id_order() {
    let app = running_app(&[]).await;
    let held = Uuid::now_v7();
    handle(
        &app.pool,
        &app.handler,
        &reserve(held, &[("SKU-MOUSE", 2), ("SKU-WEBCAM", 1)]),
    )
    .await
    .expect("reserve");
    // Released before it was reserved: a tombstone, with no lines.
    let tombstone = Uuid::now_v7();
    handle(&app.pool, &app.handler, &release(tombstone, "deadline"))
        .await
        .expect("release");
    // More than two pages of committed reservations, straight in the database.
    for sql in [
        "INSERT INTO reservations (reservation_id, order_id, status, expires_at) \
         SELECT md5('r' || i)::uuid, md5('o' || i)::uuid, 'COMMITTED', now() \
         FROM generate_series(1, 2345) AS i",
        "INSERT INTO reservation_lines (reservation_id, sku, quantity) \
         SELECT md5('r' || i)::uuid, 'SKU-KEYBOARD', 1 + i % 5 FROM generate_series(1, 2345) AS i",
    ] {
        sqlx::query(sql).execute(&app.pool).await.expect("seed");
    }

    let mut stream = app
        .client()
        .await
        .list_reservations(pb::ListReservationsRequest {})
        .await
        .expect("ListReservations")
        .into_inner();
    let mut reservations = Vec::new();
    while let Some(reservation) = stream.message().await.expect("next reservation") {
        reservations.push(reservation);
    }
    assert_eq!(reservations.len(), 2347);
    let order_ids: Vec<Uuid> = reservations
        .iter()
        .map(|r| Uuid::parse_str(&r.order_id).expect("uuid"))
        .collect();
    assert!(
        order_ids.windows(2).all(|w| w[0] < w[1]),
        "in order id order, each once"
    );
    let find = |id: Uuid| {
        reservations
            .iter()
            .find(|r| r.order_id == id.to_string())
            .expect("listed")
    };
    let mine = find(held);
    assert_eq!(mine.status(), pb::ReservationStatus::Reserved);
    let lines: Vec<(&str, u32)> = mine
        .lines
        .iter()
        .map(|l| (l.sku.as_str(), l.quantity))
        .collect();
    assert_eq!(lines, [("SKU-MOUSE", 2), ("SKU-WEBCAM", 1)]);
    let released = find(tombstone);
    assert_eq!(released.status(), pb::ReservationStatus::Released);
    assert!(released.lines.is_empty());
    assert!(reservations
        .iter()
        .filter(|r| r.status() == pb::ReservationStatus::Committed)
        .all(|r| r.lines.len() == 1 && r.lines[0].sku == "SKU-KEYBOARD"));
    app.stop().await;
}
