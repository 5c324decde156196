//! Deduplication of handled messages, in the handler's own transaction.

use sqlx::PgConnection;
use uuid::Uuid;

/// Records `message_id` as handled. Returns `false` when it was handled before, in which case
/// the caller must not apply its effect again.
pub async fn record(
    conn: &mut PgConnection,
    message_id: Uuid,
    message_type: &str,
    topic: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (message_id, message_type, topic) VALUES ($1, $2, $3) \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(message_id)
    .bind(message_type)
    .bind(topic)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}
