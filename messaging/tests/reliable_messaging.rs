//! The outbox, the relay, the inbox and the consumer against the real PostgreSQL and broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use messaging::consumer::dead_letter_headers;
use messaging::envelope;
use messaging::{Handler, HandlerError, Incoming, MessageContext, Relay};
use proto::order::v1::CompleteOrder;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Headers as _, Message as _};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt as _;
use uuid::Uuid;

mod common;
use common::*;

#[tokio::test]
async fn a_message_delivered_twice_has_one_effect() {
    let setup = setup("msg_dup").await;
    let first = Uuid::now_v7();
    send_complete(&setup.kafka, first, "a").await;
    send_complete(&setup.kafka, first, "a").await;
    send_complete(&setup.kafka, Uuid::now_v7(), "b").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = start_consumer(&setup, "dup", Recorder::new(calls.clone()));
    let effects = wait_for_effects(&setup.pool, 2).await;
    // "b" was sent after the duplicate on the same partition, so the duplicate was seen.
    assert_eq!(orders(&effects), ["a", "b"]);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the duplicate never reached the handler"
    );
    consumer.stop().await;
}

#[tokio::test]
async fn a_transient_failure_is_retried_and_rolled_back() {
    let setup = setup("msg_retry").await;
    send_complete(&setup.kafka, Uuid::now_v7(), "a").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = start_consumer(
        &setup,
        "retry",
        Recorder {
            calls: calls.clone(),
            fail_first: 2,
        },
    );
    let effects = wait_for_effects(&setup.pool, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        effects.len(),
        1,
        "one effect after two failed attempts: {effects:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&setup.pool)
        .await
        .expect("inbox");
    assert_eq!(inbox, 1);
    consumer.stop().await;
}

#[tokio::test]
async fn an_unhandleable_message_goes_to_the_dead_letter_topic_and_the_rest_goes_on() {
    let setup = setup("msg_dlq").await;
    let bad = Uuid::now_v7();
    send_complete(&setup.kafka, Uuid::now_v7(), "a").await;
    send(&setup.kafka, bad, "order.v1.NoSuchThing", b"\x01\x02").await;
    send_complete(&setup.kafka, Uuid::now_v7(), "b").await;
    let consumer = start_consumer(&setup, "dlq", Recorder::new(Arc::default()));
    let effects = wait_for_effects(&setup.pool, 2).await;
    assert_eq!(orders(&effects), ["a", "b"]);

    let relay = Relay::new(setup.pool.clone(), &setup.kafka).expect("relay");
    assert_eq!(
        relay.publish_batch().await.expect("publish"),
        1,
        "one dead letter in the outbox"
    );
    let dlq = proto::topics::dead_letter(&setup.kafka.topic(TOPIC));
    let reader = reader(&setup.kafka, &dlq);
    let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
        .await
        .expect("a dead letter within 30 s")
        .expect("receive");
    let headers = message.headers().expect("headers");
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| panic!("header {name} missing"))
    };
    assert_eq!(envelope::from_headers(headers).message_id, bad.to_string());
    assert!(
        header(dead_letter_headers::ERROR).contains("unknown message type"),
        "{}",
        header(dead_letter_headers::ERROR)
    );
    assert_eq!(header(dead_letter_headers::TOPIC), setup.kafka.topic(TOPIC));
    assert_eq!(header(dead_letter_headers::OFFSET), "1");
    assert_eq!(message.payload(), Some(&b"\x01\x02"[..]));
    consumer.stop().await;
}

/// A consumer that stops before its transaction commits leaves the offset uncommitted: the
/// next member of the group gets the message again.
#[tokio::test]
async fn offsets_are_committed_only_after_the_transaction() {
    struct Stuck;
    #[async_trait]
    impl Handler for Stuck {
        async fn handle(
            &self,
            _: &mut sqlx::PgConnection,
            _: &Incoming,
        ) -> Result<(), HandlerError> {
            Err(HandlerError::Transient("never commits".into()))
        }
    }
    let setup = setup("msg_offsets").await;
    send_complete(&setup.kafka, Uuid::now_v7(), "a").await;
    let consumer = start_consumer(&setup, "offsets", Stuck);
    tokio::time::sleep(Duration::from_secs(3)).await;
    consumer.stop().await;

    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = start_consumer(&setup, "offsets", Recorder::new(calls));
    let effects = wait_for_effects(&setup.pool, 1).await;
    assert_eq!(
        effects.len(),
        1,
        "the message was redelivered to the next consumer"
    );
    consumer.stop().await;
}

/// The relay killed in the middle of publishing loses nothing: every message recorded in the
/// outbox reaches the topic at least once, and the outbox ends empty.
#[tokio::test]
async fn a_relay_killed_mid_batch_loses_nothing() {
    let setup = setup("msg_relay").await;
    const N: usize = 3000;
    let mut expected = HashSet::new();
    let mut tx = setup.pool.begin().await.expect("begin");
    let messages: Vec<_> = (0..N)
        .map(|i| {
            let m = setup.outbox.message(
                TOPIC,
                Uuid::now_v7(),
                &CompleteOrder {
                    order_id: i.to_string(),
                },
                &MessageContext::default(),
            );
            expected.insert(m.envelope.message_id.clone());
            m
        })
        .collect();
    setup
        .outbox
        .enqueue(&mut tx, &messages)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    // Kill the relay (abort its task: no clean shutdown) as soon as it has published part.
    let relay = Relay::new(setup.pool.clone(), &setup.kafka).expect("relay");
    let task = tokio::spawn(relay.run(CancellationToken::new()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&setup.pool)
            .await
            .expect("count");
        if (left as usize) < N || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    task.abort();
    let _ = task.await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&setup.pool)
        .await
        .expect("count");
    assert!(
        left > 0,
        "the relay was killed before it had published everything"
    );

    let cancel = CancellationToken::new();
    let relay = Relay::new(setup.pool.clone(), &setup.kafka).expect("relay");
    let task = tokio::spawn(relay.run(cancel.clone()));

    let reader = reader(&setup.kafka, &setup.kafka.topic(TOPIC));
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < N && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), reader.recv()).await {
            let envelope = envelope::from_headers(m.headers().expect("headers"));
            seen.insert(envelope.message_id);
        }
    }
    let missing: Vec<_> = expected.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} of {N} messages never published, e.g. {missing:?}",
        expected.len() - seen.len().min(expected.len())
    );
    // The relay deletes what it published once the broker acknowledged it, which may be a
    // moment after the reader saw the last message.
    wait_for_empty_outbox(&setup.pool, Duration::from_secs(10)).await;
    cancel.cancel();
    task.await.expect("relay");
}

/// One relay of a service publishes at a time; when it stops, a standby takes over, and every
/// message is published once, in the order of its key.
#[tokio::test]
async fn a_standby_relay_takes_over_and_each_key_keeps_its_order() {
    let setup = setup("relay_standby").await;
    let enqueue = |from: u32, to: u32| {
        let setup = &setup;
        async move {
            let messages: Vec<_> = (from..to)
                .map(|n| {
                    setup.outbox.message(
                        TOPIC,
                        Uuid::from_u128(u128::from(n % 3)),
                        &CompleteOrder {
                            order_id: n.to_string(),
                        },
                        &MessageContext::default(),
                    )
                })
                .collect();
            let mut tx = setup.pool.begin().await.expect("begin");
            setup
                .outbox
                .enqueue(&mut tx, &messages)
                .await
                .expect("enqueue");
            tx.commit().await.expect("commit");
        }
    };
    let first = CancellationToken::new();
    let first_task = tokio::spawn(
        Relay::new(setup.pool.clone(), &setup.kafka)
            .expect("relay")
            .run(first.clone()),
    );
    enqueue(0, 30).await;
    let reader = reader(&setup.kafka, &setup.kafka.topic(TOPIC));
    let mut seen: Vec<(String, u32)> = Vec::new();
    read_until(&reader, 30, &mut seen).await;
    // A standby, then the publisher stops: the standby takes the lock and goes on.
    let second = CancellationToken::new();
    let second_task = tokio::spawn(
        Relay::new(setup.pool.clone(), &setup.kafka)
            .expect("relay")
            .run(second.clone()),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.cancel();
    first_task.await.expect("join");
    enqueue(30, 60).await;
    read_until(&reader, 60, &mut seen).await;
    second.cancel();
    second_task.await.expect("join");

    let numbers: HashSet<u32> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(numbers.len(), 60, "each message published once: {seen:?}");
    for key in 0..3u128 {
        let key = Uuid::from_u128(key).to_string();
        let of_key: Vec<u32> = seen
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, n)| *n)
            .collect();
        let mut sorted = of_key.clone();
        sorted.sort_unstable();
        assert_eq!(of_key, sorted, "key {key} in order");
    }
}

/// Reads (key, order number) pairs until `seen` holds `count`.
async fn read_until(reader: &StreamConsumer, count: usize, seen: &mut Vec<(String, u32)>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < count {
        let message = tokio::time::timeout_at(deadline.into(), reader.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} published", seen.len()))
            .expect("receive");
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let order: CompleteOrder =
            prost::Message::decode(message.payload().unwrap_or_default()).expect("payload");
        seen.push((key, order.order_id.parse().expect("number")));
    }
}

/// Sends one `OrderCompleted` per handled message through the outbox, and fails transiently
/// once at the message of `fail_at` after sending it, so that the batch rolls back.
struct Replier {
    outbox: messaging::Outbox,
    fail_at: String,
    failed: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Handler for Replier {
    async fn handle(
        &self,
        conn: &mut sqlx::PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let command: CompleteOrder = message.decode()?;
        let order_id = Uuid::parse_str(&command.order_id).expect("order id");
        let reply = self.outbox.message(
            proto::topics::SAGA_REPLIES,
            order_id,
            &proto::order::v1::OrderCompleted {
                order_id: command.order_id.clone(),
            },
            &message.context(),
        );
        self.outbox.enqueue(conn, &[reply]).await?;
        if command.order_id == self.fail_at && !self.failed.swap(true, Ordering::SeqCst) {
            return Err(HandlerError::Transient("failing once after sending".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn what_a_batch_sends_is_recorded_once_in_order_and_not_at_all_when_it_rolls_back() {
    let setup = setup("msg_batch_outbox").await;
    let orders: Vec<String> = (0..5).map(|_| Uuid::now_v7().to_string()).collect();
    let duplicate = Uuid::now_v7();
    for (i, order) in orders.iter().enumerate() {
        let id = if i == 1 { duplicate } else { Uuid::now_v7() };
        send_complete(&setup.kafka, id, order).await;
        if i == 1 {
            // Delivered twice, in the same batch: one reply.
            send_complete(&setup.kafka, id, order).await;
        }
    }
    let consumer = start_consumer(
        &setup,
        "batch-outbox",
        Replier {
            outbox: setup.outbox.clone(),
            fail_at: orders[3].clone(),
            failed: Default::default(),
        },
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let replies = loop {
        let keys: Vec<String> = sqlx::query_scalar("SELECT message_key FROM outbox ORDER BY id")
            .fetch_all(&setup.pool)
            .await
            .expect("outbox");
        if keys.len() >= orders.len() || Instant::now() > deadline {
            break keys;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&setup.pool)
        .await
        .expect("outbox");
    assert_eq!(
        replies, orders,
        "one reply per message, in the order handled, none from the attempt rolled back"
    );
    assert_eq!(again, orders.len() as i64, "nothing recorded later");
    consumer.stop().await;
}

#[tokio::test]
async fn a_message_published_again_after_a_lost_relay_delete_has_one_effect() {
    // The relay's deletes commit without waiting for their WAL flush: a crash of PostgreSQL
    // can bring published rows back, and the relay publishes them again.
    let setup = setup("msg_republish").await;
    let messages: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|order| {
            setup.outbox.message(
                TOPIC,
                Uuid::now_v7(),
                &CompleteOrder {
                    order_id: order.to_owned(),
                },
                &MessageContext::default(),
            )
        })
        .collect();
    let record = |messages: Vec<messaging::OutboxMessage>| {
        let (pool, outbox) = (setup.pool.clone(), setup.outbox.clone());
        async move {
            let mut tx = pool.begin().await.expect("begin");
            outbox.enqueue(&mut tx, &messages).await.expect("enqueue");
            tx.commit().await.expect("commit");
            outbox.committed();
        }
    };
    let cancel = CancellationToken::new();
    let relay = Relay::for_outbox(setup.pool.clone(), &setup.outbox).expect("relay");
    let relay_task = tokio::spawn(relay.run(cancel.clone()));
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = start_consumer(&setup, "republish", Recorder::new(calls.clone()));
    record(messages.clone()).await;
    assert_eq!(wait_for_effects(&setup.pool, 3).await.len(), 3);
    wait_for_empty_outbox(&setup.pool, Duration::from_secs(30)).await;

    // The rows come back as they were (a lost delete), and are published a second time.
    record(messages).await;
    wait_for_empty_outbox(&setup.pool, Duration::from_secs(30)).await;
    // Time for the consumer to receive and skip them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let effects = wait_for_effects(&setup.pool, 3).await;
    assert_eq!(orders(&effects), ["a", "b", "c"], "one effect each");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the republished messages never reached the handler"
    );
    consumer.stop().await;
    cancel.cancel();
    relay_task.await.expect("relay");
}

/// The outbox is a queue: after each vacuum its statistics say it is empty, and a plan made
/// then (a sequential scan, cached for the session) would read every dead row left since,
/// which under load is most of the table. The relay's statements find their rows by the key
/// instead, whatever the statistics said when they were planned (the services' connections
/// prefer keys: `runtime::database::prefer_keys`).
#[tokio::test]
async fn the_relay_finds_its_rows_by_key_even_when_the_statistics_say_the_outbox_is_empty() {
    let setup = setup("relay_plan").await;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&setup.pool)
        .await
        .expect("vacuum");
    let cancel = CancellationToken::new();
    let relay = Relay::new(setup.pool.clone(), &setup.kafka).expect("relay");
    let task = tokio::spawn(relay.run(cancel.clone()));
    // The relay polls the empty table (four times a second), planning its read then.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Dead rows, as a busy service leaves between two vacuums: written and rolled back.
    let message = |i: usize| {
        setup.outbox.message(
            TOPIC,
            Uuid::now_v7(),
            &CompleteOrder {
                order_id: i.to_string(),
            },
            &MessageContext::default(),
        )
    };
    let mut tx = setup.pool.begin().await.expect("begin");
    let dead: Vec<_> = (0..5000).map(message).collect();
    setup.outbox.enqueue(&mut tx, &dead).await.expect("enqueue");
    tx.rollback().await.expect("rollback");
    // And one live row, read, published and deleted.
    let mut tx = setup.pool.begin().await.expect("begin");
    setup
        .outbox
        .enqueue(&mut tx, &[message(5000)])
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    wait_for_empty_outbox(&setup.pool, Duration::from_secs(10)).await;
    // Then only the relay reads the table: its poll (four times a second) and its backlog
    // gauge (a count, once a second). PostgreSQL's counters reach the view within a second or
    // so of each transaction, so they are read a while apart.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (seq_before, idx_before) = outbox_scans(&setup.pool).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (seq_after, idx_after) = outbox_scans(&setup.pool).await;
    let (seq, idx) = (seq_after - seq_before, idx_after - idx_before);
    assert!(
        idx >= 8,
        "the relay's polls in four seconds were {idx} index scans of the outbox"
    );
    assert!(
        seq <= 8,
        "{seq} sequential scans of the outbox in four seconds (the backlog gauge makes about four)"
    );
    cancel.cancel();
    task.await.expect("relay");
}

/// A service's statements are planned once per connection (the generic plan), never afresh at
/// each execution for its parameters (`runtime::database::prefer_keys`): PostgreSQL's default
/// plans the first five executions each for its own, and chooses per statement after that.
#[tokio::test]
async fn a_services_statements_are_planned_once_per_connection() {
    let setup = setup("generic_plans").await;
    let mut conn = setup.pool.acquire().await.expect("connection");
    for i in 0..8 {
        let message = setup.outbox.message(
            TOPIC,
            Uuid::now_v7(),
            &CompleteOrder {
                order_id: i.to_string(),
            },
            &MessageContext::default(),
        );
        setup
            .outbox
            .enqueue(&mut conn, &[message])
            .await
            .expect("enqueue");
    }
    let (generic, custom): (i64, i64) = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE 'WITH i AS (INSERT INTO outbox%'",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("the outbox insert, prepared on this connection");
    assert_eq!(
        (generic, custom),
        (8, 0),
        "eight executions of the outbox insert: (generic plans, custom plans)"
    );
}

/// Sequential and index scans of the outbox so far, by PostgreSQL's statistics.
async fn outbox_scans(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT COALESCE(seq_scan, 0), COALESCE(idx_scan, 0) FROM pg_stat_user_tables \
         WHERE relname = 'outbox'",
    )
    .fetch_one(pool)
    .await
    .expect("statistics")
}

/// The relay deletes a batch the broker acknowledged with its next read of the outbox (one
/// round trip a batch), and before it stops (and a moment after, on its own: the next test).
#[tokio::test]
async fn a_relay_deletes_what_was_acknowledged_with_its_next_read_and_before_it_stops() {
    let setup = setup("relay_ack").await;
    let record = |order: &str| {
        let message = setup.outbox.message(
            TOPIC,
            Uuid::now_v7(),
            &CompleteOrder {
                order_id: order.to_owned(),
            },
            &MessageContext::default(),
        );
        let (pool, outbox) = (setup.pool.clone(), setup.outbox.clone());
        async move {
            let mut tx = pool.begin().await.expect("begin");
            outbox.enqueue(&mut tx, &[message]).await.expect("enqueue");
            tx.commit().await.expect("commit");
            outbox.committed();
        }
    };
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT id FROM outbox ORDER BY id")
            .fetch_all(&setup.pool)
            .await
            .expect("outbox")
    };
    let reader = reader(&setup.kafka, &setup.kafka.topic(TOPIC));
    let mut seen = Vec::new();
    let cancel = CancellationToken::new();
    // Woken by its writers' commits only: no poll during the test, and no delete on its own.
    let relay = Relay::for_outbox(setup.pool.clone(), &setup.outbox)
        .expect("relay")
        .with_poll_interval(Duration::from_secs(3600))
        .with_delete_after(Duration::from_secs(3600));
    let task = tokio::spawn(relay.run(cancel.clone()));
    // Time to take the publishing lock.
    tokio::time::sleep(Duration::from_secs(1)).await;

    record("1").await;
    let first = rows().await;
    read_until(&reader, 1, &mut seen).await;
    record("2").await;
    let second: Vec<i64> = rows()
        .await
        .into_iter()
        .filter(|id| !first.contains(id))
        .collect();
    read_until(&reader, 2, &mut seen).await;
    // The read of "2" deleted "1", which the broker had acknowledged; "2" waits for the next.
    test_support::eventually(Duration::from_secs(10), "the first row deleted", || async {
        let left = rows().await;
        (!left.iter().any(|id| first.contains(id))).then_some(())
    })
    .await;
    assert_eq!(
        rows().await,
        second,
        "published and acknowledged, deleted with the next read"
    );

    cancel.cancel();
    task.await.expect("relay");
    assert_eq!(
        rows().await,
        Vec::<i64>::new(),
        "a stopped relay left acknowledged rows behind"
    );
}

/// A writer that hands its committed messages to its process's relay
/// (`Outbox::committed_messages`) has them published without the relay reading the outbox
/// back: no read between the commit and the broker, and the rows deleted a moment later, in
/// one statement, with no read either.
#[tokio::test]
async fn a_message_handed_to_the_relay_is_published_without_reading_the_outbox() {
    let setup = setup("relay_handed").await;
    let reader = reader(&setup.kafka, &setup.kafka.topic(TOPIC));
    let mut seen = Vec::new();
    let (cancel, task) = relay_without_poll(&setup).await;

    let ((), statements) = test_support::statements_of(&setup.pool, async {
        for n in 1..=3u32 {
            let message = numbered(&setup, 7, n);
            let earlier = record_committed(&setup, &message).await;
            setup.outbox.committed_messages([message], earlier);
            read_until(&reader, n as usize, &mut seen).await;
        }
        wait_for_empty_outbox(&setup.pool, Duration::from_secs(10)).await;
    })
    .await;
    let numbers: Vec<u32> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(numbers, [1, 2, 3], "published once each, in order");
    let relay_reads: Vec<_> = statements
        .iter()
        .filter(|(q, _)| q.contains("FROM outbox WHERE id <> ALL"))
        .collect();
    assert!(
        relay_reads.is_empty(),
        "the relay read back what was handed to it: {statements:#?}"
    );
    let deletes: i64 = statements
        .iter()
        .filter(|(q, _)| q.starts_with("DELETE FROM outbox"))
        .map(|(_, calls)| calls)
        .sum();
    assert!(
        (1..=3).contains(&deletes),
        "the acknowledged rows deleted in {deletes} statements: {statements:#?}"
    );
    cancel.cancel();
    task.await.expect("relay");
}

/// A message a writer hands over is published after the rows committed before it that were
/// not handed over (a timer's step, a dead letter: `Outbox::committed`), which the relay
/// reads from the outbox first, as a relay that only reads would (by the outbox's order).
#[tokio::test]
async fn what_is_handed_to_the_relay_waits_for_the_rows_committed_before_it() {
    let setup = setup("relay_handed_order").await;
    let reader = reader(&setup.kafka, &setup.kafka.topic(TOPIC));
    let mut seen = Vec::new();
    let (cancel, task) = relay_without_poll(&setup).await;
    let message = |n: u32| numbered(&setup, 9, n);
    for round in 0..5u32 {
        let (unread, handed) = (message(2 * round + 1), message(2 * round + 2));
        // Both committed before the relay runs again (this test's runtime has one thread, and
        // nothing below waits), the first not handed over.
        let mut first = setup.pool.begin().await.expect("begin");
        setup
            .outbox
            .enqueue(&mut first, std::slice::from_ref(&unread))
            .await
            .expect("enqueue");
        let mut second = setup.pool.begin().await.expect("begin");
        setup
            .outbox
            .enqueue(&mut second, std::slice::from_ref(&handed))
            .await
            .expect("enqueue");
        first.commit().await.expect("commit");
        second.commit().await.expect("commit");
        setup.outbox.committed();
        setup.outbox.committed_messages([handed], Vec::new());
        read_until(&reader, 2 * round as usize + 2, &mut seen).await;
    }
    let numbers: Vec<u32> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(
        numbers,
        (1..=10).collect::<Vec<_>>(),
        "published once each, in order"
    );
    cancel.cancel();
    task.await.expect("relay");
}

/// A writer whose statement finds a row of its message's key in the outbox that the relay has
/// not published (another replica's, whose notification has not arrived: here, none is sent)
/// hands its message over behind it: the relay reads the outbox and publishes that row first.
/// A message caused by another's effects is never published before it, whichever replica
/// wrote either.
#[tokio::test]
async fn a_message_handed_over_is_published_after_the_rows_of_its_key_its_writer_found() {
    let setup = setup("relay_handed_after").await;
    let reader = reader(&setup.kafka, &setup.kafka.topic(TOPIC));
    let mut seen = Vec::new();
    let (cancel, task) = relay_without_poll(&setup).await;
    let message = |key: u128, n: u32| numbered(&setup, key, n);
    for round in 0..3u32 {
        let (first, second) = (2 * round + 1, 2 * round + 2);
        // Another replica's row, committed with no wake-up for this relay.
        let theirs = [message(11, first)];
        let rows = messaging::OutboxRows::new(&theirs).expect("rows");
        rows.bind(sqlx::query(&messaging::OutboxRows::insert_sql(1, None)))
            .execute(&setup.pool)
            .await
            .expect("another replica's row");
        // This process's writer, after it: its statement finds that row.
        let ours = message(11, second);
        let earlier = record_committed(&setup, &ours).await;
        assert!(
            !earlier.is_empty(),
            "the writer's statement did not find the other replica's row"
        );
        setup.outbox.committed_messages([ours], earlier);
        read_until(&reader, second as usize, &mut seen).await;
    }
    let numbers: Vec<u32> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(
        numbers,
        (1..=6).collect::<Vec<_>>(),
        "published once each, in order"
    );
    cancel.cancel();
    task.await.expect("relay");
}

/// A message handed over after a read of the outbox published it (the read came first: a
/// notification, a poll) is not published again, and makes no empty batch either: no
/// `outbox.publish` span, publish sample or log line for nothing.
#[tokio::test]
async fn a_message_handed_over_after_a_read_published_it_makes_no_empty_batch() {
    // This test's runtime has one thread, which runs the relay's task: it sees its spans.
    let spans = PublishSpans::default();
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let setup = setup("relay_handed_read").await;
    let reader = reader(&setup.kafka, &setup.kafka.topic(TOPIC));
    let mut seen = Vec::new();
    let (cancel, task) = relay_without_poll(&setup).await;

    let first = numbered(&setup, 13, 1);
    let earlier = record_committed(&setup, &first).await;
    setup.outbox.committed();
    read_until(&reader, 1, &mut seen).await;
    setup.outbox.committed_messages([first], earlier);
    // The relay takes that hand-over alone, before the next one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = numbered(&setup, 13, 2);
    let earlier = record_committed(&setup, &second).await;
    setup.outbox.committed_messages([second], earlier);
    read_until(&reader, 2, &mut seen).await;

    let numbers: Vec<u32> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(numbers, [1, 2], "published once each, in order");
    assert_eq!(
        spans.message_counts(),
        [1, 1],
        "the relay's publish spans, by the messages each sent"
    );
    cancel.cancel();
    task.await.expect("relay");
}

/// The messages each `outbox.publish` span opened names (`messaging.batch.message_count`).
#[derive(Clone, Default)]
struct PublishSpans(Arc<std::sync::Mutex<Vec<u64>>>);

impl PublishSpans {
    fn message_counts(&self) -> Vec<u64> {
        self.0.lock().expect("spans").clone()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PublishSpans {
    fn on_new_span(
        &self,
        attributes: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Count(Option<u64>);
        impl tracing::field::Visit for Count {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "messaging.batch.message_count" {
                    self.0 = Some(value);
                }
            }
            fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
                self.record_u64(field, value.try_into().unwrap_or(u64::MAX));
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        if attributes.metadata().name() == "outbox.publish" {
            let mut count = Count(None);
            attributes.record(&mut count);
            self.0
                .lock()
                .expect("spans")
                .push(count.0.unwrap_or(u64::MAX));
        }
    }
}

/// Records `message` in the outbox in a transaction of its own, committed, as a writer does
/// before it hands the message over; returns the rows of its key the statement found there.
async fn record_committed(setup: &Setup, message: &messaging::OutboxMessage) -> Vec<Uuid> {
    let mut tx = setup.pool.begin().await.expect("begin");
    let earlier = setup
        .outbox
        .record(&mut tx, std::slice::from_ref(message))
        .await
        .expect("record");
    tx.commit().await.expect("commit");
    earlier
}

/// A message of `TOPIC` keyed by `key`, numbered `n` (`read_until` reads the number back).
fn numbered(setup: &Setup, key: u128, n: u32) -> messaging::OutboxMessage {
    setup.outbox.message(
        TOPIC,
        Uuid::from_u128(key),
        &CompleteOrder {
            order_id: n.to_string(),
        },
        &MessageContext::default(),
    )
}
