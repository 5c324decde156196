//! The running App end to end through the broker: commands on `inventory.commands`, replies on
//! `saga.replies`, with the envelope carried along.

mod common;

use std::time::{Duration, Instant};

use common::*;
use messaging::envelope;
use prost::Message as _;
use proto::inventory::v1 as pb;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use uuid::Uuid;

async fn send(producer: &FutureProducer, topic: &str, message: &messaging::Incoming) {
    let key = message.key.clone().unwrap_or_default();
    producer
        .send(
            FutureRecord::to(topic)
                .key(&key)
                .payload(&message.payload)
                .headers(envelope::to_headers(&message.envelope)),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("producing a command");
}

#[tokio::test]
async fn commands_from_the_broker_are_answered_once_on_saga_replies() {
    let app = running_app(&[]).await;
    let kafka = &app.config.kafka;
    let producer = kafka.producer().unwrap();
    let replies: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("{}test-reader", kafka.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set("log_level", "4")
        .create()
        .unwrap();
    replies
        .subscribe(&[&kafka.topic(proto::topics::SAGA_REPLIES)])
        .unwrap();

    let order = Uuid::new_v4();
    let commands = kafka.topic(proto::topics::INVENTORY_COMMANDS);
    let reserve = reserve(order, &[("SKU-MOUSE", 2)]);
    send(&producer, &commands, &reserve).await;
    // Redelivered with the same message id: the inbox makes it a no-op, no second reply.
    send(&producer, &commands, &reserve).await;
    let commit = commit(order);
    send(&producer, &commands, &commit).await;

    // Same key, same partition: the replies arrive in the commands' order.
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.last().map(|(t, _, _): &(String, _, _)| t.as_str())
        != Some("inventory.v1.InventoryCommitted")
    {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no InventoryCommitted reply in time; got {received:?}"
        );
        let Ok(message) = tokio::time::timeout(left, replies.recv()).await else {
            continue;
        };
        let message = message.unwrap();
        if message.key() != Some(order.to_string().as_bytes()) {
            continue;
        }
        let envelope = envelope::from_headers(message.headers().unwrap());
        received.push((
            envelope.message_type.clone(),
            envelope,
            message.payload().unwrap_or_default().to_vec(),
        ));
    }

    let types: Vec<&str> = received.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "inventory.v1.InventoryReserved",
            "inventory.v1.InventoryCommitted"
        ]
    );
    let (_, reserved_envelope, reserved_payload) = &received[0];
    assert_eq!(reserved_envelope.saga_id, order.to_string());
    assert_eq!(reserved_envelope.correlation_id, CORRELATION_ID);
    assert_eq!(reserved_envelope.causation_id, reserve.envelope.message_id);
    assert_eq!(reserved_envelope.source, "inventory-svc");
    let reserved = pb::InventoryReserved::decode(reserved_payload.as_slice()).unwrap();
    let committed = pb::InventoryCommitted::decode(received[1].2.as_slice()).unwrap();
    assert_eq!(committed.reservation_id, reserved.reservation_id);
    assert_eq!(received[1].1.causation_id, commit.envelope.message_id);
    assert_eq!(stock(&app.pool, "SKU-MOUSE").await, (998, 0, 2));
    app.stop().await;
}
