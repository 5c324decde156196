//! Upgrading a database that holds the messaging tables of an earlier release.

mod common;

use std::time::Duration;

use common::*;
use messaging::consumer::dead_letter_headers;
use messaging::{envelope, Relay};
use prost::Message as _;
use rdkafka::message::{Headers as _, Message as _};
use sqlx::migrate::Migration;
use sqlx::types::Json;
use uuid::Uuid;

/// Kafka headers as the outbox stores them: (key, value) pairs in the order sent.
type Headers = Vec<(String, String)>;

/// The first migration that stores the outbox's extra headers as jsonb.
const HEADERS_AS_JSONB: i64 = 4;

/// Extra headers as releases before [`HEADERS_AS_JSONB`] wrote them: for each key, then each
/// value, its length in 4 big-endian bytes and its UTF-8 bytes.
fn length_prefixed(headers: &Headers) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in headers {
        for part in [key, value] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
    out
}

/// Rows an earlier release left in the outbox, one of them with a dead letter's headers, and
/// in `outbox_parked`, are published (or kept) with the same headers after the upgrade.
#[tokio::test]
async fn outbox_rows_written_before_the_headers_became_jsonb_survive_the_upgrade() {
    let url = test_support::fresh_database("upgrade_headers").await;
    let kafka = kafka().await;
    let topic = kafka.topic(TOPIC);
    let headers = vec![
        (
            dead_letter_headers::ERROR.to_owned(),
            "unknown message type \"x\" é".to_owned(),
        ),
        (dead_letter_headers::OFFSET.to_owned(), "42".to_owned()),
        ("empty".to_owned(), String::new()),
    ];

    // The earlier release's schema and rows.
    let earlier = sqlx::PgPool::connect(&url).await.expect("connect");
    let before: Vec<Migration> = messaging::MIGRATOR
        .iter()
        .filter(|m| m.version < HEADERS_AS_JSONB)
        .cloned()
        .collect();
    runtime::database::migrator(before)
        .await
        .expect("earlier migrations")
        .run(&earlier)
        .await
        .expect("earlier schema");
    let envelope_of = |message_id: Uuid| proto::messaging::v1::Envelope {
        message_id: message_id.to_string(),
        message_type: "order.v1.CompleteOrder".into(),
        saga_id: "saga".into(),
        ..Default::default()
    };
    let (dead, plain, parked) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for (message_id, extra) in [
        (dead, length_prefixed(&headers)),
        (plain, Vec::new()),
        (parked, length_prefixed(&headers)),
    ] {
        sqlx::query(
            "INSERT INTO outbox (message_id, topic, message_key, message_type, envelope, payload, extra_headers) \
             VALUES ($1, $2, 'k', 'order.v1.CompleteOrder', $3, $4, $5)",
        )
        .bind(message_id)
        .bind(&topic)
        .bind(envelope_of(message_id).encode_to_vec())
        .bind(complete(&message_id.to_string()))
        .bind(extra)
        .execute(&earlier)
        .await
        .expect("an earlier release's row");
    }
    sqlx::query(
        "WITH moved AS (DELETE FROM outbox WHERE message_id = $1 RETURNING *) \
         INSERT INTO outbox_parked (id, message_id, topic, message_key, message_type, envelope, \
           payload, extra_headers, created_at, error) \
         SELECT id, message_id, topic, message_key, message_type, envelope, payload, \
           extra_headers, created_at, 'refused' FROM moved",
    )
    .bind(parked)
    .execute(&earlier)
    .await
    .expect("a parked row");
    earlier.close().await;

    // This release starts on it.
    let pool = runtime::database::connect(&url, 4, &[&messaging::MIGRATOR])
        .await
        .expect("upgrade");
    let stored: Vec<(Uuid, Json<Headers>)> = sqlx::query_as(
        "SELECT message_id, extra_headers FROM outbox \
         UNION ALL SELECT message_id, extra_headers FROM outbox_parked",
    )
    .fetch_all(&pool)
    .await
    .expect("headers");
    let stored_headers = |id: Uuid| {
        stored
            .iter()
            .find(|(message_id, _)| *message_id == id)
            .map(|(_, Json(headers))| headers.clone())
            .expect("the row is still there")
    };
    assert_eq!(stored_headers(dead), headers);
    assert_eq!(stored_headers(parked), headers, "the parked row's too");
    assert!(stored_headers(plain).is_empty());

    let relay = Relay::new(pool.clone(), &kafka).expect("relay");
    assert_eq!(relay.publish_batch().await.expect("publish"), 2);
    let reader = reader(&kafka, &topic);
    let mut published = Vec::new();
    while published.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
            .await
            .expect("published within 30 s")
            .expect("receive");
        let sent = message.headers().expect("headers");
        let extra: Headers = sent
            .iter()
            .filter(|h| ![envelope::ENVELOPE, envelope::TRACEPARENT].contains(&h.key))
            .map(|h| {
                let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                (h.key.to_owned(), value.into_owned())
            })
            .collect();
        published.push((envelope::from_headers(sent).message_id, extra));
    }
    assert_eq!(
        published,
        [(dead.to_string(), headers), (plain.to_string(), Vec::new())],
        "published in order, each with the headers it was written with"
    );
}

/// A database that a newer release has migrated further is refused, not run on with a schema
/// this release does not know.
#[tokio::test]
async fn a_database_migrated_by_a_newer_release_is_refused() {
    let url = test_support::fresh_database("upgrade_newer").await;
    let pool = runtime::database::connect(&url, 2, &[&messaging::MIGRATOR])
        .await
        .expect("migrate");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99, 'a newer release', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .expect("a newer release's migration");
    let error = runtime::database::connect(&url, 2, &[&messaging::MIGRATOR])
        .await
        .expect_err("refused");
    assert!(format!("{error:#}").contains("99"), "{error:#}");
}
