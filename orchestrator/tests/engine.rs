//! The orchestrator's engine against the real PostgreSQL: sagas started once, transitions saved
//! with their history and commands, optimistic concurrency, and durable deadline timers.

use std::time::Duration;

use messaging::{HandlerError, KafkaArgs, MessageContext, Outbox};
use orchestrator::engine::{Engine, Timing, Trigger};
use orchestrator::saga::{Input, Line, OrderDetails, SagaState};
use orchestrator::{store, timers};
use sqlx::PgPool;
use uuid::Uuid;

fn kafka() -> KafkaArgs {
    // Only used to name topics: these tests call the engine directly, without a broker.
    KafkaArgs {
        brokers: "unused:9092".into(),
        topic_prefix: String::new(),
        partitions: 1,
        fetch_wait_max_ms: 500,
        session_timeout_ms: 6000,
        group_instance_id: None,
        linger_ms: 1,
        batch_max: 16,
        batch_linger_ms: 0,
    }
}

async fn setup(deadline: Duration) -> (PgPool, Engine) {
    let url = test_support::fresh_database("orchestrator").await;
    let pool =
        runtime::database::connect(&url, 4, &[&messaging::MIGRATOR, &orchestrator::MIGRATOR])
            .await
            .expect("migrate");
    (
        pool,
        Engine::new(
            Outbox::new("orchestrator", kafka()),
            Timing {
                payment_deadline: deadline,
                step_timeout: Duration::from_secs(30),
                step_max_attempts: 3,
            },
        ),
    )
}

fn created() -> Input {
    Input::OrderCreated {
        order: OrderDetails {
            customer_id: "c-1".into(),
            lines: vec![Line {
                sku: "SKU-MOUSE".into(),
                quantity: 2,
                unit_price_cents: 2900,
            }],
            total_cents: 5800,
            currency: "USD".into(),
            payment_method: "pm_card_visa".into(),
        },
    }
}

fn trigger(message_type: &str) -> Trigger {
    Trigger {
        message_id: Uuid::now_v7().to_string(),
        message_type: message_type.to_owned(),
        context: Some(MessageContext {
            correlation_id: "corr-1".into(),
            ..Default::default()
        }),
    }
}

async fn step(
    pool: &PgPool,
    engine: &Engine,
    order_id: Uuid,
    input: Input,
) -> Result<Option<SagaState>, HandlerError> {
    let mut tx = pool.begin().await.expect("begin");
    let saga = engine
        .step(&mut tx, order_id, &input, &trigger(input.name()))
        .await?;
    tx.commit().await.expect("commit");
    Ok(saga.map(|s| s.state))
}

async fn timer_kinds(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM saga_timers ORDER BY kind")
        .fetch_all(pool)
        .await
        .expect("timers")
}

async fn outbox_types(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT topic, message_type FROM outbox ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("outbox")
}

#[tokio::test]
async fn the_happy_path_sends_each_command_once_and_records_the_history() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let order_id = Uuid::now_v7();
    assert_eq!(
        step(&pool, &engine, order_id, created())
            .await
            .expect("start"),
        Some(SagaState::Reserving)
    );
    // The same event again (another message id): the saga starts once.
    assert_eq!(
        step(&pool, &engine, order_id, created())
            .await
            .expect("again"),
        None
    );
    assert_eq!(
        timer_kinds(&pool).await,
        ["payment_deadline", "step"],
        "the payment deadline and the reservation's step timer are armed"
    );

    let steps = [
        (
            Input::InventoryReserved {
                reservation_id: Uuid::now_v7(),
            },
            SagaState::Charging,
        ),
        (
            Input::PaymentInitiated {
                payment_id: Uuid::now_v7(),
            },
            SagaState::AwaitingVerification,
        ),
        (
            Input::PaymentSucceeded {
                payment_id: Uuid::now_v7(),
            },
            SagaState::Committing,
        ),
        (Input::InventoryCommitted, SagaState::Completing),
        (Input::OrderCompleted, SagaState::Completed),
    ];
    for (input, expected) in steps {
        assert_eq!(
            step(&pool, &engine, order_id, input).await.expect("step"),
            Some(expected)
        );
    }
    assert_eq!(
        outbox_types(&pool).await,
        [
            ("inventory.commands", "inventory.v1.ReserveInventory"),
            ("payment.commands", "payment.v1.ChargePayment"),
            ("order.commands", "order.v1.MarkPaymentInitiated"),
            ("inventory.commands", "inventory.v1.CommitInventory"),
            ("order.commands", "order.v1.CompleteOrder"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let timers: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_timers")
        .fetch_one(&pool)
        .await
        .expect("timers");
    assert_eq!(
        timers, 0,
        "the deadline is cancelled once the payment succeeded"
    );
    let history: Vec<(Option<String>, String, String, String)> =
        sqlx::query_as("SELECT from_state, to_state, input, correlation_id FROM saga_history WHERE saga_id = $1 ORDER BY version")
            .bind(order_id)
            .fetch_all(&pool)
            .await
            .expect("history");
    let transitions: Vec<_> = history
        .iter()
        .map(|h| (h.0.as_deref().unwrap_or("-"), h.1.as_str()))
        .collect();
    assert_eq!(
        transitions,
        [
            ("-", "RESERVING"),
            ("RESERVING", "CHARGING"),
            ("CHARGING", "AWAITING_VERIFICATION"),
            ("AWAITING_VERIFICATION", "COMMITTING"),
            ("COMMITTING", "COMPLETING"),
            ("COMPLETING", "COMPLETED"),
        ]
    );
    assert!(
        history.iter().all(|h| h.3 == "corr-1"),
        "the correlation id is kept: {history:?}"
    );
    // A late reply changes nothing and sends nothing.
    assert_eq!(
        step(&pool, &engine, order_id, Input::InventoryReleased)
            .await
            .expect("late"),
        None
    );
    assert_eq!(outbox_types(&pool).await.len(), 5);
}

#[tokio::test]
async fn the_charge_names_the_orders_customer_for_payment_svc_to_check() {
    use prost::Message as _;

    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let order_id = Uuid::now_v7();
    step(&pool, &engine, order_id, created())
        .await
        .expect("start");
    let reserved = Input::InventoryReserved {
        reservation_id: Uuid::now_v7(),
    };
    step(&pool, &engine, order_id, reserved)
        .await
        .expect("reserved");
    let payload: Vec<u8> = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE message_type = 'payment.v1.ChargePayment'",
    )
    .fetch_one(&pool)
    .await
    .expect("one ChargePayment");
    let charge = proto::payment::v1::ChargePayment::decode(payload.as_slice()).expect("decodes");
    assert_eq!(
        charge,
        proto::payment::v1::ChargePayment {
            order_id: order_id.to_string(),
            amount_cents: 5800,
            currency: "USD".into(),
            payment_method: "pm_card_visa".into(),
            customer_id: "c-1".into(),
        }
    );
}

#[tokio::test]
async fn a_concurrent_writer_makes_the_other_retry() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let order_id = Uuid::now_v7();
    step(&pool, &engine, order_id, created())
        .await
        .expect("start");

    // Two transactions read version 1; the first to save wins, the other gets a conflict.
    let mut first = pool.begin().await.expect("begin");
    let mut second = pool.begin().await.expect("begin");
    let reserved = Input::InventoryReserved {
        reservation_id: Uuid::now_v7(),
    };
    engine
        .step(&mut first, order_id, &reserved, &trigger("a"))
        .await
        .expect("first");
    let racing = tokio::spawn({
        let engine = engine.clone();
        async move {
            let failed = Input::InventoryReservationFailed {
                reason: "out of stock".into(),
            };
            let result = engine
                .step(&mut second, order_id, &failed, &trigger("b"))
                .await;
            (result, second)
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.commit().await.expect("commit");
    let (result, second) = racing.await.expect("join");
    assert!(
        matches!(result, Err(HandlerError::Transient(_))),
        "{result:?}"
    );
    second.rollback().await.expect("rollback");
    let saga = store::load(&mut pool.acquire().await.expect("conn"), order_id)
        .await
        .expect("load")
        .expect("saga");
    assert_eq!(saga.saga.state, SagaState::Charging);
    assert_eq!(saga.version, 2);
}

#[tokio::test]
async fn a_passed_deadline_voids_the_payment_and_releases_the_stock() {
    let (pool, engine) = setup(Duration::ZERO).await;
    let order_id = Uuid::now_v7();
    step(&pool, &engine, order_id, created())
        .await
        .expect("start");
    step(
        &pool,
        &engine,
        order_id,
        Input::InventoryReserved {
            reservation_id: Uuid::now_v7(),
        },
    )
    .await
    .expect("reserved");
    step(
        &pool,
        &engine,
        order_id,
        Input::PaymentInitiated {
            payment_id: Uuid::now_v7(),
        },
    )
    .await
    .expect("initiated");

    assert_eq!(timers::fire_due(&pool, &engine).await.expect("fire"), 1);
    assert_eq!(
        timers::fire_due(&pool, &engine).await.expect("fire again"),
        0,
        "a timer fires once"
    );
    let types: Vec<String> = outbox_types(&pool)
        .await
        .into_iter()
        .map(|t| t.1)
        .skip(3)
        .collect();
    assert_eq!(
        types,
        ["payment.v1.VoidPayment", "inventory.v1.ReleaseInventory"]
    );

    step(&pool, &engine, order_id, Input::PaymentVoided)
        .await
        .expect("voided");
    assert_eq!(
        step(&pool, &engine, order_id, Input::InventoryReleased)
            .await
            .expect("released"),
        Some(SagaState::Failing)
    );
    let last: String =
        sqlx::query_scalar("SELECT message_type FROM outbox ORDER BY id DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("outbox");
    assert_eq!(last, "order.v1.FailOrder");
    assert_eq!(
        step(
            &pool,
            &engine,
            order_id,
            Input::OrderFailed {
                reason: "payment not verified before the deadline".into()
            }
        )
        .await
        .expect("confirmed"),
        Some(SagaState::Failed)
    );
}

#[tokio::test]
async fn an_unanswered_step_is_sent_again_and_flagged_for_an_operator_after_the_limit() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let order_id = Uuid::now_v7();
    step(&pool, &engine, order_id, created())
        .await
        .expect("start");
    // The inventory service does not answer: the step timer fires (made due here).
    for attempt in 1..=3 {
        sqlx::query("UPDATE saga_timers SET fire_at = now() WHERE kind = 'step'")
            .execute(&pool)
            .await
            .expect("due");
        assert_eq!(timers::fire_due(&pool, &engine).await.expect("fire"), 1);
        let (needs_operator, last_error): (bool, Option<String>) =
            sqlx::query_as("SELECT needs_operator, last_error FROM sagas WHERE saga_id = $1")
                .bind(order_id)
                .fetch_one(&pool)
                .await
                .expect("saga");
        assert_eq!(needs_operator, attempt >= 3, "attempt {attempt}");
        if attempt >= 3 {
            assert!(last_error
                .unwrap_or_default()
                .contains("RESERVING not answered after 3 attempts"));
        }
    }
    let reserves = outbox_types(&pool)
        .await
        .into_iter()
        .filter(|t| t.1 == "inventory.v1.ReserveInventory")
        .count();
    assert_eq!(reserves, 4, "the first send and three attempts");
    assert_eq!(
        timer_kinds(&pool).await,
        ["payment_deadline", "step"],
        "it keeps retrying"
    );

    // The service answers at last: the saga moves on, still flagged (an operator was asked to
    // look) until an operator's request or the saga's end clears it.
    step(
        &pool,
        &engine,
        order_id,
        Input::InventoryReserved {
            reservation_id: Uuid::now_v7(),
        },
    )
    .await
    .expect("reserved");
    let needs_operator: bool =
        sqlx::query_scalar("SELECT needs_operator FROM sagas WHERE saga_id = $1")
            .bind(order_id)
            .fetch_one(&pool)
            .await
            .expect("saga");
    assert!(needs_operator);
}

/// The commands a saga sends and where it ends, for a sequence of inputs.
async fn run(inputs: &[Input]) -> (Option<SagaState>, Vec<(String, String)>) {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let order_id = Uuid::now_v7();
    let mut last = None;
    for input in inputs {
        if let Some(state) = step(&pool, &engine, order_id, input.clone())
            .await
            .expect("step")
        {
            last = Some(state);
        }
    }
    (last, outbox_types(&pool).await)
}

#[tokio::test]
async fn every_message_delivered_twice_and_replies_reordered_give_the_same_end() {
    let reservation_id = Uuid::now_v7();
    let payment_id = Uuid::now_v7();
    let happy = [
        created(),
        Input::InventoryReserved { reservation_id },
        Input::PaymentInitiated { payment_id },
        Input::PaymentSucceeded { payment_id },
        Input::InventoryCommitted,
        Input::OrderCompleted,
    ];
    let twice: Vec<Input> = happy.iter().flat_map(|i| [i.clone(), i.clone()]).collect();
    assert_eq!(run(&happy).await, run(&twice).await);
    assert_eq!(run(&happy).await.0, Some(SagaState::Completed));

    // A commit that fails: the refund and the release may be confirmed in either order.
    let commit_fails = |first: Input, second: Input| {
        vec![
            created(),
            Input::InventoryReserved { reservation_id },
            Input::PaymentInitiated { payment_id },
            Input::PaymentSucceeded { payment_id },
            Input::InventoryCommitFailed {
                reason: "reservation expired".into(),
            },
            first,
            second,
            Input::OrderFailed {
                reason: "inventory commit failed: reservation expired".into(),
            },
        ]
    };
    let in_order = commit_fails(Input::PaymentRefunded, Input::InventoryReleased);
    let reordered = commit_fails(Input::InventoryReleased, Input::PaymentRefunded);
    let reordered_twice: Vec<Input> = reordered
        .iter()
        .flat_map(|i| [i.clone(), i.clone()])
        .collect();
    let single = run(&in_order).await;
    assert_eq!(single.0, Some(SagaState::Failed));
    assert_eq!(single, run(&reordered).await);
    assert_eq!(single, run(&reordered_twice).await);
}

async fn operator_flag(pool: &PgPool, order_id: Uuid) -> (bool, Option<String>) {
    sqlx::query_as("SELECT needs_operator, last_error FROM sagas WHERE saga_id = $1")
        .bind(order_id)
        .fetch_one(pool)
        .await
        .expect("saga")
}

async fn flag(pool: &PgPool, order_id: Uuid, error: &str) {
    let mut conn = pool.acquire().await.expect("conn");
    store::flag_for_operator(&mut conn, order_id, error)
        .await
        .expect("flag");
}

#[tokio::test]
async fn an_operator_flag_stays_until_an_operator_retries_or_the_saga_ends() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let order_id = Uuid::now_v7();
    step(&pool, &engine, order_id, created())
        .await
        .expect("start");
    // A reply of this saga was dead-lettered (as the consumer's on_dead_letter flags it).
    let error = "inventory.v1.InventoryReserved dead-lettered: undecodable";
    flag(&pool, order_id, error).await;

    // The step timer sends the reservation again, once, below the attempts' limit (3).
    sqlx::query("UPDATE saga_timers SET fire_at = now() WHERE kind = 'step'")
        .execute(&pool)
        .await
        .expect("due");
    assert_eq!(timers::fire_due(&pool, &engine).await.expect("fire"), 1);
    assert_eq!(
        operator_flag(&pool, order_id).await,
        (true, Some(error.to_owned())),
        "a step retry keeps the flag and its error"
    );
    // A reply moves the saga on: still flagged, nobody has looked at it.
    step(
        &pool,
        &engine,
        order_id,
        Input::InventoryReserved {
            reservation_id: Uuid::now_v7(),
        },
    )
    .await
    .expect("reserved");
    assert!(operator_flag(&pool, order_id).await.0);
    // An operator's retry clears it (the error stays, for the record).
    step(&pool, &engine, order_id, Input::Retry)
        .await
        .expect("retry");
    assert_eq!(
        operator_flag(&pool, order_id).await,
        (false, Some(error.to_owned()))
    );

    // Flagged again, then aborted by an operator: cleared.
    flag(&pool, order_id, error).await;
    step(
        &pool,
        &engine,
        order_id,
        Input::Abort {
            reason: "looked at it".into(),
        },
    )
    .await
    .expect("abort");
    assert!(!operator_flag(&pool, order_id).await.0);

    // Flagged while compensating, kept by a confirmation, cleared when the saga ends.
    flag(&pool, order_id, error).await;
    step(&pool, &engine, order_id, Input::PaymentVoided)
        .await
        .expect("voided");
    assert!(operator_flag(&pool, order_id).await.0);
    step(&pool, &engine, order_id, Input::InventoryReleased)
        .await
        .expect("released");
    assert!(operator_flag(&pool, order_id).await.0);
    let end = step(
        &pool,
        &engine,
        order_id,
        Input::OrderFailed {
            reason: "aborted".into(),
        },
    )
    .await
    .expect("confirmed");
    assert_eq!(end, Some(SagaState::Failed));
    assert!(!operator_flag(&pool, order_id).await.0, "the end clears it");
}

#[tokio::test]
async fn a_timer_that_fails_is_set_aside_with_backoff_and_flagged_while_the_others_fire() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let broken = Uuid::now_v7();
    let healthy = Uuid::now_v7();
    for id in [broken, healthy] {
        step(&pool, &engine, id, created()).await.expect("start");
    }
    // The broken saga's data no longer decodes (written by a newer release, say); its step
    // timer is due first, then the healthy one's.
    sqlx::query("UPDATE sagas SET data = '{\"order_id\": 1}' WHERE saga_id = $1")
        .bind(broken)
        .execute(&pool)
        .await
        .expect("corrupt");
    sqlx::query(
        "UPDATE saga_timers SET fire_at = now() - CASE WHEN saga_id = $1 THEN interval '2 seconds' ELSE interval '1 second' END \
         WHERE kind = 'step'",
    )
    .bind(broken)
    .execute(&pool)
    .await
    .expect("due");

    let fired = timers::fire_due(&pool, &engine).await;
    assert_eq!(fired.ok(), Some(1), "the healthy saga's timer fires");
    let healthy_saga = store::load(&mut pool.acquire().await.expect("conn"), healthy)
        .await
        .expect("load")
        .expect("saga");
    assert_eq!(
        healthy_saga.saga.attempts, 1,
        "its reservation was sent again"
    );

    // The failing timer is kept, pushed back, and its saga flagged with the error.
    let (fire_at_in_future, failures): (bool, i32) = sqlx::query_as(
        "SELECT fire_at > now(), failures FROM saga_timers WHERE saga_id = $1 AND kind = 'step'",
    )
    .bind(broken)
    .fetch_one(&pool)
    .await
    .expect("the failing timer is kept");
    assert!(fire_at_in_future, "retried later, not at once");
    assert_eq!(failures, 1);
    let (needs_operator, last_error) = operator_flag(&pool, broken).await;
    assert!(needs_operator);
    let last_error = last_error.unwrap_or_default();
    assert!(
        last_error.contains("step timer") && last_error.contains("unreadable data"),
        "{last_error}"
    );
    // It does not come first again: nothing else is due, nothing fires.
    assert_eq!(timers::fire_due(&pool, &engine).await.expect("again"), 0);

    // Once due again it fails again, and waits longer.
    let first_delay: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM fire_at - now())::float8 FROM saga_timers WHERE saga_id = $1 AND kind = 'step'",
    )
    .bind(broken)
    .fetch_one(&pool)
    .await
    .expect("delay");
    sqlx::query("UPDATE saga_timers SET fire_at = now() WHERE saga_id = $1")
        .bind(broken)
        .execute(&pool)
        .await
        .expect("due");
    assert_eq!(timers::fire_due(&pool, &engine).await.expect("again"), 0);
    let (second_delay, failures): (f64, i32) = sqlx::query_as(
        "SELECT extract(epoch FROM fire_at - now())::float8, failures FROM saga_timers WHERE saga_id = $1 AND kind = 'step'",
    )
    .bind(broken)
    .fetch_one(&pool)
    .await
    .expect("delay");
    assert_eq!(failures, 2);
    assert!(
        second_delay > first_delay,
        "backoff: {first_delay} s, then {second_delay} s"
    );
}

#[tokio::test]
async fn the_deadline_racing_a_verification_takes_the_locks_in_one_order() {
    // The deadline is due at once: the timer races the payment's success.
    let (pool, engine) = setup(Duration::ZERO).await;
    let order_id = Uuid::now_v7();
    step(&pool, &engine, order_id, created())
        .await
        .expect("start");
    for input in [
        Input::InventoryReserved {
            reservation_id: Uuid::now_v7(),
        },
        Input::PaymentInitiated {
            payment_id: Uuid::now_v7(),
        },
    ] {
        step(&pool, &engine, order_id, input).await.expect("step");
    }
    let version: i64 = sqlx::query_scalar("SELECT version FROM sagas WHERE saga_id = $1")
        .bind(order_id)
        .fetch_one(&pool)
        .await
        .expect("version");

    // A holder makes the consumer's step pause between its saga update and its timer
    // writes, as a slow network would: it inserts, uncommitted, the history row the step
    // will insert, so the step waits on it after locking the saga row.
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO saga_history (saga_id, version, to_state, input, message_id, message_type, commands) \
         VALUES ($1, $2, 'X', 'X', 'X', 'X', '[]')",
    )
    .bind(order_id)
    .bind(version + 1)
    .execute(&mut *holder)
    .await
    .expect("hold");
    let verified = tokio::spawn({
        let (pool, engine) = (pool.clone(), engine.clone());
        async move {
            let mut tx = pool.begin().await.expect("begin");
            let input = Input::PaymentSucceeded {
                payment_id: Uuid::now_v7(),
            };
            engine
                .step(&mut tx, order_id, &input, &trigger("PaymentSucceeded"))
                .await?;
            tx.commit().await.map_err(HandlerError::from)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The deadline fires meanwhile.
    let deadline = tokio::spawn({
        let (pool, engine) = (pool.clone(), engine.clone());
        async move { timers::fire_due(&pool, &engine).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The timer must not wait for the saga the step holds while it holds the saga's timer
    // rows, which the step needs next: that is the deadlock (PostgreSQL breaks it after
    // deadlock_timeout, and a timer that lost it merely looks like a failed timer).
    let timer_waited = !deadline.is_finished();
    holder.rollback().await.expect("release");

    let verified = verified.await.expect("join");
    let deadline = deadline.await.expect("join");
    let deadlocked = |e: &str| e.contains("deadlock");
    assert!(
        !verified.as_ref().is_err_and(|e| deadlocked(&e.to_string())),
        "the step deadlocked: {verified:?}"
    );
    assert!(
        !deadline.as_ref().is_err_and(|e| deadlocked(&e.to_string())),
        "the timer deadlocked: {deadline:?}"
    );
    assert!(
        !timer_waited,
        "the timer waited on the saga's lock while holding its timers"
    );
    let failed_timers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM saga_timers WHERE failures > 0")
            .fetch_one(&pool)
            .await
            .expect("timers");
    assert_eq!(failed_timers, 0, "no timer failed");
    // One of them won, cleanly: the verification (the timer skipped the locked saga).
    assert!(verified.is_ok(), "{verified:?}");
    let saga = store::load(&mut pool.acquire().await.expect("conn"), order_id)
        .await
        .expect("load")
        .expect("saga");
    assert_eq!(saga.saga.state, SagaState::Committing);
}

/// Brings a new saga to COMMITTING and has the stock committed.
async fn committed_saga(pool: &PgPool, engine: &Engine) -> (Uuid, Option<SagaState>) {
    let order_id = Uuid::now_v7();
    step(pool, engine, order_id, created())
        .await
        .expect("start");
    for input in [
        Input::InventoryReserved {
            reservation_id: Uuid::now_v7(),
        },
        Input::PaymentInitiated {
            payment_id: Uuid::now_v7(),
        },
        Input::PaymentSucceeded {
            payment_id: Uuid::now_v7(),
        },
    ] {
        step(pool, engine, order_id, input).await.expect("step");
    }
    let state = step(pool, engine, order_id, Input::InventoryCommitted)
        .await
        .expect("committed");
    (order_id, state)
}

#[tokio::test]
async fn a_lost_complete_order_is_sent_again_until_order_svc_confirms_it() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let (order_id, state) = committed_saga(&pool, &engine).await;
    // CompleteOrder is sent; the saga is not finished before order-svc confirms the order.
    assert_ne!(state, Some(SagaState::Completed));
    assert_eq!(
        outbox_types(&pool).await.last().map(|t| t.1.as_str()),
        Some("order.v1.CompleteOrder")
    );
    assert_eq!(
        timer_kinds(&pool).await,
        ["step"],
        "a step timer watches the order's confirmation"
    );

    // order-svc dead-letters it (or it is lost): no confirmation comes. The step timer sends
    // it again, and past the attempts' limit (3) the saga is flagged, still retrying.
    for attempt in 1..=3 {
        sqlx::query("UPDATE saga_timers SET fire_at = now() WHERE kind = 'step'")
            .execute(&pool)
            .await
            .expect("due");
        assert_eq!(timers::fire_due(&pool, &engine).await.expect("fire"), 1);
        assert_eq!(
            operator_flag(&pool, order_id).await.0,
            attempt >= 3,
            "attempt {attempt}"
        );
    }
    let completes = outbox_types(&pool)
        .await
        .into_iter()
        .filter(|t| t.1 == "order.v1.CompleteOrder")
        .count();
    assert_eq!(completes, 4, "the first send and three attempts");
    assert!(operator_flag(&pool, order_id)
        .await
        .1
        .unwrap_or_default()
        .contains("COMPLETING not answered after 3 attempts"));

    // order-svc confirms at last: the saga ends, unflagged, with no timer left.
    assert_eq!(
        step(&pool, &engine, order_id, Input::OrderCompleted)
            .await
            .expect("confirmed"),
        Some(SagaState::Completed)
    );
    assert!(!operator_flag(&pool, order_id).await.0);
    assert!(timer_kinds(&pool).await.is_empty());
}

#[tokio::test]
async fn an_order_confirmed_the_other_way_is_flagged_and_the_saga_does_not_end() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let (order_id, state) = committed_saga(&pool, &engine).await;
    assert_eq!(state, Some(SagaState::Completing));
    // The order was failed meanwhile (by hand, say): order-svc answers the completion with
    // the order's real status.
    let still = step(
        &pool,
        &engine,
        order_id,
        Input::OrderFailed {
            reason: "cancelled by support".into(),
        },
    )
    .await
    .expect("confirmed");
    assert_eq!(still, Some(SagaState::Completing));
    let (needs_operator, last_error) = operator_flag(&pool, order_id).await;
    assert!(needs_operator);
    assert!(last_error
        .unwrap_or_default()
        .contains("order-svc reports the order FAILED (cancelled by support)"),);
    assert_eq!(timer_kinds(&pool).await, ["step"], "it keeps asking");

    // A saga failing whose order is reported completed: flagged too.
    let failing = Uuid::now_v7();
    step(&pool, &engine, failing, created())
        .await
        .expect("start");
    let state = step(
        &pool,
        &engine,
        failing,
        Input::InventoryReservationFailed {
            reason: "out of stock".into(),
        },
    )
    .await
    .expect("refused");
    assert_eq!(state, Some(SagaState::Failing));
    step(&pool, &engine, failing, Input::OrderCompleted)
        .await
        .expect("confirmed");
    assert!(operator_flag(&pool, failing).await.0);
    // The confirmation it asked for ends it.
    let end = step(
        &pool,
        &engine,
        failing,
        Input::OrderFailed {
            reason: "inventory reservation failed: out of stock".into(),
        },
    )
    .await
    .expect("confirmed");
    assert_eq!(end, Some(SagaState::Failed));
    assert!(!operator_flag(&pool, failing).await.0);
}

/// `payload` as the consumer delivers it, with a new message id.
fn incoming<M: prost::Message + prost::Name>(
    order_id: Uuid,
    topic: &str,
    payload: &M,
) -> messaging::Incoming {
    messaging::Incoming {
        topic: topic.to_owned(),
        partition: 0,
        offset: 0,
        key: Some(order_id.to_string()),
        envelope: proto::messaging::v1::Envelope {
            message_id: Uuid::now_v7().to_string(),
            message_type: M::full_name(),
            saga_id: order_id.to_string(),
            correlation_id: "batch-corr".to_owned(),
            ..Default::default()
        },
        payload: payload.encode_to_vec(),
    }
}

fn order_created(order_id: Uuid) -> messaging::Incoming {
    incoming(
        order_id,
        proto::topics::ORDER_EVENTS,
        &proto::order::v1::OrderCreated {
            order_id: order_id.to_string(),
            customer_id: "c-1".into(),
            lines: vec![proto::order::v1::PricedLine {
                sku: "SKU-MOUSE".into(),
                quantity: 2,
                unit_price_cents: 2900,
                line_total_cents: 5800,
            }],
            total_cents: 5800,
            currency: "USD".into(),
            payment_method: "pm_card_visa".into(),
        },
    )
}

fn inventory_reserved(order_id: Uuid) -> messaging::Incoming {
    incoming(
        order_id,
        proto::topics::SAGA_REPLIES,
        &proto::inventory::v1::InventoryReserved {
            order_id: order_id.to_string(),
            reservation_id: Uuid::now_v7().to_string(),
            ..Default::default()
        },
    )
}

/// Prepares a batch as the consumer does: its inbox rows recorded by the statement that reads
/// its sagas.
async fn prepare(
    handler: &orchestrator::handler::SagaHandler,
    conn: &mut sqlx::PgConnection,
    batch: &[&messaging::Incoming],
) {
    let fresh = recorded(handler, conn, batch).await;
    assert_eq!(
        fresh.len(),
        batch.len(),
        "every message of the batch is new"
    );
}

/// The ids of `batch` that the handler's first statement recorded as new.
async fn recorded(
    handler: &orchestrator::handler::SagaHandler,
    conn: &mut sqlx::PgConnection,
    batch: &[&messaging::Incoming],
) -> std::collections::HashSet<Uuid> {
    use messaging::Handler as _;
    let ids: Vec<(Uuid, &str, &str)> = batch
        .iter()
        .map(|m| {
            (
                m.message_id().expect("id"),
                m.message_type(),
                m.topic.as_str(),
            )
        })
        .collect();
    handler
        .prepare_recording(conn, batch, &messaging::InboxRows::new(&ids))
        .await
        .expect("prepare")
        .expect("the orchestrator records a batch's inbox rows with its read")
}

/// The statement that reads a batch's sagas records its messages in the inbox: one delivered
/// twice in the batch is new once, and a batch delivered again has nothing new.
#[tokio::test]
async fn a_batch_delivered_again_is_told_apart_by_the_statement_that_reads_its_sagas() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let handler = orchestrator::handler::SagaHandler::new(engine.clone());
    let (first, second) = (order_created(Uuid::now_v7()), order_created(Uuid::now_v7()));
    let mut tx = pool.begin().await.expect("begin");
    let fresh = recorded(&handler, &mut tx, &[&first, &first, &second]).await;
    assert_eq!(fresh.len(), 2, "{fresh:?}");
    tx.commit().await.expect("commit");
    let mut tx = pool.begin().await.expect("begin");
    let fresh = recorded(&handler, &mut tx, &[&second, &first]).await;
    assert!(fresh.is_empty(), "handled before: {fresh:?}");
}

#[tokio::test]
async fn a_batch_reads_and_saves_its_sagas_at_once_and_a_saga_stepped_twice_in_it_sees_its_first_step(
) {
    use messaging::Handler as _;
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let handler = orchestrator::handler::SagaHandler::new(engine.clone());
    // A saga that exists before the batch, and one that the batch starts and steps again.
    let (existing, started) = (Uuid::now_v7(), Uuid::now_v7());
    step(&pool, &engine, existing, created())
        .await
        .expect("started before the batch");

    let batch = [
        inventory_reserved(existing),
        order_created(started),
        inventory_reserved(started),
    ];
    let mut tx = pool.begin().await.expect("begin");
    let messages: Vec<&messaging::Incoming> = batch.iter().collect();
    prepare(&handler, &mut tx, &messages).await;
    for message in &batch {
        handler.handle(&mut tx, message).await.expect("handle");
    }
    handler.flush(&mut tx).await.expect("flush");
    tx.commit().await.expect("commit");

    for order_id in [existing, started] {
        let saga = store::load(&mut pool.acquire().await.expect("conn"), order_id)
            .await
            .expect("load")
            .expect("saga");
        assert_eq!(saga.saga.state, SagaState::Charging, "{order_id}");
        assert_eq!(saga.version, 2, "two transitions of {order_id}");
        let history: Vec<(i64, String)> = sqlx::query_as(
            "SELECT version, to_state FROM saga_history WHERE saga_id = $1 ORDER BY version",
        )
        .bind(order_id)
        .fetch_all(&pool)
        .await
        .expect("history");
        assert_eq!(
            history,
            [(1, "RESERVING".to_owned()), (2, "CHARGING".to_owned())],
            "{order_id}"
        );
    }
}

#[tokio::test]
async fn a_batch_with_a_saga_changed_since_it_was_read_saves_nothing() {
    use messaging::Handler as _;
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let handler = orchestrator::handler::SagaHandler::new(engine.clone());
    let (untouched, raced) = (Uuid::now_v7(), Uuid::now_v7());
    for order_id in [untouched, raced] {
        step(&pool, &engine, order_id, created())
            .await
            .expect("started");
    }
    let batch = [inventory_reserved(untouched), inventory_reserved(raced)];
    let mut tx = pool.begin().await.expect("begin");
    let messages: Vec<&messaging::Incoming> = batch.iter().collect();
    prepare(&handler, &mut tx, &messages).await;
    // Another writer (an operator, a timer, another replica) steps one saga meanwhile.
    step(
        &pool,
        &engine,
        raced,
        Input::InventoryReservationFailed {
            reason: "out of stock".into(),
        },
    )
    .await
    .expect("the other writer");
    for message in &batch {
        handler.handle(&mut tx, message).await.expect("handle");
    }
    let saved = handler.flush(&mut tx).await;
    assert!(
        matches!(saved, Err(HandlerError::Transient(_))),
        "retried from the read: {saved:?}"
    );
    drop(tx);
    let states: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT saga_id, state, version FROM sagas ORDER BY saga_id")
            .fetch_all(&pool)
            .await
            .expect("sagas");
    let mut expected = vec![
        (untouched, "RESERVING".to_owned(), 1),
        (raced, "FAILING".to_owned(), 2),
    ];
    expected.sort();
    assert_eq!(states, expected, "the batch rolled back whole");
}

/// A saga's steps update its row in place (HOT: no index entry written) until it ends: no
/// index reads its state, and its page keeps room for the row's next versions.
#[tokio::test]
async fn a_sagas_steps_update_its_row_in_place_until_it_ends() {
    use sqlx::Connection as _;
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let mut conn = pool.acquire().await.expect("connection");
    let orders: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    let steps = [
        created(),
        Input::InventoryReserved {
            reservation_id: Uuid::now_v7(),
        },
        Input::PaymentInitiated {
            payment_id: Uuid::now_v7(),
        },
        Input::PaymentSucceeded {
            payment_id: Uuid::now_v7(),
        },
        Input::InventoryCommitted,
        Input::OrderCompleted,
    ];
    // As under load: each step of every saga, then the next.
    for input in &steps {
        for order_id in &orders {
            let mut tx = conn.begin().await.expect("begin");
            engine
                .step(&mut tx, *order_id, input, &trigger(input.name()))
                .await
                .expect("step");
            tx.commit().await.expect("commit");
        }
    }
    // The connection's statistics reach the shared view when it flushes them: asked for
    // here, and else within seconds.
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .expect("flush statistics");
    let (updates, in_place): (i64, i64) = test_support::eventually(
        Duration::from_secs(20),
        "the statistics of 50 updates",
        || async {
            let counts: (i64, i64) = sqlx::query_as(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'sagas'",
            )
            .fetch_one(&pool)
            .await
            .expect("statistics");
            (counts.0 >= 50).then_some(counts)
        },
    )
    .await;
    assert_eq!(updates, 50, "five steps of ten sagas after their start");
    // All but each saga's last (which ends it) can be: 40. The first step of each saga always
    // is (the room the table keeps in each page); the later ones as far as the page can be
    // pruned of the versions before, which a transaction running meanwhile anywhere in the
    // cluster can prevent (another test's, in its own database: a snapshot's horizon counts
    // every database's transactions). Before the table kept room and its indexes read the
    // generated `outcome`, none was.
    assert!(
        (10..=40).contains(&in_place),
        "of 50 updates, {in_place} were in place (40 can be: all but each saga's last)"
    );
    let completed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sagas WHERE state = 'COMPLETED' AND outcome = 'COMPLETED'",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("outcome");
    assert_eq!(completed, 10);
}

/// A consumer's batch records its inbox rows and reads its sagas in one statement, and saves
/// their steps, history, timers and the commands they send in one more.
#[tokio::test]
async fn a_batch_is_one_statement_to_record_and_read_and_one_to_write() {
    use messaging::Handler as _;
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let handler = orchestrator::handler::SagaHandler::new(engine.clone());
    let (existing, first, second) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    step(&pool, &engine, existing, created())
        .await
        .expect("started before the batch");
    let batch = [
        order_created(first),
        inventory_reserved(existing),
        order_created(second),
    ];
    let ((), statements) = test_support::statements_of(&pool, async {
        let mut tx = pool.begin().await.expect("begin");
        let messages: Vec<&messaging::Incoming> = batch.iter().collect();
        // As the consumer runs a batch's handlers: what they send is held meanwhile.
        let ((), left) = messaging::outbox::collect(async {
            prepare(&handler, &mut tx, &messages).await;
            for message in &batch {
                handler.handle(&mut tx, message).await.expect("handle");
            }
            handler.flush(&mut tx).await.expect("flush");
        })
        .await;
        assert!(
            left.unrecorded.is_empty(),
            "the batch's commands were left for the consumer to record: {left:?}"
        );
        assert_eq!(
            left.recorded.len(),
            3,
            "the commands the handler recorded, for the relay: {left:?}"
        );
        tx.commit().await.expect("commit");
    })
    .await;
    assert!(
        !statements
            .iter()
            .any(|(q, _)| q.starts_with("WITH i AS (INSERT INTO outbox")),
        "the commands were recorded in a statement of their own: {statements:#?}"
    );
    let own = test_support::own_statements(statements);
    assert_eq!(own.len(), 2, "the batch's statements: {own:#?}");
    assert!(
        own[0].0.starts_with("WITH fresh AS (INSERT INTO inbox"),
        "{own:#?}"
    );
    assert!(own[1].0.starts_with("WITH w AS"), "{own:#?}");
    assert!(own.iter().all(|(_, calls)| *calls == 1), "{own:#?}");
    let mut sent: Vec<(String, String)> = outbox_types(&pool).await;
    sent.sort();
    assert_eq!(
        sent,
        [
            ("inventory.commands", "inventory.v1.ReserveInventory"),
            ("inventory.commands", "inventory.v1.ReserveInventory"),
            ("inventory.commands", "inventory.v1.ReserveInventory"),
            ("payment.commands", "payment.v1.ChargePayment"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned())),
        "the existing saga's reserve (sent before the batch), the two new sagas' and the charge"
    );
}

/// The orchestrator's consumer over `pool`, to hand batches to as if received.
fn consumer(pool: &PgPool) -> messaging::Consumer {
    messaging::Consumer::new(
        &kafka(),
        "orchestrator",
        &[proto::topics::ORDER_EVENTS, proto::topics::SAGA_REPLIES],
        pool.clone(),
        Outbox::new("orchestrator", kafka()),
    )
}

/// `batch` handled by the consumer as one batch, with the statements it ran.
async fn handled(
    pool: &PgPool,
    consumer: &messaging::Consumer,
    handler: &orchestrator::handler::SagaHandler,
    batch: &[messaging::Incoming],
) -> Vec<(String, i64)> {
    let (handled, statements) =
        test_support::statements_of(pool, consumer.handle_received(handler, batch)).await;
    handled.expect("the batch is handled");
    statements
}

/// Checks that `statements` are one statement that saves the sagas, with no transaction.
fn assert_alone(statements: Vec<(String, i64)>) {
    assert!(
        !statements
            .iter()
            .any(|(q, _)| q == "BEGIN" || q == "COMMIT"),
        "no transaction: {statements:#?}"
    );
    let own = test_support::own_statements(statements);
    assert_eq!(own.len(), 1, "{own:#?}");
    assert!(own[0].0.starts_with("WITH w AS"), "{own:#?}");
    assert_eq!(own[0].1, 1, "{own:#?}");
}

/// Each saga's (state, version) and its history's versions, by saga.
async fn sagas_and_history(pool: &PgPool, ids: &[Uuid]) -> Vec<(String, i64, Vec<i64>)> {
    let mut out = Vec::new();
    for id in ids {
        let (state, version): (String, i64) =
            sqlx::query_as("SELECT state, version FROM sagas WHERE saga_id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .expect("saga");
        let history: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM saga_history WHERE saga_id = $1 ORDER BY version",
        )
        .bind(id)
        .fetch_all(pool)
        .await
        .expect("history");
        out.push((state, version, history));
    }
    out
}

/// A batch of new sagas, then one of their replies, is each written by one statement with no
/// transaction around it: the steps, their history, timers and commands, and the batch's inbox
/// rows. The handler remembers the sagas as it wrote them, so it reads nothing.
#[tokio::test]
async fn a_batch_of_sagas_the_orchestrator_wrote_last_is_one_statement_without_a_transaction() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let handler = orchestrator::handler::SagaHandler::new(engine.clone());
    let consumer = consumer(&pool);
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    for batch in [
        [order_created(first), order_created(second)],
        [inventory_reserved(first), inventory_reserved(second)],
    ] {
        let statements = handled(&pool, &consumer, &handler, &batch).await;
        assert_alone(statements);
    }
    assert_eq!(
        sagas_and_history(&pool, &[first, second]).await,
        vec![("CHARGING".to_owned(), 2, vec![1, 2]); 2]
    );
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .expect("inbox");
    assert_eq!(recorded, 4, "the four messages are in the inbox");
    let mut sent = outbox_types(&pool).await;
    sent.sort();
    assert_eq!(
        sent,
        [
            ("inventory.commands", "inventory.v1.ReserveInventory"),
            ("inventory.commands", "inventory.v1.ReserveInventory"),
            ("payment.commands", "payment.v1.ChargePayment"),
            ("payment.commands", "payment.v1.ChargePayment"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    assert_eq!(
        timer_kinds(&pool).await,
        ["payment_deadline", "payment_deadline", "step", "step"]
    );
}

/// A saga another writer stepped since the handler wrote it (an operator, a timer, another
/// replica) is not at the version the handler remembers: the batch's one statement writes
/// nothing of the batch, and the batch is applied in a transaction, from the saga as stored.
#[tokio::test]
async fn a_batch_whose_saga_changed_since_the_orchestrator_wrote_it_is_applied_from_the_stored_saga(
) {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let handler = orchestrator::handler::SagaHandler::new(engine.clone());
    let consumer = consumer(&pool);
    let (untouched, raced) = (Uuid::now_v7(), Uuid::now_v7());
    handled(
        &pool,
        &consumer,
        &handler,
        &[order_created(untouched), order_created(raced)],
    )
    .await;
    step(
        &pool,
        &engine,
        raced,
        Input::InventoryReservationFailed {
            reason: "out of stock".into(),
        },
    )
    .await
    .expect("the other writer");
    let statements = handled(
        &pool,
        &consumer,
        &handler,
        &[inventory_reserved(untouched), inventory_reserved(raced)],
    )
    .await;
    assert!(
        statements.iter().any(|(q, _)| q == "BEGIN"),
        "applied in a transaction after the statement alone refused it: {statements:#?}"
    );
    // The reservation reply finds the raced saga failing (compensating): ignored there, with
    // no step; the untouched one steps once.
    assert_eq!(
        sagas_and_history(&pool, &[untouched, raced]).await,
        [
            ("CHARGING".to_owned(), 2, vec![1, 2]),
            ("FAILING".to_owned(), 2, vec![1, 2]),
        ]
    );
    let charges: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE message_type = 'payment.v1.ChargePayment'",
    )
    .fetch_one(&pool)
    .await
    .expect("outbox");
    assert_eq!(charges, 1, "the untouched saga's charge, once");
    // Remembered afresh: the next batch of both is alone again.
    let statements = handled(
        &pool,
        &consumer,
        &handler,
        &[incoming(
            untouched,
            proto::topics::SAGA_REPLIES,
            &proto::payment::v1::PaymentInitiated {
                order_id: untouched.to_string(),
                payment_id: Uuid::now_v7().to_string(),
            },
        )],
    )
    .await;
    assert_alone(statements);
}

/// A message the inbox holds already (handled before, by another replica, say) is not applied
/// again, even when its saga stands, as the handler remembers it, where the message would
/// step it.
#[tokio::test]
async fn a_message_handled_before_is_not_applied_again_by_a_batch_written_alone() {
    let (pool, engine) = setup(Duration::from_secs(600)).await;
    let handler = orchestrator::handler::SagaHandler::new(engine.clone());
    let consumer = consumer(&pool);
    let order_id = Uuid::now_v7();
    handled(&pool, &consumer, &handler, &[order_created(order_id)]).await;
    let reply = inventory_reserved(order_id);
    messaging::inbox::record(
        &mut pool.acquire().await.expect("connection"),
        reply.message_id().expect("id"),
        reply.message_type(),
        &reply.topic,
    )
    .await
    .expect("recorded as handled");
    let statements = handled(&pool, &consumer, &handler, std::slice::from_ref(&reply)).await;
    assert!(
        statements.iter().any(|(q, _)| q == "BEGIN"),
        "decided in a transaction after the statement alone refused it: {statements:#?}"
    );
    assert_eq!(
        sagas_and_history(&pool, &[order_id]).await,
        [("RESERVING".to_owned(), 1, vec![1])],
        "not stepped"
    );
    assert_eq!(
        outbox_types(&pool).await,
        [(
            "inventory.commands".to_owned(),
            "inventory.v1.ReserveInventory".to_owned()
        )],
        "no charge sent"
    );
}
