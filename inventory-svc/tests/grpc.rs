//! The gRPC API over a real socket, served by the running App.

mod common;

use std::time::Duration;

use common::*;
use proto::inventory::v1 as pb;
use tonic::Code;
use uuid::Uuid;

const SEEDED: [&str; 5] = [
    "SKU-HEADSET",
    "SKU-KEYBOARD",
    "SKU-MONITOR",
    "SKU-MOUSE",
    "SKU-WEBCAM",
];

#[tokio::test]
async fn get_stock_lists_every_sku_or_the_ones_asked() {
    let app = running_app(&[]).await;
    let mut client = app.client().await;

    let all = client
        .get_stock(pb::GetStockRequest::default())
        .await
        .unwrap()
        .into_inner();
    let skus: Vec<&str> = all.levels.iter().map(|l| l.sku.as_str()).collect();
    assert_eq!(skus, SEEDED);
    assert!(all
        .levels
        .iter()
        .all(|l| l.available == 1000 && l.reserved == 0 && l.committed == 0));

    let some = client
        .get_stock(pb::GetStockRequest {
            skus: vec![
                "SKU-MOUSE".into(),
                "SKU-KEYBOARD".into(),
                "SKU-MOUSE".into(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let skus: Vec<&str> = some.levels.iter().map(|l| l.sku.as_str()).collect();
    assert_eq!(skus, ["SKU-KEYBOARD", "SKU-MOUSE"]);

    let unknown = client
        .get_stock(pb::GetStockRequest {
            skus: vec!["SKU-MOUSE".into(), "SKU-NOPE".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("SKU-NOPE"),
        "{}",
        unknown.message()
    );
    app.stop().await;
}

#[tokio::test]
async fn set_stock_updates_or_adds_a_sku_and_audits_it() {
    let app = running_app(&[]).await;
    let mut client = app.client().await;
    let order = Uuid::new_v4();
    handle(
        &app.pool,
        &app.handler,
        &reserve(order, &[("SKU-MOUSE", 4)]),
    )
    .await
    .unwrap();

    // Reserved units stay held whatever the operator sets as available.
    let mouse = client
        .set_stock(pb::SetStockRequest {
            sku: "SKU-MOUSE".into(),
            available: 25,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        mouse,
        pb::StockLevel {
            sku: "SKU-MOUSE".into(),
            available: 25,
            reserved: 4,
            committed: 0,
            written_off: 0,
            // 1000 received, 996 of them available when 25 were set: 29 = 25 + 4.
            received: 29,
        }
    );

    let added = client
        .set_stock(pb::SetStockRequest {
            sku: "SKU-SPEAKER_2".into(),
            available: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (added.available, added.reserved, added.committed),
        (0, 0, 0)
    );
    let listed = client
        .get_stock(pb::GetStockRequest {
            skus: vec!["SKU-SPEAKER_2".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.levels, vec![added]);

    let audit: Vec<(String, Option<i64>, i64)> = sqlx::query_as(
        "SELECT sku, available_before, available_after FROM stock_adjustments ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
        vec![
            ("SKU-MOUSE".to_owned(), Some(996), 25),
            ("SKU-SPEAKER_2".to_owned(), None, 0),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn set_stock_refuses_invalid_input() {
    let app = running_app(&[]).await;
    let mut client = app.client().await;

    let long = "S".repeat(65);
    for (sku, available, field) in [
        ("", 1, "sku"),
        ("SKU MOUSE", 1, "sku"),
        ("SKU-É", 1, "sku"),
        (long.as_str(), 1, "sku"),
        ("SKU-MOUSE", -1, "available"),
        ("SKU-MOUSE", 1_000_000_001, "available"),
    ] {
        let status = client
            .set_stock(pb::SetStockRequest {
                sku: sku.into(),
                available,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{sku:?} {available}");
        assert!(status.message().contains(field), "{}", status.message());
    }
    // The largest quantity allowed is accepted.
    let max = client
        .set_stock(pb::SetStockRequest {
            sku: "SKU-MOUSE".into(),
            available: 1_000_000_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(max.available, 1_000_000_000);
    let adjustments: i64 = sqlx::query_scalar("SELECT count(*) FROM stock_adjustments")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(adjustments, 1, "only the valid request changed anything");
    app.stop().await;
}

#[tokio::test]
async fn get_reservation_shows_lines_status_and_deadline() {
    let app = running_app(&["--reservation-ttl-secs", "120"]).await;
    let mut client = app.client().await;

    let invalid = client
        .get_reservation(pb::GetReservationRequest {
            order_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().contains("order_id"),
        "{}",
        invalid.message()
    );

    let order = Uuid::new_v4();
    let missing = client
        .get_reservation(pb::GetReservationRequest {
            order_id: order.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    handle(
        &app.pool,
        &app.handler,
        &reserve(order, &[("SKU-MOUSE", 2), ("SKU-HEADSET", 1)]),
    )
    .await
    .unwrap();
    let reservation = client
        .get_reservation(pb::GetReservationRequest {
            order_id: order.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reservation.order_id, order.to_string());
    assert!(Uuid::parse_str(&reservation.reservation_id).is_ok());
    assert_eq!(reservation.status(), pb::ReservationStatus::Reserved);
    assert_eq!(
        reservation.lines,
        vec![
            pb::ReservationLine {
                sku: "SKU-HEADSET".into(),
                quantity: 1
            },
            pb::ReservationLine {
                sku: "SKU-MOUSE".into(),
                quantity: 2
            },
        ]
    );
    let in_two_minutes = chrono::Utc::now().timestamp_millis() + 120_000;
    assert!((reservation.expires_at_ms - in_two_minutes).abs() < 10_000);

    handle(&app.pool, &app.handler, &release(order, "payment failed"))
        .await
        .unwrap();
    let released = client
        .get_reservation(pb::GetReservationRequest {
            order_id: order.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.status(), pb::ReservationStatus::Released);
    assert_eq!(released.reservation_id, reservation.reservation_id);
    app.stop().await;
}

#[tokio::test]
async fn health_check_reports_the_service_serving() {
    let app = running_app(&[]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "inventory.v1.InventoryService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    app.stop().await;
}

#[tokio::test]
async fn write_off_takes_available_units_first_then_the_newest_reservations() {
    let app = running_app(&[]).await;
    let mut client = app.client().await;
    set_available(&app.pool, "SKU-WEBCAM", 5).await;
    let older = Uuid::new_v4();
    let newer = Uuid::new_v4();
    handle(
        &app.pool,
        &app.handler,
        &reserve(older, &[("SKU-WEBCAM", 2)]),
    )
    .await
    .unwrap();
    handle(
        &app.pool,
        &app.handler,
        &reserve(newer, &[("SKU-WEBCAM", 2), ("SKU-MOUSE", 1)]),
    )
    .await
    .unwrap();
    // 1 available, 4 reserved: writing off 2 takes the available unit and releases the newer
    // reservation, whose other line goes back to available too.
    let response = client
        .write_off_stock(pb::WriteOffStockRequest {
            sku: "SKU-WEBCAM".into(),
            quantity: 2,
            reason: "water damage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.released_order_ids, [newer.to_string()]);
    let level = response.level.unwrap();
    assert_eq!(
        (
            level.available,
            level.reserved,
            level.committed,
            level.written_off
        ),
        (1, 2, 0, 2),
        "5 = 1 available + 2 reserved + 2 written off"
    );
    assert_eq!(stock(&app.pool, "SKU-MOUSE").await, (1000, 0, 0));
    assert_eq!(
        reservation_status(&app.pool, newer).await,
        Some((
            "RELEASED".into(),
            Some("stock written off: water damage".into())
        ))
    );
    assert_eq!(
        reservation_status(&app.pool, older).await.map(|s| s.0),
        Some("RESERVED".into())
    );

    for (quantity, reason, code) in [
        (0, "x", Code::InvalidArgument),
        (4, "x", Code::InvalidArgument), // only 1 available + 2 reserved remain
        (1, " ", Code::InvalidArgument),
    ] {
        let status = client
            .write_off_stock(pb::WriteOffStockRequest {
                sku: "SKU-WEBCAM".into(),
                quantity,
                reason: reason.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            code,
            "{quantity} {reason:?}: {}",
            status.message()
        );
    }
    let unknown = client
        .write_off_stock(pb::WriteOffStockRequest {
            sku: "SKU-NOPE".into(),
            quantity: 1,
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test]
async fn hostile_strings_are_refused_as_invalid_and_change_nothing() {
    let app = running_app(&[]).await;
    let mut client = app.client().await;

    for skus in [vec!["SKU\u{0}X".to_owned()], vec!["S".repeat(10_000)]] {
        let status = client
            .get_stock(pb::GetStockRequest { skus })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("skus: [0]"), "{status:?}");
        assert!(status.message().len() < 300, "{status:?}");
    }
    for reason in ["damaged\u{0}".to_owned(), "r".repeat(10_000)] {
        let status = client
            .write_off_stock(pb::WriteOffStockRequest {
                sku: "SKU-MOUSE".into(),
                quantity: 1,
                reason,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("reason"), "{status:?}");
    }
    assert_eq!(stock(&app.pool, "SKU-MOUSE").await, (1000, 0, 0));
    app.stop().await;
}

#[tokio::test]
async fn a_database_error_that_retrying_cannot_cure_is_internal_not_unavailable() {
    let app = running_app(&[]).await;
    let mut client = app.client().await;
    // A schema out of step with the code fails the same way every time.
    sqlx::query("ALTER TABLE stock RENAME TO stock_elsewhere")
        .execute(&app.pool)
        .await
        .unwrap();
    let status = client
        .get_stock(pb::GetStockRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    app.stop().await;
}
