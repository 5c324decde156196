//! The handler of `inventory.commands` against the real database, each command in a committed
//! transaction, checking the stock and the replies recorded in the outbox.

mod common;

use std::sync::Arc;

use common::*;
use messaging::HandlerError;
use proto::inventory::v1 as pb;
use uuid::Uuid;

#[tokio::test]
async fn reserve_holds_every_line_and_replies_reserved() {
    let app = built_app(&["--reservation-ttl-secs", "600"]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();

    let before_ms = chrono::Utc::now().timestamp_millis();
    // Two lines of one SKU are merged into one.
    handle(
        pool,
        &handler,
        &reserve(
            order,
            &[("SKU-MOUSE", 2), ("SKU-KEYBOARD", 1), ("SKU-MOUSE", 3)],
        ),
    )
    .await
    .unwrap();

    assert_eq!(stock(pool, "SKU-MOUSE").await, (995, 5, 0));
    assert_eq!(stock(pool, "SKU-KEYBOARD").await, (999, 1, 0));
    let reply: pb::InventoryReserved = last_reply(pool, app.config(), order).await;
    assert_eq!(reply.order_id, order.to_string());
    let (id, status): (Uuid, String) =
        sqlx::query_as("SELECT reservation_id, status FROM reservations WHERE order_id = $1")
            .bind(order)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(reply.reservation_id, id.to_string());
    assert_eq!(status, "RESERVED");
    let ttl_ms = 600_000;
    assert!(
        (before_ms + ttl_ms - 5_000..=before_ms + ttl_ms + 5_000).contains(&reply.expires_at_ms),
        "expires about the TTL from now: {} vs {}",
        reply.expires_at_ms,
        before_ms + ttl_ms
    );
    let lines: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sku, quantity FROM reservation_lines WHERE reservation_id = $1 ORDER BY sku",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        lines,
        vec![("SKU-KEYBOARD".to_owned(), 1), ("SKU-MOUSE".to_owned(), 5)]
    );
}

#[tokio::test]
async fn reserve_holds_nothing_when_one_line_is_out_of_stock() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    set_available(pool, "SKU-MOUSE", 1).await;
    let order = Uuid::new_v4();

    // The first line (in SKU order) could be held, the second cannot.
    handle(
        pool,
        &handler,
        &reserve(order, &[("SKU-KEYBOARD", 2), ("SKU-MOUSE", 3)]),
    )
    .await
    .unwrap();

    assert_eq!(stock(pool, "SKU-KEYBOARD").await, (1000, 0, 0));
    assert_eq!(stock(pool, "SKU-MOUSE").await, (1, 0, 0));
    // Recorded as a refusal holding nothing.
    assert_eq!(
        reservation_status(pool, order).await,
        Some((
            "RELEASED".to_owned(),
            Some("out of stock: SKU-MOUSE (asked 3, available 1)".to_owned())
        ))
    );
    let reply: pb::InventoryReservationFailed = last_reply(pool, app.config(), order).await;
    assert_eq!(reply.order_id, order.to_string());
    assert_eq!(reply.failure(), pb::ReservationFailure::OutOfStock);
    assert_eq!(
        reply.reason,
        "out of stock: SKU-MOUSE (asked 3, available 1)"
    );
}

#[tokio::test]
async fn reserve_of_an_unknown_sku_fails_naming_it() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();

    handle(
        pool,
        &handler,
        &reserve(order, &[("SKU-MOUSE", 1), ("SKU-NOPE", 1)]),
    )
    .await
    .unwrap();

    assert_eq!(stock(pool, "SKU-MOUSE").await, (1000, 0, 0));
    let reply: pb::InventoryReservationFailed = last_reply(pool, app.config(), order).await;
    assert_eq!(reply.failure(), pb::ReservationFailure::UnknownSku);
    assert_eq!(reply.reason, "unknown SKU: SKU-NOPE");
}

#[tokio::test]
async fn reserving_twice_holds_once_and_replies_the_same_reservation() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();

    handle(pool, &handler, &reserve(order, &[("SKU-WEBCAM", 4)]))
        .await
        .unwrap();
    // A second command (new message id, so not caught by the inbox).
    handle(pool, &handler, &reserve(order, &[("SKU-WEBCAM", 4)]))
        .await
        .unwrap();

    assert_eq!(stock(pool, "SKU-WEBCAM").await, (996, 4, 0));
    let replies = replies(pool, app.config(), order).await;
    assert_eq!(replies.len(), 2);
    let decoded: Vec<pb::InventoryReserved> = replies
        .iter()
        .map(|(t, p)| {
            assert_eq!(t, "inventory.v1.InventoryReserved");
            prost::Message::decode(p.as_slice()).unwrap()
        })
        .collect();
    assert_eq!(decoded[0], decoded[1]);
}

#[tokio::test]
async fn commit_moves_reserved_stock_to_committed_once() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();
    handle(
        pool,
        &handler,
        &reserve(order, &[("SKU-MONITOR", 2), ("SKU-HEADSET", 1)]),
    )
    .await
    .unwrap();
    let reserved: pb::InventoryReserved = last_reply(pool, app.config(), order).await;

    handle(pool, &handler, &commit(order)).await.unwrap();
    assert_eq!(stock(pool, "SKU-MONITOR").await, (998, 0, 2));
    assert_eq!(stock(pool, "SKU-HEADSET").await, (999, 0, 1));
    let committed: pb::InventoryCommitted = last_reply(pool, app.config(), order).await;
    assert_eq!(committed.reservation_id, reserved.reservation_id);
    assert_eq!(
        reservation_status(pool, order).await,
        Some(("COMMITTED".to_owned(), None))
    );

    // Again: the same reply, no second move.
    handle(pool, &handler, &commit(order)).await.unwrap();
    assert_eq!(stock(pool, "SKU-MONITOR").await, (998, 0, 2));
    let again: pb::InventoryCommitted = last_reply(pool, app.config(), order).await;
    assert_eq!(again, committed);

    // Committed stock is sold: a release changes nothing.
    handle(pool, &handler, &release(order, "operator"))
        .await
        .unwrap();
    assert_eq!(stock(pool, "SKU-MONITOR").await, (998, 0, 2));
    let released: pb::InventoryReleased = last_reply(pool, app.config(), order).await;
    assert!(!released.released);
    assert_eq!(
        reservation_status(pool, order).await.unwrap().0,
        "COMMITTED"
    );
}

/// A commit and a release are each one statement (the reservation and its stock rows locked,
/// and what it holds sold or returned), besides the reply's outbox row and the transaction.
#[tokio::test]
async fn a_commit_and_a_release_are_one_statement_each() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let (sold, returned) = (Uuid::new_v4(), Uuid::new_v4());
    for order in [sold, returned] {
        handle(
            pool,
            &handler,
            &reserve(order, &[("SKU-MONITOR", 2), ("SKU-HEADSET", 1)]),
        )
        .await
        .unwrap();
    }
    let own = test_support::own_statements;
    let ((), statements) = test_support::statements_of(pool, async {
        handle(pool, &handler, &commit(sold)).await.unwrap()
    })
    .await;
    let commit_statements = own(statements);
    assert_eq!(
        commit_statements
            .iter()
            .map(|(_, calls)| calls)
            .sum::<i64>(),
        1,
        "a commit's statements: {commit_statements:#?}"
    );
    let ((), statements) = test_support::statements_of(pool, async {
        handle(pool, &handler, &release(returned, "payment declined"))
            .await
            .unwrap()
    })
    .await;
    let release_statements = own(statements);
    assert_eq!(
        release_statements
            .iter()
            .map(|(_, calls)| calls)
            .sum::<i64>(),
        1,
        "a release's statements: {release_statements:#?}"
    );
    // One pair sold, one returned: (available, reserved, committed).
    assert_eq!(stock(pool, "SKU-MONITOR").await, (998, 0, 2));
    assert_eq!(stock(pool, "SKU-HEADSET").await, (999, 0, 1));
    assert_eq!(
        reservation_status(pool, sold).await,
        Some(("COMMITTED".to_owned(), None))
    );
    assert_eq!(
        reservation_status(pool, returned).await,
        Some(("RELEASED".to_owned(), Some("payment declined".to_owned())))
    );
}

#[tokio::test]
async fn release_returns_the_stock_once() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();
    handle(pool, &handler, &reserve(order, &[("SKU-KEYBOARD", 7)]))
        .await
        .unwrap();
    assert_eq!(stock(pool, "SKU-KEYBOARD").await, (993, 7, 0));

    handle(pool, &handler, &release(order, "payment failed"))
        .await
        .unwrap();
    assert_eq!(stock(pool, "SKU-KEYBOARD").await, (1000, 0, 0));
    let released: pb::InventoryReleased = last_reply(pool, app.config(), order).await;
    assert_eq!(released.order_id, order.to_string());
    assert!(released.released);
    assert_eq!(
        reservation_status(pool, order).await,
        Some(("RELEASED".to_owned(), Some("payment failed".to_owned())))
    );

    handle(pool, &handler, &release(order, "payment failed"))
        .await
        .unwrap();
    assert_eq!(stock(pool, "SKU-KEYBOARD").await, (1000, 0, 0));
    let again: pb::InventoryReleased = last_reply(pool, app.config(), order).await;
    assert!(!again.released);

    // A commit after the release fails with the release's reason.
    handle(pool, &handler, &commit(order)).await.unwrap();
    let failed: pb::InventoryCommitFailed = last_reply(pool, app.config(), order).await;
    assert_eq!(failed.reason, "reservation was released: payment failed");
    assert_eq!(stock(pool, "SKU-KEYBOARD").await, (1000, 0, 0));
}

#[tokio::test]
async fn a_release_before_the_reserve_makes_the_late_reserve_hold_nothing() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();

    handle(pool, &handler, &release(order, "saga timed out"))
        .await
        .unwrap();
    let released: pb::InventoryReleased = last_reply(pool, app.config(), order).await;
    assert!(!released.released);

    handle(pool, &handler, &reserve(order, &[("SKU-MOUSE", 1)]))
        .await
        .unwrap();
    assert_eq!(stock(pool, "SKU-MOUSE").await, (1000, 0, 0));
    let failed: pb::InventoryReservationFailed = last_reply(pool, app.config(), order).await;
    assert_eq!(failed.reason, "reservation was already released");
    assert_eq!(reservation_status(pool, order).await.unwrap().0, "RELEASED");
}

#[tokio::test]
async fn commit_of_an_expired_reservation_fails_and_returns_the_stock() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();
    handle(pool, &handler, &reserve(order, &[("SKU-HEADSET", 3)]))
        .await
        .unwrap();
    expire(pool, order).await;

    handle(pool, &handler, &commit(order)).await.unwrap();
    let failed: pb::InventoryCommitFailed = last_reply(pool, app.config(), order).await;
    assert_eq!(failed.order_id, order.to_string());
    assert_eq!(failed.reason, "reservation expired");
    assert_eq!(stock(pool, "SKU-HEADSET").await, (1000, 0, 0));
    assert_eq!(
        reservation_status(pool, order).await,
        Some(("RELEASED".to_owned(), Some("expired".to_owned())))
    );

    // The saga's compensation that follows releases nothing more.
    handle(pool, &handler, &release(order, "commit failed"))
        .await
        .unwrap();
    let released: pb::InventoryReleased = last_reply(pool, app.config(), order).await;
    assert!(!released.released);
    assert_eq!(stock(pool, "SKU-HEADSET").await, (1000, 0, 0));
}

#[tokio::test]
async fn commit_without_a_reservation_fails() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();

    handle(pool, &handler, &commit(order)).await.unwrap();
    let failed: pb::InventoryCommitFailed = last_reply(pool, app.config(), order).await;
    assert_eq!(failed.reason, "no reservation for order");
}

#[tokio::test]
async fn invalid_commands_are_permanent_errors_with_no_effect() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();

    let mut bad_id = reserve(order, &[("SKU-MOUSE", 1)]);
    bad_id.payload = prost::Message::encode_to_vec(&pb::ReserveInventory {
        order_id: "not-a-uuid".to_owned(),
        lines: vec![pb::ReservationLine {
            sku: "SKU-MOUSE".to_owned(),
            quantity: 1,
        }],
    });
    let zero = reserve(order, &[("SKU-MOUSE", 1), ("SKU-KEYBOARD", 0)]);
    let empty = reserve(order, &[]);
    let mut unknown_type = commit(order);
    unknown_type.envelope.message_type = "inventory.v1.RestockEverything".to_owned();
    let mut undecodable = commit(order);
    undecodable.payload = vec![0xff, 0xff, 0xff];

    for (what, message) in [
        ("bad order id", bad_id),
        ("zero quantity", zero),
        ("no lines", empty),
        ("unknown type", unknown_type),
        ("undecodable", undecodable),
    ] {
        let mut tx = pool.begin().await.unwrap();
        let result = messaging::Handler::handle(&handler, &mut tx, &message).await;
        assert!(
            matches!(result, Err(HandlerError::Permanent(_))),
            "{what}: {result:?}"
        );
        // The consumer rolls back; nothing was written before the refusal anyway.
        tx.rollback().await.unwrap();
    }
    assert_eq!(stock(pool, "SKU-MOUSE").await, (1000, 0, 0));
    assert!(replies(pool, app.config(), order).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_oversell() {
    let app = built_app(&["--database-max-connections", "16"]).await;
    let pool = app.pool().clone();
    let handler = Arc::new(app.handler());
    set_available(&pool, "SKU-WEBCAM", 10).await;

    let orders: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let tasks: Vec<_> = orders
        .iter()
        .map(|&order| {
            let (pool, handler) = (pool.clone(), handler.clone());
            tokio::spawn(async move {
                handle(&pool, &handler, &reserve(order, &[("SKU-WEBCAM", 1)])).await
            })
        })
        .collect();
    for result in futures::future::join_all(tasks).await {
        result.unwrap().unwrap();
    }

    assert_eq!(stock(&pool, "SKU-WEBCAM").await, (0, 10, 0));
    let mut reserved = 0;
    let mut failed = 0;
    for order in &orders {
        let replies = replies(&pool, app.config(), *order).await;
        assert_eq!(replies.len(), 1, "one reply per order");
        match replies[0].0.as_str() {
            "inventory.v1.InventoryReserved" => reserved += 1,
            "inventory.v1.InventoryReservationFailed" => {
                let reply: pb::InventoryReservationFailed =
                    prost::Message::decode(replies[0].1.as_slice()).unwrap();
                assert_eq!(reply.failure(), pb::ReservationFailure::OutOfStock);
                failed += 1;
            }
            other => panic!("unexpected reply {other}"),
        }
    }
    assert_eq!((reserved, failed), (10, 40));
    let holding: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations WHERE status = 'RESERVED'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(holding, 10);
}

/// Commits and releases lock what they settle in the same SKU order as reservations do, so
/// that all three at once on the same SKUs neither deadlock nor lose a unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserves_commits_and_releases_keep_every_unit() {
    let app = built_app(&["--database-max-connections", "16"]).await;
    let pool = app.pool().clone();
    let handler = Arc::new(app.handler());
    set_available(&pool, "SKU-WEBCAM", 1000).await;
    set_available(&pool, "SKU-MOUSE", 1000).await;
    // Lines in both orders.
    let lines = |i: usize| {
        if i.is_multiple_of(2) {
            vec![("SKU-WEBCAM", 1), ("SKU-MOUSE", 2)]
        } else {
            vec![("SKU-MOUSE", 2), ("SKU-WEBCAM", 1)]
        }
    };
    let held: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    for (i, order) in held.iter().enumerate() {
        handle(&pool, &handler, &reserve(*order, &lines(i)))
            .await
            .unwrap();
    }
    // Half of those committed, the other half released, while 40 more reserve.
    let fresh: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let messages: Vec<_> = held
        .iter()
        .enumerate()
        .map(|(i, order)| {
            if i % 2 == 0 {
                commit(*order)
            } else {
                release(*order, "payment declined")
            }
        })
        .chain(
            fresh
                .iter()
                .enumerate()
                .map(|(i, order)| reserve(*order, &lines(i))),
        )
        .collect();
    let tasks: Vec<_> = messages
        .into_iter()
        .map(|message| {
            let (pool, handler) = (pool.clone(), handler.clone());
            tokio::spawn(async move { handle(&pool, &handler, &message).await })
        })
        .collect();
    for result in futures::future::join_all(tasks).await {
        result.unwrap().unwrap();
    }
    // 20 sold, 40 holding, 20 given back: (available, reserved, committed) per SKU.
    assert_eq!(stock(&pool, "SKU-WEBCAM").await, (1000 - 60, 40, 20));
    assert_eq!(stock(&pool, "SKU-MOUSE").await, (1000 - 120, 80, 40));
}

#[tokio::test]
async fn a_reserve_resent_after_a_refusal_replies_the_same_refusal_and_holds_nothing() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    set_available(pool, "SKU-MOUSE", 1).await;
    let (short, unknown) = (Uuid::new_v4(), Uuid::new_v4());

    handle(pool, &handler, &reserve(short, &[("SKU-MOUSE", 3)]))
        .await
        .unwrap();
    let refused: pb::InventoryReservationFailed = last_reply(pool, app.config(), short).await;
    assert_eq!(refused.failure(), pb::ReservationFailure::OutOfStock);
    handle(pool, &handler, &reserve(unknown, &[("SKU-NOPE", 1)]))
        .await
        .unwrap();
    let unknown_sku: pb::InventoryReservationFailed = last_reply(pool, app.config(), unknown).await;
    assert_eq!(unknown_sku.failure(), pb::ReservationFailure::UnknownSku);

    // The saga failed on those refusals. Stock is freed, and the SKU created, before the
    // step timer (or an operator's retry) sends the same ReserveInventory again.
    set_available(pool, "SKU-MOUSE", 1000).await;
    sqlx::query("INSERT INTO stock (sku, available) VALUES ('SKU-NOPE', 1000)")
        .execute(pool)
        .await
        .unwrap();
    handle(pool, &handler, &reserve(short, &[("SKU-MOUSE", 3)]))
        .await
        .unwrap();
    handle(pool, &handler, &reserve(unknown, &[("SKU-NOPE", 1)]))
        .await
        .unwrap();

    assert_eq!(stock(pool, "SKU-MOUSE").await, (1000, 0, 0));
    assert_eq!(stock(pool, "SKU-NOPE").await, (1000, 0, 0));
    let again: pb::InventoryReservationFailed = last_reply(pool, app.config(), short).await;
    assert_eq!(again, refused);
    let again: pb::InventoryReservationFailed = last_reply(pool, app.config(), unknown).await;
    assert_eq!(again, unknown_sku);

    // A refused reservation holds nothing to release, and cannot be committed.
    handle(pool, &handler, &release(short, "reservation failed"))
        .await
        .unwrap();
    let released: pb::InventoryReleased = last_reply(pool, app.config(), short).await;
    assert!(!released.released);
    handle(pool, &handler, &commit(unknown)).await.unwrap();
    let commit_failed: pb::InventoryCommitFailed = last_reply(pool, app.config(), unknown).await;
    assert!(
        commit_failed.reason.contains("unknown SKU: SKU-NOPE"),
        "{}",
        commit_failed.reason
    );
    assert_eq!(stock(pool, "SKU-NOPE").await, (1000, 0, 0));
}

/// A batch's commits are made by the statement that records its inbox rows: sold, released
/// when expired, refused when there is no reservation, as one by one; delivered again, the batch
/// changes nothing and replies nothing.
#[tokio::test]
async fn a_batch_of_commits_is_one_statement_and_delivered_again_changes_nothing() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let (sold, expired, unknown) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for order in [sold, expired] {
        handle(
            pool,
            &handler,
            &reserve(order, &[("SKU-MONITOR", 2), ("SKU-HEADSET", 1)]),
        )
        .await
        .unwrap();
    }
    expire(pool, expired).await;
    let batch = [commit(sold), commit(expired), commit(unknown)];
    let (new, statements) =
        test_support::statements_of(pool, handle_batch(pool, &handler, &batch)).await;
    assert_eq!(new.unwrap(), 3);
    let own = test_support::own_statements(statements);
    assert_eq!(own.len(), 1, "the batch's statements: {own:#?}");
    assert_eq!(own[0].1, 1, "{own:#?}");
    // One pair sold, the expired one's returned: (available, reserved, committed).
    assert_eq!(stock(pool, "SKU-MONITOR").await, (998, 0, 2));
    assert_eq!(stock(pool, "SKU-HEADSET").await, (999, 0, 1));
    let committed: pb::InventoryCommitted = last_reply(pool, app.config(), sold).await;
    assert_eq!(committed.order_id, sold.to_string());
    let late: pb::InventoryCommitFailed = last_reply(pool, app.config(), expired).await;
    assert_eq!(late.reason, "reservation expired");
    assert_eq!(
        reservation_status(pool, expired).await,
        Some(("RELEASED".to_owned(), Some("expired".to_owned())))
    );
    let none: pb::InventoryCommitFailed = last_reply(pool, app.config(), unknown).await;
    assert_eq!(none.reason, "no reservation for order");

    assert_eq!(handle_batch(pool, &handler, &batch).await.unwrap(), 0);
    assert_eq!(stock(pool, "SKU-MONITOR").await, (998, 0, 2));
    for order in [sold, expired, unknown] {
        assert_eq!(
            replies(pool, app.config(), order).await.len(),
            if order == unknown { 1 } else { 2 }
        );
    }
}

/// In a batch, a commit that follows a release of its order is applied after it, as one by
/// one: refused, nothing sold.
#[tokio::test]
async fn a_commit_after_a_release_of_its_order_in_one_batch_is_refused() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let order = Uuid::new_v4();
    handle(pool, &handler, &reserve(order, &[("SKU-MONITOR", 2)]))
        .await
        .unwrap();
    let batch = [release(order, "payment declined"), commit(order)];
    assert_eq!(handle_batch(pool, &handler, &batch).await.unwrap(), 2);
    assert_eq!(stock(pool, "SKU-MONITOR").await, (1000, 0, 0));
    let refused: pb::InventoryCommitFailed = last_reply(pool, app.config(), order).await;
    assert_eq!(refused.reason, "reservation was released: payment declined");
}

/// A batch of commits of reservations this handler made is one statement with no transaction
/// around it: the stock sold, the reservations committed, the batch's inbox rows and the
/// replies. Delivered again, that statement refuses it, and the consumer's transaction finds it
/// handled: nothing sold or replied twice.
#[tokio::test]
async fn a_batch_of_commits_of_reservations_made_here_is_one_statement_without_a_transaction() {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    handle_received(
        pool,
        app.config(),
        &handler,
        &[
            reserve(first, &[("SKU-MONITOR", 2)]),
            reserve(second, &[("SKU-MONITOR", 1), ("SKU-HEADSET", 1)]),
        ],
    )
    .await
    .expect("reserved");
    let batch = [commit(first), commit(second)];
    let (handled, statements) =
        test_support::statements_of(pool, handle_received(pool, app.config(), &handler, &batch))
            .await;
    handled.expect("committed");
    assert!(
        !statements.iter().any(|(q, _)| q == "BEGIN"),
        "no transaction: {statements:#?}"
    );
    let own = test_support::own_statements(statements);
    assert_eq!(own.len(), 1, "the batch's statements: {own:#?}");
    assert!(own[0].0.contains("INSERT INTO outbox"), "{own:#?}");
    assert_eq!(own[0].1, 1, "{own:#?}");
    assert_eq!(stock(pool, "SKU-MONITOR").await, (997, 0, 3));
    assert_eq!(stock(pool, "SKU-HEADSET").await, (999, 0, 1));
    for order in [first, second] {
        let committed: pb::InventoryCommitted = last_reply(pool, app.config(), order).await;
        let recorded: Uuid =
            sqlx::query_scalar("SELECT reservation_id FROM reservations WHERE order_id = $1")
                .bind(order)
                .fetch_one(pool)
                .await
                .expect("reservation");
        assert_eq!(committed.reservation_id, recorded.to_string());
        assert_eq!(
            reservation_status(pool, order).await,
            Some(("COMMITTED".to_owned(), None))
        );
    }

    let (handled, statements) =
        test_support::statements_of(pool, handle_received(pool, app.config(), &handler, &batch))
            .await;
    handled.expect("delivered again");
    assert!(
        statements.iter().any(|(q, _)| q == "BEGIN"),
        "refused alone, decided in a transaction: {statements:#?}"
    );
    assert_eq!(stock(pool, "SKU-MONITOR").await, (997, 0, 3));
    for order in [first, second] {
        assert_eq!(
            replies(pool, app.config(), order).await.len(),
            2,
            "reserved, committed"
        );
    }
}

/// A reservation that expired since its reserve makes the one statement of a batch of commits
/// refuse the batch, which is then applied in a transaction: that commit fails with its
/// reason and returns the stock, the other is sold.
#[tokio::test]
async fn a_commit_of_a_reservation_expired_since_fails_with_its_reason_when_its_batch_is_refused_alone(
) {
    let app = built_app(&[]).await;
    let (pool, handler) = (app.pool(), app.handler());
    let (expired, sold) = (Uuid::new_v4(), Uuid::new_v4());
    handle_received(
        pool,
        app.config(),
        &handler,
        &[
            reserve(expired, &[("SKU-MONITOR", 2)]),
            reserve(sold, &[("SKU-MONITOR", 1)]),
        ],
    )
    .await
    .expect("reserved");
    expire(pool, expired).await;
    handle_received(
        pool,
        app.config(),
        &handler,
        &[commit(expired), commit(sold)],
    )
    .await
    .expect("commits");
    let late: pb::InventoryCommitFailed = last_reply(pool, app.config(), expired).await;
    assert_eq!(late.reason, "reservation expired");
    let _: pb::InventoryCommitted = last_reply(pool, app.config(), sold).await;
    assert_eq!(stock(pool, "SKU-MONITOR").await, (999, 0, 1));
}
