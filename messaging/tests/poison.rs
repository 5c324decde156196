//! What must not wedge or flood the messaging: a message whose handling fails the same way
//! every time, an outbox row the broker refuses, and an inbox that would only grow.

mod common;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use messaging::consumer::dead_letter_headers;
use messaging::{Consumer, Handler, HandlerError, Incoming, MessageContext, Relay};
use proto::order::v1::CompleteOrder;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Headers as _, Message as _};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Every message on the reader's topic within `window` after the first: message id -> (times
/// seen, its dead-letter error header).
async fn read_for(reader: &StreamConsumer, window: Duration) -> HashMap<String, (usize, String)> {
    let mut seen: HashMap<String, (usize, String)> = HashMap::new();
    let mut deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(Ok(message)) = tokio::time::timeout_at(deadline.into(), reader.recv()).await {
        if seen.is_empty() {
            deadline = Instant::now() + window;
        }
        let headers = message.headers();
        let id = headers
            .map(messaging::envelope::from_headers)
            .unwrap_or_default()
            .message_id;
        let error = headers
            .and_then(|h| h.iter().find(|h| h.key == dead_letter_headers::ERROR))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let entry = seen.entry(id).or_default();
        entry.0 += 1;
        entry.1 = error;
    }
    seen
}

/// The messages dead-lettered from the test's topic, read as [`read_for`] does.
async fn dead_letters(setup: &Setup) -> HashMap<String, (usize, String)> {
    let dlq = proto::topics::dead_letter(&setup.kafka.topic(TOPIC));
    read_for(&reader(&setup.kafka, &dlq), Duration::from_secs(1)).await
}

/// Fails with a column decode error (as a bug in a query would) for the order "bug".
struct DecodeBug;

#[async_trait]
impl Handler for DecodeBug {
    async fn handle(
        &self,
        conn: &mut sqlx::PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let command: CompleteOrder = message.decode()?;
        if command.order_id == "bug" {
            let _: i64 = sqlx::query_scalar("SELECT 'not a number'::text")
                .fetch_one(&mut *conn)
                .await?;
        }
        sqlx::query("INSERT INTO effects (message_id, order_id) VALUES ($1, $2)")
            .bind(message.message_id()?)
            .bind(&command.order_id)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_database_error_that_repeats_dead_letters_its_message_and_the_rest_goes_on() {
    let setup = setup("poison_decode").await;
    let bug = Uuid::now_v7();
    send_complete(&setup.kafka, bug, "bug").await;
    send_complete(&setup.kafka, Uuid::now_v7(), "after").await;
    let consumer = start_consumer(&setup, "decode", DecodeBug);
    let relay = Relay::new(setup.pool.clone(), &setup.kafka).expect("relay");
    let relay_task = tokio::spawn(relay.run(consumer.cancel.clone()));

    let effects = wait_for_effects(&setup.pool, 1).await;
    assert_eq!(
        orders(&effects),
        ["after"],
        "the message after the failing one was handled"
    );
    let dead = dead_letters(&setup).await;
    let (count, error) = dead
        .get(&bug.to_string())
        .expect("the failing message dead-lettered");
    assert_eq!(*count, 1);
    assert!(error.contains("decod"), "{error}");
    consumer.stop().await;
    relay_task.await.expect("join");
}

/// After a refusal: reads what the relay publishes within 4 s of the first message, stops
/// it, and checks that each of `named` was published exactly once, `refused` never, and that
/// the outbox holds nothing (published rows deleted, the refused one parked).
async fn published_once_and_nothing_left<const N: usize>(
    setup: &Setup,
    (cancel, relay_task): (CancellationToken, tokio::task::JoinHandle<()>),
    named: [(&str, &messaging::OutboxMessage); N],
    refused: &messaging::OutboxMessage,
) {
    let published = read_for(
        &reader(&setup.kafka, &setup.kafka.topic(TOPIC)),
        Duration::from_secs(4),
    )
    .await;
    cancel.cancel();
    relay_task.await.expect("join");
    for (name, message) in named {
        assert_eq!(
            published.get(&message.envelope.message_id).map(|p| p.0),
            Some(1),
            "{name} published exactly once: {published:?}"
        );
    }
    assert!(!published.contains_key(&refused.envelope.message_id));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&setup.pool)
        .await
        .expect("outbox");
    assert_eq!(left, 0, "nothing left in the outbox");
}

#[tokio::test]
async fn an_outbox_row_the_broker_refuses_is_parked_and_the_rest_is_published_once() {
    let setup = setup("poison_outbox").await;
    let context = MessageContext::default();
    let saga = |n: u128| Uuid::from_u128(n);
    let first = setup.outbox.message(
        TOPIC,
        saga(1),
        &CompleteOrder {
            order_id: "first".into(),
        },
        &context,
    );
    // Far above the producer's message.max.bytes (1,000,000).
    let huge = setup.outbox.message(
        TOPIC,
        saga(2),
        &CompleteOrder {
            order_id: "x".repeat(2_000_000),
        },
        &context,
    );
    let after = setup.outbox.message(
        TOPIC,
        saga(1),
        &CompleteOrder {
            order_id: "after".into(),
        },
        &context,
    );
    let other = setup.outbox.message(
        TOPIC,
        saga(2),
        &CompleteOrder {
            order_id: "other".into(),
        },
        &context,
    );
    let mut tx = setup.pool.begin().await.expect("begin");
    setup
        .outbox
        .enqueue(&mut tx, &[first.clone(), huge.clone()])
        .await
        .expect("enqueue");
    // A row whose envelope no longer decodes (written by a broken release, say).
    let garbled = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (message_id, topic, message_key, message_type, envelope, payload) \
         VALUES ($1, $2, 'k', 'order.v1.CompleteOrder', '\\xffffffff'::bytea, '')",
    )
    .bind(garbled)
    .bind(setup.kafka.topic(TOPIC))
    .execute(&mut *tx)
    .await
    .expect("garbled row");
    setup
        .outbox
        .enqueue(&mut tx, &[after.clone(), other.clone()])
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let cancel = CancellationToken::new();
    let relay = Relay::new(setup.pool.clone(), &setup.kafka).expect("relay");
    let relay_task = tokio::spawn(relay.run(cancel.clone()));
    published_once_and_nothing_left(
        &setup,
        (cancel, relay_task),
        [("first", &first), ("after", &after), ("other", &other)],
        &huge,
    )
    .await;
    let parked: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT message_id, error FROM outbox_parked ORDER BY id")
            .fetch_all(&setup.pool)
            .await
            .expect("parked rows");
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert_eq!(parked[0].0.to_string(), huge.envelope.message_id);
    assert!(
        parked[0].1.to_lowercase().contains("size"),
        "{}",
        parked[0].1
    );
    assert_eq!(parked[1].0, garbled);
    assert!(parked[1].1.contains("envelope"), "{}", parked[1].1);
}

/// A message handed to the relay in memory that the broker refuses is not lost with the
/// hand-over: the relay reads the outbox, which parks it, and what was handed with it and after
/// it is published once.
#[tokio::test]
async fn a_handed_over_message_the_broker_refuses_is_parked_and_the_rest_is_published_once() {
    let setup = setup("poison_handed").await;
    let context = MessageContext::default();
    let message = |key: u128, body: String| {
        setup.outbox.message(
            TOPIC,
            Uuid::from_u128(key),
            &CompleteOrder { order_id: body },
            &context,
        )
    };
    // No poll: only the writers' hand-overs and what follows a refusal make it read. From
    // when it holds the publishing lock, its writers hand their messages over.
    let (cancel, relay_task) = relay_without_poll(&setup).await;
    let first = message(1, "first".into());
    // Far above the producer's message.max.bytes (1,000,000).
    let huge = message(2, "x".repeat(2_000_000));
    let after = message(1, "after".into());
    for batch in [vec![first.clone(), huge.clone()], vec![after.clone()]] {
        let mut tx = setup.pool.begin().await.expect("begin");
        let earlier = setup.outbox.record(&mut tx, &batch).await.expect("record");
        tx.commit().await.expect("commit");
        setup.outbox.committed_messages(batch, earlier);
    }
    published_once_and_nothing_left(
        &setup,
        (cancel, relay_task),
        [("first", &first), ("after", &after)],
        &huge,
    )
    .await;
    let parked: Vec<Uuid> = sqlx::query_scalar("SELECT message_id FROM outbox_parked")
        .fetch_all(&setup.pool)
        .await
        .expect("parked rows");
    let parked: Vec<String> = parked.iter().map(Uuid::to_string).collect();
    assert_eq!(
        parked,
        std::slice::from_ref(&huge.envelope.message_id),
        "the refused message parked"
    );
}

#[tokio::test]
async fn the_inbox_forgets_after_its_retention_and_an_older_redelivery_has_no_second_effect() {
    let setup = setup("inbox_retention").await;
    let retention = Duration::from_secs(3);
    let cancel = CancellationToken::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::new(
        &setup.kafka,
        "retention",
        &[TOPIC],
        setup.pool.clone(),
        setup.outbox.clone(),
    )
    .with_inbox_retention(retention);
    let task = tokio::spawn(consumer.run(Recorder::new(calls.clone()), cancel.clone()));
    let relay = Relay::new(setup.pool.clone(), &setup.kafka).expect("relay");
    let relay_task = tokio::spawn(relay.run(cancel.clone()));

    let old = Uuid::now_v7();
    send_complete(&setup.kafka, old, "a").await;
    assert_eq!(wait_for_effects(&setup.pool, 1).await.len(), 1);

    // The inbox does not keep it past the retention.
    wait_for_empty(&setup.pool, "inbox", Duration::from_secs(30)).await;
    // Redelivered now that the inbox forgot it: refused, not applied again.
    send_complete(&setup.kafka, old, "a").await;
    send_complete(&setup.kafka, Uuid::now_v7(), "b").await;
    let effects = wait_for_effects(&setup.pool, 2).await;
    assert_eq!(
        orders(&effects),
        ["a", "b"],
        "one effect of the redelivered message"
    );
    let dead = dead_letters(&setup).await;
    let (_, error) = dead
        .get(&old.to_string())
        .expect("the old redelivery dead-lettered");
    assert!(error.contains("retention"), "{error}");
    cancel.cancel();
    task.await.expect("join").expect("consumer");
    relay_task.await.expect("join");
}

/// Refuses every message with an error that quotes a NUL byte, as an error quoting a
/// message's content may.
struct RefusesQuotingNul;

#[async_trait]
impl Handler for RefusesQuotingNul {
    async fn handle(&self, _: &mut sqlx::PgConnection, _: &Incoming) -> Result<(), HandlerError> {
        Err(HandlerError::Permanent("refused: a\0b".into()))
    }
}

#[tokio::test]
async fn an_error_that_quotes_a_nul_byte_is_dead_lettered_all_the_same() {
    let setup = setup("poison_nul").await;
    let refused = Uuid::now_v7();
    send_complete(&setup.kafka, refused, "a").await;
    let consumer = start_consumer(&setup, "nul", RefusesQuotingNul);
    let relay = Relay::new(setup.pool.clone(), &setup.kafka).expect("relay");
    let relay_task = tokio::spawn(relay.run(consumer.cancel.clone()));
    let dead = dead_letters(&setup).await;
    let (count, error) = dead
        .get(&refused.to_string())
        .expect("the refused message dead-lettered");
    assert_eq!(*count, 1);
    assert_eq!(error, "refused: a\u{fffd}b");
    consumer.stop().await;
    relay_task.await.expect("join");
}
