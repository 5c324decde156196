//! The saga's commands on `order.commands`: the handler directly in a transaction, and once
//! end to end through the broker.

mod common;

use std::time::Duration;

use common::{incoming, TestApp};
use messaging::{Handler as _, HandlerError, InboxRows, Incoming, Outbox};
use order_svc::handler::OrderCommands;
use proto::order::v1 as pb;
use uuid::Uuid;

/// Handles `message` in its own committed transaction, as the consumer does.
async fn handle(app: &TestApp, message: &Incoming) -> Result<(), HandlerError> {
    let mut tx = app.pool.begin().await.unwrap();
    let commands = OrderCommands::new(Outbox::new("order-svc", app.config.kafka.clone()));
    let result = commands.handle(&mut tx, message).await;
    if result.is_ok() {
        tx.commit().await.unwrap();
    }
    result
}

fn mark_payment_initiated(order_id: &str, payment_id: &str) -> Incoming {
    incoming(
        order_id,
        &pb::MarkPaymentInitiated {
            order_id: order_id.into(),
            payment_id: payment_id.into(),
        },
    )
}

fn complete(order_id: &str) -> Incoming {
    incoming(
        order_id,
        &pb::CompleteOrder {
            order_id: order_id.into(),
        },
    )
}

fn fail(order_id: &str, reason: &str) -> Incoming {
    incoming(
        order_id,
        &pb::FailOrder {
            order_id: order_id.into(),
            reason: reason.into(),
        },
    )
}

#[tokio::test]
async fn commands_move_the_order_forward() {
    let app = TestApp::start().await;
    let order = app.place_order().await;
    let id = order.order_id.as_str();
    let payment_id = Uuid::now_v7().to_string();

    handle(&app, &mark_payment_initiated(id, &payment_id))
        .await
        .unwrap();
    let got = app.get(id).await.unwrap();
    assert_eq!(got.status(), pb::OrderStatus::PaymentInitiated);
    assert_eq!(got.payment_id, payment_id);
    assert!(got.updated_at_ms >= order.updated_at_ms);

    handle(&app, &complete(id)).await.unwrap();
    let got = app.get(id).await.unwrap();
    assert_eq!(got.status(), pb::OrderStatus::Completed);
    assert_eq!(got.payment_id, payment_id);
    assert_eq!(got.failure_reason, "");
    // OrderCreated, then the completion confirmed to the saga (MarkPaymentInitiated is not
    // answered).
    let types: Vec<String> = app
        .outbox_writes()
        .await
        .into_iter()
        .map(|w| w.message_type)
        .collect();
    assert_eq!(types, ["order.v1.OrderCreated", "order.v1.OrderCompleted"]);
    app.stop().await;
}

#[tokio::test]
async fn fail_order_records_its_reason_from_pending_or_payment_initiated() {
    let app = TestApp::start().await;
    let pending = app.place_order().await;
    handle(&app, &fail(&pending.order_id, "out of stock: SKU-MOUSE"))
        .await
        .unwrap();
    let got = app.get(&pending.order_id).await.unwrap();
    assert_eq!(got.status(), pb::OrderStatus::Failed);
    assert_eq!(got.failure_reason, "out of stock: SKU-MOUSE");

    let paying = app.place_order().await;
    let payment_id = Uuid::now_v7().to_string();
    handle(&app, &mark_payment_initiated(&paying.order_id, &payment_id))
        .await
        .unwrap();
    handle(&app, &fail(&paying.order_id, "payment declined"))
        .await
        .unwrap();
    let got = app.get(&paying.order_id).await.unwrap();
    assert_eq!(got.status(), pb::OrderStatus::Failed);
    assert_eq!(got.failure_reason, "payment declined");
    assert_eq!(got.payment_id, payment_id);
    app.stop().await;
}

#[tokio::test]
async fn a_late_mark_payment_initiated_leaves_a_completed_order_completed() {
    let app = TestApp::start().await;
    let order = app.place_order().await;
    let id = order.order_id.as_str();
    handle(&app, &complete(id)).await.unwrap();
    let completed = app.get(id).await.unwrap();

    handle(
        &app,
        &mark_payment_initiated(id, &Uuid::now_v7().to_string()),
    )
    .await
    .unwrap();
    let got = app.get(id).await.unwrap();
    assert_eq!(got, completed, "a terminal order is not touched");
    assert_eq!(got.status(), pb::OrderStatus::Completed);
    app.stop().await;
}

#[tokio::test]
async fn terminal_statuses_never_change() {
    let app = TestApp::start().await;
    let completed = app.place_order().await;
    handle(&app, &complete(&completed.order_id)).await.unwrap();
    let before = app.get(&completed.order_id).await.unwrap();
    handle(&app, &fail(&completed.order_id, "too late"))
        .await
        .unwrap();
    assert_eq!(app.get(&completed.order_id).await.unwrap(), before);

    let failed = app.place_order().await;
    handle(&app, &fail(&failed.order_id, "out of stock"))
        .await
        .unwrap();
    let before = app.get(&failed.order_id).await.unwrap();
    handle(&app, &complete(&failed.order_id)).await.unwrap();
    handle(&app, &fail(&failed.order_id, "another reason"))
        .await
        .unwrap();
    handle(
        &app,
        &mark_payment_initiated(&failed.order_id, &Uuid::now_v7().to_string()),
    )
    .await
    .unwrap();
    let got = app.get(&failed.order_id).await.unwrap();
    assert_eq!(got, before);
    assert_eq!(got.failure_reason, "out of stock");
    app.stop().await;
}

#[tokio::test]
async fn repeated_commands_change_nothing_more() {
    let app = TestApp::start().await;
    let order = app.place_order().await;
    let id = order.order_id.as_str();
    let first_payment = Uuid::now_v7().to_string();
    handle(&app, &mark_payment_initiated(id, &first_payment))
        .await
        .unwrap();
    let initiated = app.get(id).await.unwrap();
    // The same command again, as a new message (the inbox cannot catch it): no change, no error.
    handle(&app, &mark_payment_initiated(id, &first_payment))
        .await
        .unwrap();
    handle(
        &app,
        &mark_payment_initiated(id, &Uuid::now_v7().to_string()),
    )
    .await
    .unwrap();
    assert_eq!(app.get(id).await.unwrap(), initiated);

    handle(&app, &complete(id)).await.unwrap();
    let completed = app.get(id).await.unwrap();
    handle(&app, &complete(id)).await.unwrap();
    assert_eq!(app.get(id).await.unwrap(), completed);
    app.stop().await;
}

#[tokio::test]
async fn bad_commands_are_permanent_errors() {
    let app = TestApp::start().await;
    let order = app.place_order().await;
    let unknown = Uuid::now_v7().to_string();

    let permanent = |result: Result<(), HandlerError>| match result {
        Err(HandlerError::Permanent(message)) => message,
        other => panic!("expected a permanent error, got {other:?}"),
    };
    assert!(permanent(handle(&app, &complete(&unknown)).await).contains(&unknown));
    assert!(permanent(handle(&app, &complete("not-a-uuid")).await).contains("order_id"));
    assert!(
        permanent(handle(&app, &mark_payment_initiated(&order.order_id, "nope")).await)
            .contains("payment_id")
    );
    let wrong_type = incoming(&order.order_id, &pb::OrderCreated::default());
    assert!(permanent(handle(&app, &wrong_type).await).contains("unknown message type"));
    let mut garbage = complete(&order.order_id);
    garbage.payload = vec![0xff, 0xff, 0xff];
    assert!(permanent(handle(&app, &garbage).await).contains("undecodable"));

    assert_eq!(
        app.get(&order.order_id).await.unwrap().status(),
        pb::OrderStatus::Pending
    );
    app.stop().await;
}

#[tokio::test]
async fn commands_arrive_through_the_broker() {
    let app = TestApp::start().await;
    let order = app.place_order().await;
    let order_id = Uuid::parse_str(&order.order_id).unwrap();
    let payment_id = Uuid::now_v7().to_string();

    // Sent as the orchestrator sends them: through an outbox (here the app's own, which its
    // relay publishes) to `order.commands`, where the app's consumer picks them up.
    let orchestrator = Outbox::new("orchestrator", app.config.kafka.clone());
    let context = messaging::MessageContext {
        correlation_id: order.correlation_id.clone(),
        ..Default::default()
    };
    let messages = [
        orchestrator.message(
            proto::topics::ORDER_COMMANDS,
            order_id,
            &pb::MarkPaymentInitiated {
                order_id: order.order_id.clone(),
                payment_id: payment_id.clone(),
            },
            &context,
        ),
        orchestrator.message(
            proto::topics::ORDER_COMMANDS,
            order_id,
            &pb::CompleteOrder {
                order_id: order.order_id.clone(),
            },
            &context,
        ),
    ];
    let mut conn = app.pool.acquire().await.unwrap();
    orchestrator.enqueue(&mut conn, &messages).await.unwrap();
    drop(conn);

    let got =
        test_support::eventually(Duration::from_secs(60), "the order to complete", || async {
            let got = app.get(&order.order_id).await.unwrap();
            (got.status() == pb::OrderStatus::Completed).then_some(got)
        })
        .await;
    assert_eq!(got.payment_id, payment_id);
    // Both recorded in the inbox: a redelivery would be skipped.
    assert_eq!(app.count("inbox").await, 2);
    app.stop().await;
}

/// The replies to the saga about `order_id`, oldest first: type and failure reason.
async fn replies(app: &TestApp, order_id: &str) -> Vec<(String, String)> {
    app.outbox_writes()
        .await
        .into_iter()
        .filter(|w| w.topic == app.topic(proto::topics::SAGA_REPLIES) && w.key == order_id)
        .map(|w| {
            let reason = match w.message_type.as_str() {
                "order.v1.OrderFailed" => {
                    <pb::OrderFailed as prost::Message>::decode(w.payload.as_slice())
                        .unwrap()
                        .reason
                }
                _ => String::new(),
            };
            (w.message_type, reason)
        })
        .collect()
}

/// Handles `messages` as one batch in one committed transaction, as the consumer does: the
/// batch prepared (its inbox rows recorded and its commands applied in one statement), each new
/// message handled, then flushed.
async fn handle_batch(app: &TestApp, messages: &[Incoming]) -> Result<(), HandlerError> {
    let mut tx = app.pool.begin().await.unwrap();
    let commands = OrderCommands::new(Outbox::new("order-svc", app.config.kafka.clone()));
    let batch: Vec<&Incoming> = messages.iter().collect();
    let ids: Vec<(Uuid, &str, &str)> = messages
        .iter()
        .map(|m| (m.message_id().unwrap(), m.message_type(), m.topic.as_str()))
        .collect();
    let fresh = commands
        .prepare_recording(&mut tx, &batch, &InboxRows::new(&ids))
        .await?
        .expect("order-svc records a batch's inbox rows with its status updates");
    for message in messages {
        if fresh.contains(&message.message_id().unwrap()) {
            commands.handle(&mut tx, message).await?;
        }
    }
    commands.flush(&mut tx).await?;
    tx.commit().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn a_batch_moves_each_order_as_its_commands_one_by_one_would() {
    let app = TestApp::start().await;
    // Two commands of one order in the batch, a failure, and a command its order is past.
    let (paid, failed, done) = (
        app.place_order().await,
        app.place_order().await,
        app.place_order().await,
    );
    handle(&app, &complete(&done.order_id)).await.unwrap();
    let payment_id = Uuid::now_v7().to_string();
    handle_batch(
        &app,
        &[
            mark_payment_initiated(&paid.order_id, &payment_id),
            fail(&failed.order_id, "out of stock"),
            fail(&done.order_id, "too late"),
            complete(&paid.order_id),
        ],
    )
    .await
    .unwrap();

    let got = app.get(&paid.order_id).await.unwrap();
    assert_eq!(got.status(), pb::OrderStatus::Completed);
    assert_eq!(
        got.payment_id, payment_id,
        "the first command's change kept"
    );
    let got = app.get(&failed.order_id).await.unwrap();
    assert_eq!(got.status(), pb::OrderStatus::Failed);
    assert_eq!(got.failure_reason, "out of stock");
    let got = app.get(&done.order_id).await.unwrap();
    assert_eq!(got.status(), pb::OrderStatus::Completed);
    assert_eq!(got.failure_reason, "");

    let completion = ("order.v1.OrderCompleted".to_owned(), String::new());
    assert_eq!(
        replies(&app, &paid.order_id).await,
        std::slice::from_ref(&completion)
    );
    assert_eq!(
        replies(&app, &failed.order_id).await,
        [("order.v1.OrderFailed".to_owned(), "out of stock".to_owned())]
    );
    assert_eq!(
        replies(&app, &done.order_id).await,
        [completion.clone(), completion],
        "the late failure answered with the order's real status"
    );
    app.stop().await;
}

/// A batch of status commands records its messages in the inbox and moves its orders in one
/// statement; delivered again, it moves nothing and answers nothing.
#[tokio::test]
async fn a_batch_records_its_messages_and_moves_its_orders_in_one_statement() {
    let app = TestApp::start().await;
    let (completed, failed) = (app.place_order().await, app.place_order().await);
    let batch = [
        complete(&completed.order_id),
        fail(&failed.order_id, "payment declined"),
    ];
    let (handled, statements) =
        test_support::statements_of(&app.pool, handle_batch(&app, &batch)).await;
    handled.unwrap();
    // The running service's relay reads the outbox meanwhile: only the inbox's and the
    // orders' statements are the batch's.
    let batch_statements: Vec<&(String, i64)> = statements
        .iter()
        .filter(|(q, _)| q.contains("inbox") || q.contains("UPDATE orders"))
        .collect();
    assert_eq!(batch_statements.len(), 1, "{batch_statements:#?}");
    let (statement, calls) = batch_statements[0];
    assert!(
        statement.contains("INSERT INTO inbox") && statement.contains("UPDATE orders"),
        "{statement}"
    );
    assert_eq!(*calls, 1);

    handle_batch(&app, &batch).await.unwrap();
    assert_eq!(
        app.get(&completed.order_id).await.unwrap().status(),
        pb::OrderStatus::Completed
    );
    assert_eq!(
        replies(&app, &completed.order_id).await,
        [("order.v1.OrderCompleted".to_owned(), String::new())],
        "answered once"
    );
    assert_eq!(
        replies(&app, &failed.order_id).await,
        [(
            "order.v1.OrderFailed".to_owned(),
            "payment declined".to_owned()
        )],
        "answered once"
    );
    app.stop().await;
}

#[tokio::test]
async fn final_commands_are_confirmed_to_the_saga_with_the_orders_status() {
    let app = TestApp::start().await;
    let completed = app.place_order().await;
    let id = completed.order_id.as_str();
    handle(&app, &complete(id)).await.unwrap();
    // Sent again (the saga's step timer, the confirmation lost): confirmed again.
    handle(&app, &complete(id)).await.unwrap();
    // A contradicting command is answered with the order's real status.
    handle(&app, &fail(id, "too late")).await.unwrap();
    let completion = ("order.v1.OrderCompleted".to_owned(), String::new());
    assert_eq!(
        replies(&app, id).await,
        [completion.clone(), completion.clone(), completion]
    );

    let failed = app.place_order().await;
    let id = failed.order_id.as_str();
    handle(&app, &fail(id, "out of stock")).await.unwrap();
    handle(&app, &complete(id)).await.unwrap();
    let failure = ("order.v1.OrderFailed".to_owned(), "out of stock".to_owned());
    assert_eq!(replies(&app, id).await, [failure.clone(), failure]);

    // MarkPaymentInitiated is not answered; an unknown order is a permanent error (dead
    // letter), answered by nothing.
    let paying = app.place_order().await;
    handle(
        &app,
        &mark_payment_initiated(&paying.order_id, &Uuid::now_v7().to_string()),
    )
    .await
    .unwrap();
    assert_eq!(replies(&app, &paying.order_id).await, []);
    let unknown = Uuid::now_v7().to_string();
    assert!(handle(&app, &complete(&unknown)).await.is_err());
    assert_eq!(replies(&app, &unknown).await, []);
    app.stop().await;
}

#[tokio::test]
async fn a_long_poll_answers_with_the_order_as_each_change_left_it() {
    let app = TestApp::start().await;
    let wait = |order_id: &str, while_status: pb::OrderStatus| {
        let mut client = app.client.clone();
        let request = pb::GetOrderRequest {
            order_id: order_id.to_owned(),
            customer_id: String::new(),
            wait_while_status: while_status.into(),
            wait_timeout_ms: 20_000,
        };
        tokio::spawn(async move { client.get_order(request).await.map(|r| r.into_inner()) })
    };
    // Until the poll waits (it answers at once otherwise, and proves nothing).
    let waiting = || app.status_listener_listening();

    // The change carried by the notification: the answer is what a read finds.
    let order = app.place_order().await;
    let id = order.order_id.as_str();
    let poll = wait(id, pb::OrderStatus::Pending);
    waiting().await;
    let payment_id = Uuid::now_v7().to_string();
    handle(&app, &mark_payment_initiated(id, &payment_id))
        .await
        .unwrap();
    let answered = poll.await.unwrap().unwrap();
    assert_eq!(answered.status(), pb::OrderStatus::PaymentInitiated);
    assert_eq!(answered, app.get(id).await.unwrap());

    let poll = wait(id, pb::OrderStatus::PaymentInitiated);
    waiting().await;
    handle(&app, &fail(id, "payment declined: card_declined"))
        .await
        .unwrap();
    let answered = poll.await.unwrap().unwrap();
    assert_eq!(answered.failure_reason, "payment declined: card_declined");
    assert_eq!(answered, app.get(id).await.unwrap());

    // A reason too long for a notification: it names the order only, and the poll reads it.
    let order = app.place_order().await;
    let id = order.order_id.as_str();
    let poll = wait(id, pb::OrderStatus::Pending);
    waiting().await;
    let long = "r".repeat(10_000);
    handle(&app, &fail(id, &long)).await.unwrap();
    let answered = poll.await.unwrap().unwrap();
    assert_eq!(answered.failure_reason, long);
    assert_eq!(answered, app.get(id).await.unwrap());
    app.stop().await;
}

/// A long poll on an order placed by this replica starts from the order as this replica keeps
/// it, changed by the status notifications: it reads nothing.
#[tokio::test]
async fn a_long_poll_on_an_order_placed_here_reads_nothing() {
    let app = TestApp::start().await;
    // Orders are kept only while the status listener listens.
    app.status_listener_listening().await;
    let order = app.place_order().await;
    let id = order.order_id.as_str();
    let payment_id = Uuid::now_v7().to_string();
    handle(&app, &mark_payment_initiated(id, &payment_id))
        .await
        .unwrap();
    let poll = async {
        app.client
            .clone()
            .get_order(pb::GetOrderRequest {
                order_id: id.to_owned(),
                customer_id: String::new(),
                wait_while_status: pb::OrderStatus::Pending.into(),
                wait_timeout_ms: 20_000,
            })
            .await
            .unwrap()
            .into_inner()
    };
    let (answered, statements) = test_support::statements_of(&app.pool, poll).await;
    assert_eq!(answered.status(), pb::OrderStatus::PaymentInitiated);
    assert_eq!(answered.payment_id, payment_id);
    let reads: Vec<&(String, i64)> = statements
        .iter()
        .filter(|(q, _)| q.contains("FROM orders"))
        .collect();
    assert!(reads.is_empty(), "the long poll read the order: {reads:#?}");
    assert_eq!(answered, app.get(id).await.unwrap());
    app.stop().await;
}

/// Hands `messages` to a consumer as one batch it received: it applies them alone or in a
/// transaction, as it decides ([`messaging::Handler::takes_alone`]).
async fn handle_received(app: &TestApp, messages: &[Incoming]) -> Result<(), HandlerError> {
    let outbox = || Outbox::new("order-svc", app.config.kafka.clone());
    messaging::Consumer::new(
        &app.config.kafka,
        "order-svc-test",
        &[proto::topics::ORDER_COMMANDS],
        app.pool.clone(),
        outbox(),
    )
    .handle_received(&OrderCommands::new(outbox()), messages)
    .await
}

/// A batch of commands that each move their order is one statement with no transaction
/// around it: the status changes, the batch's inbox rows and the replies. Delivered again,
/// that statement refuses it, and the consumer's transaction finds it handled: answered once.
#[tokio::test]
async fn a_batch_of_commands_moving_their_orders_is_one_statement_without_a_transaction() {
    let app = TestApp::start().await;
    let (paid, completed, failed) = (
        app.place_order().await,
        app.place_order().await,
        app.place_order().await,
    );
    let payment_id = Uuid::now_v7().to_string();
    let batch = [
        mark_payment_initiated(&paid.order_id, &payment_id),
        complete(&completed.order_id),
        fail(&failed.order_id, "payment declined"),
    ];
    let (handled, statements) =
        test_support::statements_of(&app.pool, handle_received(&app, &batch)).await;
    handled.unwrap();
    // The running service's relay reads the outbox meanwhile: only the inbox's and the
    // orders' statements, and transactions, are the batch's.
    let batch_statements: Vec<&(String, i64)> = statements
        .iter()
        .filter(|(q, _)| q.contains("inbox") || q.contains("UPDATE orders") || q == "BEGIN")
        .collect();
    assert_eq!(batch_statements.len(), 1, "{batch_statements:#?}");
    let (statement, calls) = batch_statements[0];
    assert!(
        statement.contains("INSERT INTO inbox")
            && statement.contains("UPDATE orders")
            && statement.contains("INSERT INTO outbox"),
        "{statement}"
    );
    assert_eq!(*calls, 1);
    let got = app.get(&paid.order_id).await.unwrap();
    assert_eq!(got.status(), pb::OrderStatus::PaymentInitiated);
    assert_eq!(got.payment_id, payment_id);
    assert!(
        replies(&app, &paid.order_id).await.is_empty(),
        "not a final status: no reply"
    );

    let (handled, statements) =
        test_support::statements_of(&app.pool, handle_received(&app, &batch)).await;
    handled.unwrap();
    assert!(
        statements.iter().any(|(q, _)| q == "BEGIN"),
        "refused alone, decided in a transaction: {statements:#?}"
    );
    assert_eq!(
        replies(&app, &completed.order_id).await,
        [("order.v1.OrderCompleted".to_owned(), String::new())],
        "answered once"
    );
    assert_eq!(
        replies(&app, &failed.order_id).await,
        [(
            "order.v1.OrderFailed".to_owned(),
            "payment declined".to_owned()
        )],
        "answered once"
    );
    app.stop().await;
}

/// A command whose order is past it already (a late failure of a completed order) makes the
/// one statement of its batch refuse the batch, which is then applied in a transaction: that
/// command answered with the order's real status, the other order moved.
#[tokio::test]
async fn a_command_its_order_is_past_is_answered_with_the_orders_status_when_its_batch_is_refused_alone(
) {
    let app = TestApp::start().await;
    let (done, other) = (app.place_order().await, app.place_order().await);
    handle(&app, &complete(&done.order_id)).await.unwrap();
    handle_received(
        &app,
        &[fail(&done.order_id, "too late"), complete(&other.order_id)],
    )
    .await
    .unwrap();
    let completion = ("order.v1.OrderCompleted".to_owned(), String::new());
    assert_eq!(
        app.get(&done.order_id).await.unwrap().status(),
        pb::OrderStatus::Completed
    );
    assert_eq!(
        replies(&app, &done.order_id).await,
        [completion.clone(), completion.clone()],
        "the late failure answered with the order's real status"
    );
    assert_eq!(
        app.get(&other.order_id).await.unwrap().status(),
        pb::OrderStatus::Completed
    );
    assert_eq!(replies(&app, &other.order_id).await, [completion]);
    app.stop().await;
}
