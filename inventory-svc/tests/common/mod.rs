//! Shared by the integration tests: the real App on a fresh database and its own topics,
//! commands as the consumer would deliver them, and readers of the stock and the outbox.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use inventory_svc::{App, CommandHandler, Config};
use messaging::{Handler as _, HandlerError, Incoming};
use prost::{Message, Name};
use proto::inventory::v1 as pb;
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use proto::messaging::v1::Envelope;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const CORRELATION_ID: &str = "corr-inventory-test";

/// A config for a fresh database and topic prefix of its own, gRPC on any free port.
pub async fn config(extra: &[&str]) -> Config {
    let url = test_support::fresh_database("inventory").await;
    let brokers = test_support::kafka_brokers();
    let prefix = test_support::topic_prefix();
    let mut args = vec![
        "inventory-svc",
        "--database-url",
        &url,
        "--grpc-addr",
        "127.0.0.1:0",
        "--kafka-brokers",
        &brokers,
        "--kafka-topic-prefix",
        &prefix,
    ];
    args.extend_from_slice(extra);
    Config::parse_from(args)
}

/// The App, built (database migrated, topics created) but not running: the outbox keeps what
/// the handler writes, for the test to read.
pub async fn built_app(extra: &[&str]) -> App {
    App::build(config(extra).await)
        .await
        .expect("building the app")
}

/// The App running in the background until dropped.
pub struct RunningApp {
    pub addr: SocketAddr,
    pub pool: PgPool,
    pub config: Config,
    pub handler: CommandHandler,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn running_app(extra: &[&str]) -> RunningApp {
    let app = built_app(extra).await;
    let cancel = CancellationToken::new();
    let (addr, pool, config, handler) = (
        app.grpc_addr(),
        app.pool().clone(),
        app.config().clone(),
        app.handler(),
    );
    let task = tokio::spawn(app.run(cancel.clone()));
    RunningApp {
        addr,
        pool,
        config,
        handler,
        cancel,
        task: Some(task),
    }
}

impl RunningApp {
    pub async fn client(&self) -> InventoryServiceClient<tonic::transport::Channel> {
        InventoryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connecting to the gRPC server")
    }

    /// Stops the App and checks that it shut down cleanly.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the app stops within its grace period")
                .expect("the app task does not panic")
                .expect("the app stops without error");
        }
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `payload` as the consumer would deliver it from `inventory.commands`, with a new message id.
pub fn command<M: Message + Name>(order_id: Uuid, payload: &M) -> Incoming {
    Incoming {
        topic: "inventory.commands".to_owned(),
        partition: 0,
        offset: 0,
        key: Some(order_id.to_string()),
        envelope: Envelope {
            message_id: Uuid::now_v7().to_string(),
            message_type: M::full_name(),
            saga_id: order_id.to_string(),
            correlation_id: CORRELATION_ID.to_owned(),
            source: "orchestrator".to_owned(),
            ..Envelope::default()
        },
        payload: payload.encode_to_vec(),
    }
}

pub fn reserve(order_id: Uuid, lines: &[(&str, u32)]) -> Incoming {
    command(
        order_id,
        &pb::ReserveInventory {
            order_id: order_id.to_string(),
            lines: lines
                .iter()
                .map(|(sku, quantity)| pb::ReservationLine {
                    sku: (*sku).to_owned(),
                    quantity: *quantity,
                })
                .collect(),
        },
    )
}

pub fn commit(order_id: Uuid) -> Incoming {
    command(
        order_id,
        &pb::CommitInventory {
            order_id: order_id.to_string(),
        },
    )
}

pub fn release(order_id: Uuid, reason: &str) -> Incoming {
    command(
        order_id,
        &pb::ReleaseInventory {
            order_id: order_id.to_string(),
            reason: reason.to_owned(),
        },
    )
}

/// Handles `message` in a transaction of its own, committed when the handler succeeds (as the
/// consumer does).
pub async fn handle(
    pool: &PgPool,
    handler: &CommandHandler,
    message: &Incoming,
) -> Result<(), HandlerError> {
    let mut tx = pool.begin().await.expect("begin");
    handler.handle(&mut tx, message).await?;
    tx.commit().await.expect("commit");
    Ok(())
}

/// Hands `messages` to the handler as one batch, as the consumer does: the batch prepared (its
/// inbox rows recorded with its commits), each new message handled, then flushed, in one
/// committed transaction. Returns how many were new.
pub async fn handle_batch(
    pool: &PgPool,
    handler: &CommandHandler,
    messages: &[Incoming],
) -> Result<usize, HandlerError> {
    let ids: Vec<(Uuid, &str, &str)> = messages
        .iter()
        .map(|m| (m.message_id().unwrap(), m.message_type(), m.topic.as_str()))
        .collect();
    let batch: Vec<&Incoming> = messages.iter().collect();
    let mut tx = pool.begin().await.expect("begin");
    let fresh = handler
        .prepare_recording(&mut tx, &batch, &messaging::InboxRows::new(&ids))
        .await?
        .expect("inventory-svc records a batch's inbox rows with its commits");
    for message in messages {
        if fresh.contains(&message.message_id().unwrap()) {
            handler.handle(&mut tx, message).await?;
        }
    }
    handler.flush(&mut tx).await?;
    tx.commit().await.expect("commit");
    Ok(fresh.len())
}

/// (available, reserved, committed) of `sku`.
pub async fn stock(pool: &PgPool, sku: &str) -> (i64, i64, i64) {
    sqlx::query_as("SELECT available, reserved, committed FROM stock WHERE sku = $1")
        .bind(sku)
        .fetch_one(pool)
        .await
        .expect("stock row")
}

pub async fn set_available(pool: &PgPool, sku: &str, available: i64) {
    sqlx::query("UPDATE stock SET available = $2 WHERE sku = $1")
        .bind(sku)
        .bind(available)
        .execute(pool)
        .await
        .expect("setting stock");
}

/// Status and release reason of the order's reservation, if any.
pub async fn reservation_status(pool: &PgPool, order_id: Uuid) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT status, release_reason FROM reservations WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(pool)
        .await
        .expect("reading reservations")
}

/// Puts the order's reservation past its deadline.
pub async fn expire(pool: &PgPool, order_id: Uuid) {
    let updated = sqlx::query(
        "UPDATE reservations SET expires_at = now() - interval '1 second' WHERE order_id = $1",
    )
    .bind(order_id)
    .execute(pool)
    .await
    .expect("expiring")
    .rows_affected();
    assert_eq!(updated, 1, "no reservation to expire for {order_id}");
}

/// The replies recorded in the outbox for `order_id`, oldest first: (message type, payload).
pub async fn replies(pool: &PgPool, config: &Config, order_id: Uuid) -> Vec<(String, Vec<u8>)> {
    sqlx::query_as(
        "SELECT message_type, payload FROM outbox WHERE topic = $1 AND message_key = $2 ORDER BY id",
    )
    .bind(config.kafka.topic(proto::topics::SAGA_REPLIES))
    .bind(order_id.to_string())
    .fetch_all(pool)
    .await
    .expect("reading the outbox")
}

/// The last reply for `order_id`, which must be an `M`.
pub async fn last_reply<M: Message + Name + Default>(
    pool: &PgPool,
    config: &Config,
    order_id: Uuid,
) -> M {
    let replies = replies(pool, config, order_id).await;
    let (message_type, payload) = replies.last().expect("a reply in the outbox");
    assert_eq!(message_type, &M::full_name(), "type of the last reply");
    M::decode(payload.as_slice()).expect("decodable reply")
}

/// Hands `messages` to a consumer as one batch it received: it applies them alone or in a
/// transaction, as it decides ([`messaging::Handler::takes_alone`]).
pub async fn handle_received(
    pool: &PgPool,
    config: &Config,
    handler: &CommandHandler,
    messages: &[Incoming],
) -> Result<(), HandlerError> {
    messaging::Consumer::new(
        &config.kafka,
        "inventory-svc-test",
        &[proto::topics::INVENTORY_COMMANDS],
        pool.clone(),
        messaging::Outbox::new("inventory-svc", config.kafka.clone()),
    )
    .handle_received(handler, messages)
    .await
}
