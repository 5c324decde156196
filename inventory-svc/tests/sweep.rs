//! The running App's expiry sweep.

mod common;

use std::time::Duration;

use common::*;
use proto::inventory::v1 as pb;
use test_support::eventually;
use uuid::Uuid;

#[tokio::test]
async fn the_sweep_releases_expired_reservations_only() {
    let app = running_app(&["--reservation-sweep-interval-ms", "50"]).await;
    let (expired, live) = (Uuid::new_v4(), Uuid::new_v4());
    handle(
        &app.pool,
        &app.handler,
        &reserve(expired, &[("SKU-MONITOR", 3)]),
    )
    .await
    .unwrap();
    handle(
        &app.pool,
        &app.handler,
        &reserve(live, &[("SKU-MONITOR", 2)]),
    )
    .await
    .unwrap();
    assert_eq!(stock(&app.pool, "SKU-MONITOR").await, (995, 5, 0));

    expire(&app.pool, expired).await;
    eventually(
        Duration::from_secs(10),
        "the sweep to release the expired reservation",
        || async {
            let status = reservation_status(&app.pool, expired).await?;
            (status.0 == "RELEASED").then_some(())
        },
    )
    .await;

    assert_eq!(
        reservation_status(&app.pool, expired).await,
        Some(("RELEASED".to_owned(), Some("expired".to_owned())))
    );
    assert_eq!(
        reservation_status(&app.pool, live).await.unwrap().0,
        "RESERVED"
    );
    assert_eq!(stock(&app.pool, "SKU-MONITOR").await, (998, 2, 0));

    // The saga's commit that comes later finds it released, and holds nothing.
    let mut tx = app.pool.begin().await.unwrap();
    messaging::Handler::handle(&app.handler, &mut tx, &commit(expired))
        .await
        .unwrap();
    let reply: (String, Vec<u8>) = sqlx::query_as(
        "SELECT message_type, payload FROM outbox WHERE message_key = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(expired.to_string())
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(reply.0, "inventory.v1.InventoryCommitFailed");
    let failed: pb::InventoryCommitFailed = prost::Message::decode(reply.1.as_slice()).unwrap();
    assert_eq!(failed.reason, "reservation expired");
    app.stop().await;
}

#[tokio::test]
async fn sweeps_of_several_replicas_release_each_reservation_once() {
    let app = built_app(&[]).await;
    let pool = app.pool();
    let handler = app.handler();
    let orders: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    for order in &orders {
        handle(pool, &handler, &reserve(*order, &[("SKU-KEYBOARD", 1)]))
            .await
            .unwrap();
        expire(pool, *order).await;
    }
    assert_eq!(stock(pool, "SKU-KEYBOARD").await, (970, 30, 0));

    let cancel = tokio_util::sync::CancellationToken::new();
    let sweeps: Vec<_> = (0..4)
        .map(|_| {
            let (pool, cancel) = (pool.clone(), cancel.clone());
            tokio::spawn(async move { inventory_svc::sweep::sweep(&pool, &cancel).await })
        })
        .collect();
    let mut total = 0;
    for sweep in futures::future::join_all(sweeps).await {
        total += sweep.unwrap().unwrap();
    }

    assert_eq!(total, 30, "each reservation released by exactly one sweep");
    assert_eq!(stock(pool, "SKU-KEYBOARD").await, (1000, 0, 0));
}
