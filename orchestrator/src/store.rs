//! Sagas in PostgreSQL: the state machine's value, its history and its timers.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::saga::{Command, Saga};

/// The timer that fires the payment deadline.
pub const DEADLINE_TIMER: &str = "payment_deadline";

/// A saga as stored, with its optimistic-concurrency version.
#[derive(Clone, Debug)]
pub struct StoredSaga {
    pub saga: Saga,
    pub version: i64,
    pub correlation_id: String,
    pub traceparent: String,
    pub tracestate: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed the saga since it was read; the caller retries from the read.
    #[error("saga {0} was changed concurrently")]
    Conflict(Uuid),
    #[error("saga {saga_id} has unreadable data: {source}")]
    Corrupt {
        saga_id: Uuid,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

pub async fn load(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> Result<Option<StoredSaga>, StoreError> {
    let row = sqlx::query(
        "SELECT data, version, correlation_id, traceparent, tracestate FROM sagas WHERE saga_id = $1",
    )
    .bind(saga_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let data: serde_json::Value = row.try_get("data")?;
    let saga =
        serde_json::from_value(data).map_err(|source| StoreError::Corrupt { saga_id, source })?;
    Ok(Some(StoredSaga {
        saga,
        version: row.try_get("version")?,
        correlation_id: row.try_get("correlation_id")?,
        traceparent: row.try_get("traceparent")?,
        tracestate: row.try_get("tracestate")?,
    }))
}

/// What caused a transition, for the history.
#[derive(Clone, Debug)]
pub struct Cause<'a> {
    pub input: &'a str,
    pub message_id: &'a str,
    pub message_type: &'a str,
    pub correlation_id: &'a str,
}

/// The trace context a new saga keeps for the messages its timers send later.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub correlation_id: String,
    pub traceparent: String,
    pub tracestate: String,
}

/// Saves `next` over `previous` (`None`: a new saga), appends the history row and applies the
/// timer commands, all in the caller's transaction. Returns the new version.
pub async fn save(
    conn: &mut PgConnection,
    previous: Option<&StoredSaga>,
    next: &Saga,
    commands: &[Command],
    cause: &Cause<'_>,
    origin: &Origin,
    deadline: chrono::Duration,
) -> Result<i64, StoreError> {
    let data = serde_json::to_value(next).map_err(|source| StoreError::Corrupt {
        saga_id: next.order_id,
        source,
    })?;
    let version = match previous {
        None => {
            let inserted = sqlx::query(
                "INSERT INTO sagas (saga_id, state, data, version, customer_id, correlation_id, traceparent, tracestate) \
                 VALUES ($1, $2, $3, 1, $4, $5, $6, $7) ON CONFLICT (saga_id) DO NOTHING",
            )
            .bind(next.order_id)
            .bind(next.state.as_str())
            .bind(&data)
            .bind(&next.order.customer_id)
            .bind(&origin.correlation_id)
            .bind(&origin.traceparent)
            .bind(&origin.tracestate)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Err(StoreError::Conflict(next.order_id));
            }
            1
        }
        Some(previous) => {
            let updated = sqlx::query(
                "UPDATE sagas SET state = $2, data = $3, version = version + 1, updated_at = now() \
                 WHERE saga_id = $1 AND version = $4",
            )
            .bind(next.order_id)
            .bind(next.state.as_str())
            .bind(&data)
            .bind(previous.version)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if updated == 0 {
                return Err(StoreError::Conflict(next.order_id));
            }
            previous.version + 1
        }
    };
    let commands_json = serde_json::to_value(commands).map_err(|source| StoreError::Corrupt {
        saga_id: next.order_id,
        source,
    })?;
    sqlx::query(
        "INSERT INTO saga_history (saga_id, version, from_state, to_state, input, message_id, message_type, commands, correlation_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(next.order_id)
    .bind(version)
    .bind(previous.map(|p| p.saga.state.as_str()))
    .bind(next.state.as_str())
    .bind(cause.input)
    .bind(cause.message_id)
    .bind(cause.message_type)
    .bind(&commands_json)
    .bind(cause.correlation_id)
    .execute(&mut *conn)
    .await?;
    for command in commands {
        match command {
            Command::StartDeadline => {
                let fire_at: DateTime<Utc> = Utc::now() + deadline;
                sqlx::query(
                    "INSERT INTO saga_timers (saga_id, kind, fire_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (saga_id, kind) DO UPDATE SET fire_at = EXCLUDED.fire_at",
                )
                .bind(next.order_id)
                .bind(DEADLINE_TIMER)
                .bind(fire_at)
                .execute(&mut *conn)
                .await?;
            }
            Command::CancelDeadline => {
                sqlx::query("DELETE FROM saga_timers WHERE saga_id = $1 AND kind = $2")
                    .bind(next.order_id)
                    .bind(DEADLINE_TIMER)
                    .execute(&mut *conn)
                    .await?;
            }
            _ => {}
        }
    }
    Ok(version)
}

/// Claims up to `limit` due timers for this transaction; other replicas skip them.
pub async fn claim_due_timers(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "DELETE FROM saga_timers WHERE (saga_id, kind) IN ( \
             SELECT saga_id, kind FROM saga_timers WHERE fire_at <= now() AND kind = $1 \
             ORDER BY fire_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING saga_id",
    )
    .bind(DEADLINE_TIMER)
    .bind(limit)
    .fetch_all(conn)
    .await
}
