//! The operators' API (`saga.v1.SagaAdmin`) of a running orchestrator, against the real
//! PostgreSQL and broker: sagas put in every state by the engine (as the services' replies
//! would), listed, read with their history, retried when stuck and aborted.

use std::time::{Duration, Instant};

use clap::Parser as _;
use messaging::{envelope, KafkaArgs, MessageContext, Outbox};
use orchestrator::engine::{Engine, Trigger};
use orchestrator::saga::{Input, Line, OrderDetails, SagaState};
use orchestrator::{App, Config};
use proto::saga::v1 as pb;
use proto::saga::v1::saga_admin_client::SagaAdminClient;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::ClientConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use uuid::Uuid;

const TOKEN: &str = "test-admin-token";

/// Adds `authorization: Bearer <token>` to every request, when it has a token.
#[derive(Clone)]
struct WithToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for WithToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Admin = SagaAdminClient<InterceptedService<Channel, WithToken>>;

struct Running {
    pool: PgPool,
    engine: Engine,
    kafka: KafkaArgs,
    admin_url: String,
    admin: Admin,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start() -> Running {
        let url = test_support::fresh_database("orchestrator_admin").await;
        let brokers = test_support::kafka_brokers();
        let prefix = test_support::topic_prefix();
        let config = Config::parse_from([
            "orchestrator",
            "--database-url",
            &url,
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--admin-token",
            TOKEN,
            "--kafka-brokers",
            &brokers,
            "--kafka-topic-prefix",
            &prefix,
            // One unanswered attempt flags a saga, so a stuck one is quick to make.
            "--step-max-attempts",
            "1",
            "--timer-poll-interval-ms",
            "50",
        ]);
        let app = App::build(config.clone()).await.expect("build");
        let pool = app.pool().clone();
        let admin_url = format!("http://{}", app.admin_addr());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(app.run(cancel.clone()));
        let engine = Engine::new(
            Outbox::new(orchestrator::SERVICE, config.kafka.clone()),
            config.timing(),
        );
        let admin = client(&admin_url, Some(TOKEN)).await;
        Running {
            pool,
            engine,
            kafka: config.kafka,
            admin_url,
            admin,
            cancel,
            task,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.expect("join").expect("orchestrator");
    }

    /// Applies `input` as a reply of a service would.
    async fn step(&self, saga_id: Uuid, input: Input) -> Option<SagaState> {
        let mut tx = self.pool.begin().await.expect("begin");
        let trigger = Trigger {
            message_id: Uuid::now_v7().to_string(),
            message_type: format!("test.{}", input.name()),
            context: Some(MessageContext {
                correlation_id: format!("corr-{saga_id}"),
                ..Default::default()
            }),
        };
        let saga = self
            .engine
            .step(&mut tx, saga_id, &input, &trigger)
            .await
            .expect("step");
        tx.commit().await.expect("commit");
        saga.map(|s| s.state)
    }

    /// A new saga of `customer`, brought to `state` by the replies that lead there.
    async fn saga_in(&self, state: SagaState, customer: &str) -> Uuid {
        let id = Uuid::now_v7();
        let reserved = || Input::InventoryReserved {
            reservation_id: Uuid::now_v7(),
        };
        let initiated = || Input::PaymentInitiated {
            payment_id: Uuid::now_v7(),
        };
        let succeeded = || Input::PaymentSucceeded {
            payment_id: Uuid::now_v7(),
        };
        let path: Vec<Input> = match state {
            SagaState::Reserving => vec![],
            SagaState::Charging => vec![reserved()],
            SagaState::AwaitingVerification => vec![reserved(), initiated()],
            SagaState::Committing => vec![reserved(), initiated(), succeeded()],
            SagaState::Completing => vec![
                reserved(),
                initiated(),
                succeeded(),
                Input::InventoryCommitted,
            ],
            SagaState::Completed => vec![
                reserved(),
                initiated(),
                succeeded(),
                Input::InventoryCommitted,
                Input::OrderCompleted,
            ],
            SagaState::Compensating => vec![
                reserved(),
                initiated(),
                Input::PaymentFailed {
                    reason: "card declined".into(),
                },
            ],
            SagaState::Failing => vec![Input::InventoryReservationFailed {
                reason: "out of stock".into(),
            }],
            SagaState::Failed => vec![
                Input::InventoryReservationFailed {
                    reason: "out of stock".into(),
                },
                Input::OrderFailed {
                    reason: "out of stock".into(),
                },
            ],
        };
        let mut last = self.step(id, created(customer)).await;
        for input in path {
            last = self.step(id, input).await;
        }
        assert_eq!(last, Some(state));
        id
    }

    async fn get(&self, saga_id: Uuid) -> pb::SagaDetail {
        self.admin
            .clone()
            .get_saga(pb::GetSagaRequest {
                saga_id: saga_id.to_string(),
            })
            .await
            .expect("GetSaga")
            .into_inner()
    }

    async fn list(&self, request: pb::ListSagasRequest) -> pb::ListSagasResponse {
        self.admin
            .clone()
            .list_sagas(request)
            .await
            .expect("ListSagas")
            .into_inner()
    }
}

async fn client(url: &str, token: Option<&str>) -> Admin {
    let channel = Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect to the admin API");
    SagaAdminClient::with_interceptor(
        channel,
        WithToken(token.map(|t| format!("Bearer {t}").parse().expect("metadata"))),
    )
}

fn created(customer: &str) -> Input {
    Input::OrderCreated {
        order: OrderDetails {
            customer_id: customer.to_owned(),
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

fn ids(sagas: &[pb::Saga]) -> Vec<String> {
    sagas.iter().map(|s| s.saga_id.clone()).collect()
}

fn state_of(saga: &pb::SagaDetail) -> pb::SagaState {
    saga.saga.as_ref().expect("saga").state()
}

fn last_transition(saga: &pb::SagaDetail) -> &pb::Transition {
    saga.history.last().expect("history")
}

fn command_names(transition: &pb::Transition) -> Vec<&str> {
    transition
        .commands
        .iter()
        .map(|c| c.name.as_str())
        .collect()
}

#[tokio::test]
async fn list_filters_by_state_operator_customer_order_and_age_and_pages_newest_first() {
    let running = Running::start().await;
    let mut made = Vec::new();
    for (i, state) in SagaState::ALL.into_iter().enumerate() {
        let customer = if i % 2 == 0 { "c-alice" } else { "c-bob" };
        made.push((running.saga_in(state, customer).await, state));
    }
    let newest_first: Vec<String> = made.iter().rev().map(|(id, _)| id.to_string()).collect();
    let made_in = |state: SagaState| {
        made.iter()
            .find(|(_, s)| *s == state)
            .map(|(id, _)| *id)
            .expect("made")
    };

    // Pages of 3: 3 + 3 + 3, newest first, each saga once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = running
            .list(pb::ListSagasRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await;
        pages += 1;
        assert!(page.sagas.len() <= 3);
        seen.extend(ids(&page.sagas));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, newest_first);

    let finished = running
        .list(pb::ListSagasRequest {
            states: vec![
                pb::SagaState::Completed.into(),
                pb::SagaState::Failed.into(),
            ],
            ..Default::default()
        })
        .await;
    assert_eq!(
        finished.sagas.iter().map(|s| s.state()).collect::<Vec<_>>(),
        [pb::SagaState::Failed, pb::SagaState::Completed]
    );

    // By one final state, and by unfinished ones (each read through an index of its own).
    let failed = running
        .list(pb::ListSagasRequest {
            states: vec![pb::SagaState::Failed.into()],
            ..Default::default()
        })
        .await;
    assert_eq!(ids(&failed.sagas), [made_in(SagaState::Failed).to_string()]);
    let waiting = running
        .list(pb::ListSagasRequest {
            states: vec![
                pb::SagaState::Charging.into(),
                pb::SagaState::Completing.into(),
            ],
            ..Default::default()
        })
        .await;
    assert_eq!(
        ids(&waiting.sagas),
        [
            made_in(SagaState::Completing).to_string(),
            made_in(SagaState::Charging).to_string()
        ]
    );

    let alice = running
        .list(pb::ListSagasRequest {
            customer_id: "c-alice".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(alice.sagas.len(), 5);
    assert!(alice.sagas.iter().all(|s| s.customer_id == "c-alice"));

    let charging = made_in(SagaState::Charging);
    let one = running
        .list(pb::ListSagasRequest {
            order_id: charging.to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(ids(&one.sagas), [charging.to_string()]);
    let saga = &one.sagas[0];
    assert_eq!(saga.state(), pb::SagaState::Charging);
    assert!(!saga.reservation_id.is_empty());
    assert_eq!(saga.total_cents, 5800);
    assert_eq!(saga.correlation_id, format!("corr-{charging}"));

    // A message of this saga was dead-lettered: it is flagged for an operator.
    let committing = made_in(SagaState::Committing);
    let mut conn = running.pool.acquire().await.expect("conn");
    orchestrator::store::flag_for_operator(&mut conn, committing, "undecodable reply")
        .await
        .expect("flag");
    let flagged = running
        .list(pb::ListSagasRequest {
            needs_operator: true,
            ..Default::default()
        })
        .await;
    assert_eq!(ids(&flagged.sagas), [committing.to_string()]);
    assert_eq!(flagged.sagas[0].last_error, "undecodable reply");

    // The completed saga started two hours ago; the compensating one has been compensating
    // for an hour, past any step's deadline.
    let completed = made_in(SagaState::Completed);
    let compensating = made_in(SagaState::Compensating);
    sqlx::query("UPDATE sagas SET created_at = created_at - interval '2 hours' WHERE saga_id = $1")
        .bind(completed)
        .execute(&running.pool)
        .await
        .expect("backdate");
    sqlx::query(
        "UPDATE saga_history SET created_at = created_at - interval '1 hour' WHERE saga_id = $1",
    )
    .bind(compensating)
    .execute(&running.pool)
    .await
    .expect("backdate");
    let old = running
        .list(pb::ListSagasRequest {
            older_than_seconds: 3600,
            ..Default::default()
        })
        .await;
    assert_eq!(ids(&old.sagas), [completed.to_string()]);
    let recent = running
        .list(pb::ListSagasRequest {
            newer_than_seconds: 3600,
            ..Default::default()
        })
        .await;
    assert_eq!(recent.sagas.len(), 8);
    assert!(!ids(&recent.sagas).contains(&completed.to_string()));
    let stuck = running
        .list(pb::ListSagasRequest {
            stuck_only: true,
            stuck_after_seconds: 600,
            ..Default::default()
        })
        .await;
    assert_eq!(
        ids(&stuck.sagas),
        [compensating.to_string()],
        "the saga waiting on a service for an hour is stuck; the others are young or finished"
    );
    let since = stuck.sagas[0].state_since_ms;
    assert!(
        since < chrono::Utc::now().timestamp_millis() - 3_000_000,
        "in COMPENSATING since an hour ago: {since}"
    );

    let mut admin = running.admin.clone();
    for (request, field) in [
        (
            pb::ListSagasRequest {
                page_token: "not-a-token".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListSagasRequest {
                order_id: "42".into(),
                ..Default::default()
            },
            "order_id",
        ),
        (
            pb::ListSagasRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListSagasRequest {
                states: vec![0],
                ..Default::default()
            },
            "states",
        ),
    ] {
        let status = admin.list_sagas(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(status.message().contains(field), "{}", status.message());
    }
    running.stop().await;
}

#[tokio::test]
async fn get_shows_the_state_ids_deadlines_and_every_transition() {
    let running = Running::start().await;
    let id = running
        .saga_in(SagaState::AwaitingVerification, "c-carol")
        .await;
    let detail = running.get(id).await;
    let saga = detail.saga.as_ref().expect("saga");
    assert_eq!(saga.saga_id, id.to_string());
    assert_eq!(saga.order_id, id.to_string());
    assert_eq!(saga.state(), pb::SagaState::AwaitingVerification);
    assert_eq!(saga.customer_id, "c-carol");
    assert_eq!(saga.lines.len(), 1);
    assert_eq!(
        (saga.lines[0].sku.as_str(), saga.lines[0].quantity),
        ("SKU-MOUSE", 2)
    );
    assert!(Uuid::parse_str(&saga.reservation_id).is_ok());
    assert!(Uuid::parse_str(&saga.payment_id).is_ok());
    assert_eq!(saga.attempts, 0);
    assert_eq!(saga.version, 3);
    let deadline = saga
        .deadlines
        .iter()
        .find(|d| d.kind == "payment_deadline")
        .expect("the payment deadline is armed");
    let in_ten_minutes = chrono::Utc::now().timestamp_millis() + 600_000;
    assert!((deadline.fire_at_ms - in_ten_minutes).abs() < 60_000);

    let steps: Vec<(pb::SagaState, pb::SagaState, &str)> = detail
        .history
        .iter()
        .map(|t| (t.from_state(), t.to_state(), t.input.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            (
                pb::SagaState::Unspecified,
                pb::SagaState::Reserving,
                "OrderCreated"
            ),
            (
                pb::SagaState::Reserving,
                pb::SagaState::Charging,
                "InventoryReserved"
            ),
            (
                pb::SagaState::Charging,
                pb::SagaState::AwaitingVerification,
                "PaymentInitiated"
            ),
        ]
    );
    let started = &detail.history[0];
    assert_eq!(
        command_names(started),
        ["ReserveInventory", "StartDeadline"]
    );
    assert_eq!(started.message_type, "test.OrderCreated");
    assert!(Uuid::parse_str(&started.message_id).is_ok());
    assert_eq!(started.correlation_id, format!("corr-{id}"));
    assert!(started.at_ms > 0 && started.at_ms <= detail.history[2].at_ms);
    let initiated = &detail.history[2];
    assert_eq!(command_names(initiated), ["MarkPaymentInitiated"]);
    assert_eq!(initiated.commands[0].payment_id, saga.payment_id);

    let mut admin = running.admin.clone();
    let unknown = admin
        .get_saga(pb::GetSagaRequest {
            saga_id: Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    let malformed = admin
        .get_saga(pb::GetSagaRequest {
            saga_id: "nope".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(malformed.message().contains("saga_id"));
    running.stop().await;
}

/// Reads `inventory.commands` until the message an operator's request caused shows up.
async fn sent_command(kafka: &KafkaArgs, saga_id: Uuid, causation_id: &str) -> String {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("{}reader", kafka.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("reader");
    reader
        .subscribe(&[&kafka.topic(proto::topics::INVENTORY_COMMANDS)])
        .expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), reader.recv()).await {
            let envelope = envelope::from_headers(m.headers().expect("headers"));
            if envelope.saga_id == saga_id.to_string() && envelope.causation_id == causation_id {
                return envelope.message_type;
            }
        }
    }
    panic!("no command caused by {causation_id} on inventory.commands within 60 s");
}

#[tokio::test]
async fn a_stuck_saga_is_flagged_then_repaired_by_retry() {
    let running = Running::start().await;
    let id = running.saga_in(SagaState::Reserving, "c-dave").await;

    // The inventory service does not answer: the step timer fires (made due here) and, past
    // the one attempt allowed, the saga is flagged for an operator.
    sqlx::query("UPDATE saga_timers SET fire_at = now() WHERE saga_id = $1 AND kind = 'step'")
        .bind(id)
        .execute(&running.pool)
        .await
        .expect("due");
    let deadline = Instant::now() + Duration::from_secs(30);
    let flagged = loop {
        let page = running
            .list(pb::ListSagasRequest {
                needs_operator: true,
                ..Default::default()
            })
            .await;
        if let Some(saga) = page.sagas.into_iter().next() {
            break saga;
        }
        assert!(Instant::now() < deadline, "the saga was never flagged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(flagged.saga_id, id.to_string());
    assert_eq!(flagged.state(), pb::SagaState::Reserving);
    assert!(
        flagged.last_error.contains("not answered"),
        "{}",
        flagged.last_error
    );

    let request_id = Uuid::now_v7().to_string();
    let retry = pb::RetrySagaRequest {
        saga_id: id.to_string(),
        reason: "inventory-svc was redeployed".into(),
        request_id: request_id.clone(),
    };
    let mut request = Request::new(retry.clone());
    request.metadata_mut().insert(
        "x-correlation-id",
        "ops-ticket-7".parse().expect("metadata"),
    );
    let response = running
        .admin
        .clone()
        .retry_saga(request)
        .await
        .expect("RetrySaga");
    assert_eq!(
        response
            .metadata()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some(format!("corr-{id}").as_str()),
        "the answer carries the saga's correlation id"
    );
    let retried = response.into_inner();
    let saga = retried.saga.as_ref().expect("saga");
    assert_eq!(saga.state(), pb::SagaState::Reserving);
    assert_eq!(saga.attempts, 2, "the timer's attempt and the operator's");
    let last = last_transition(&retried);
    assert_eq!(last.input, "Retry");
    assert_eq!(last.message_type, "operator.RetrySaga");
    assert_eq!(last.message_id, format!("admin:{request_id}"));
    assert_eq!(last.operator_reason, "inventory-svc was redeployed");
    assert_eq!(command_names(last), ["ReserveInventory"]);
    assert_eq!(
        last.correlation_id,
        format!("corr-{id}"),
        "the saga keeps its own correlation id"
    );

    // The command really went out again, caused by the operator's request.
    assert_eq!(
        sent_command(&running.kafka, id, &format!("admin:{request_id}")).await,
        "inventory.v1.ReserveInventory"
    );

    // The same request again (its answer was lost, say) is not applied twice.
    let again = running
        .admin
        .clone()
        .retry_saga(retry)
        .await
        .expect("RetrySaga again")
        .into_inner();
    assert_eq!(again.history.len(), retried.history.len());
    assert_eq!(again.saga.as_ref().expect("saga").version, saga.version);

    // The operator's retry cleared the flag; the inventory service answers at last.
    running
        .step(
            id,
            Input::InventoryReserved {
                reservation_id: Uuid::now_v7(),
            },
        )
        .await;
    let repaired = running.get(id).await;
    let saga = repaired.saga.as_ref().expect("saga");
    assert_eq!(saga.state(), pb::SagaState::Charging);
    assert!(!saga.needs_operator);
    assert_eq!(saga.attempts, 0);
    running.stop().await;
}

#[tokio::test]
async fn abort_compensates_now_and_records_the_reason() {
    let running = Running::start().await;
    let id = running
        .saga_in(SagaState::AwaitingVerification, "c-erin")
        .await;
    let abort = |reason: &str| pb::AbortSagaRequest {
        saga_id: id.to_string(),
        reason: reason.into(),
        request_id: String::new(),
    };
    let mut admin = running.admin.clone();
    let aborted = admin
        .abort_saga(abort("customer reported fraud"))
        .await
        .expect("AbortSaga")
        .into_inner();
    let saga = aborted.saga.as_ref().expect("saga");
    assert_eq!(saga.state(), pb::SagaState::Compensating);
    assert_eq!(
        saga.failure_reason,
        "aborted by an operator: customer reported fraud"
    );
    assert_eq!(
        saga.pending_compensations,
        ["RELEASE_INVENTORY", "VOID_PAYMENT"]
    );
    assert!(
        saga.deadlines.iter().all(|d| d.kind != "payment_deadline"),
        "the payment deadline is cancelled: {:?}",
        saga.deadlines
    );
    let last = last_transition(&aborted);
    assert_eq!(last.input, "Abort");
    assert_eq!(last.message_type, "operator.AbortSaga");
    assert!(last.message_id.starts_with("admin:"));
    assert_eq!(last.operator_reason, "customer reported fraud");
    assert_eq!(
        command_names(last),
        ["CancelDeadline", "VoidPayment", "ReleaseInventory"]
    );
    assert!(last.commands[1..]
        .iter()
        .all(|c| c.reason == "aborted by an operator: customer reported fraud"));

    // Aborting again with the same reason changes nothing and is no error.
    let again = admin
        .abort_saga(abort("customer reported fraud"))
        .await
        .expect("AbortSaga again")
        .into_inner();
    assert_eq!(again.history.len(), aborted.history.len());
    // With another reason, it is refused: the saga already compensates for the first.
    let other = admin
        .abort_saga(abort("something else"))
        .await
        .expect_err("another reason");
    assert_eq!(other.code(), Code::FailedPrecondition);
    assert!(
        other.message().contains("already compensating"),
        "{}",
        other.message()
    );

    // The services confirm the compensations: the saga fails, every step in its history.
    running.step(id, Input::PaymentVoided).await;
    assert_eq!(
        running.step(id, Input::InventoryReleased).await,
        Some(SagaState::Failing)
    );
    assert_eq!(
        running
            .step(
                id,
                Input::OrderFailed {
                    reason: "aborted by an operator: customer reported fraud".into()
                }
            )
            .await,
        Some(SagaState::Failed)
    );
    let failed = running.get(id).await;
    assert_eq!(state_of(&failed), pb::SagaState::Failed);
    let tail: Vec<(&str, pb::SagaState, Vec<&str>)> = failed.history[3..]
        .iter()
        .map(|t| (t.input.as_str(), t.to_state(), command_names(t)))
        .collect();
    assert_eq!(
        tail,
        [
            (
                "Abort",
                pb::SagaState::Compensating,
                vec!["CancelDeadline", "VoidPayment", "ReleaseInventory"]
            ),
            ("PaymentVoided", pb::SagaState::Compensating, vec![]),
            (
                "InventoryReleased",
                pb::SagaState::Failing,
                vec!["FailOrder"]
            ),
            ("OrderFailed", pb::SagaState::Failed, vec![]),
        ]
    );
    let fail_order = &failed.history[failed.history.len() - 2].commands[0];
    assert_eq!(
        fail_order.reason,
        "aborted by an operator: customer reported fraud"
    );
    // Still the same abort: answered as it is.
    let after = admin
        .abort_saga(abort("customer reported fraud"))
        .await
        .expect("AbortSaga after the failure")
        .into_inner();
    assert_eq!(state_of(&after), pb::SagaState::Failed);

    for reason in ["", "   "] {
        let status = admin
            .abort_saga(abort(reason))
            .await
            .expect_err("no reason");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("reason"));
    }
    running.stop().await;
}

#[tokio::test]
async fn requests_that_make_no_sense_are_refused_with_a_clear_status() {
    let running = Running::start().await;
    let completed = running.saga_in(SagaState::Completed, "c-frank").await;
    let awaiting = running
        .saga_in(SagaState::AwaitingVerification, "c-frank")
        .await;
    let committing = running.saga_in(SagaState::Committing, "c-frank").await;
    let mut admin = running.admin.clone();
    let retry = |id: Uuid| pb::RetrySagaRequest {
        saga_id: id.to_string(),
        ..Default::default()
    };
    let abort = |id: Uuid| pb::AbortSagaRequest {
        saga_id: id.to_string(),
        reason: "operator test".into(),
        ..Default::default()
    };

    let finished = admin
        .retry_saga(retry(completed))
        .await
        .expect_err("finished");
    assert_eq!(finished.code(), Code::FailedPrecondition);
    assert!(
        finished.message().contains("COMPLETED") && finished.message().contains("finished"),
        "{}",
        finished.message()
    );
    let finished = admin
        .abort_saga(abort(completed))
        .await
        .expect_err("finished");
    assert_eq!(finished.code(), Code::FailedPrecondition);

    let waiting = admin
        .retry_saga(retry(awaiting))
        .await
        .expect_err("waiting");
    assert_eq!(waiting.code(), Code::FailedPrecondition);
    assert!(
        waiting.message().contains("verify"),
        "{}",
        waiting.message()
    );

    let paid = admin.abort_saga(abort(committing)).await.expect_err("paid");
    assert_eq!(paid.code(), Code::FailedPrecondition);
    assert!(
        paid.message().contains("retry instead"),
        "{}",
        paid.message()
    );

    let unknown = Uuid::now_v7();
    assert_eq!(
        admin
            .retry_saga(retry(unknown))
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        admin
            .abort_saga(abort(unknown))
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );
    // Nothing was changed by the refusals.
    assert_eq!(running.get(completed).await.history.len(), 6);
    assert_eq!(running.get(awaiting).await.history.len(), 3);

    // No token, or a wrong one: UNAUTHENTICATED, whatever the request.
    for token in [None, Some("wrong-token")] {
        let mut stranger = client(&running.admin_url, token).await;
        let status = stranger
            .list_sagas(pb::ListSagasRequest::default())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
        let status = stranger
            .abort_saga(abort(awaiting))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    assert_eq!(
        state_of(&running.get(awaiting).await),
        pb::SagaState::AwaitingVerification
    );
    running.stop().await;
}

#[tokio::test]
async fn the_admin_address_serves_health_and_reflection_without_the_token() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let running = Running::start().await;
    let channel = Channel::from_shared(running.admin_url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "saga.v1.SagaAdmin".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let services: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(services.contains(&"saga.v1.SagaAdmin"), "{services:?}");
    running.stop().await;
}
