//! Sagas in PostgreSQL: the state machine's value, its history and its timers.

pub mod admin;

use chrono::{DateTime, Utc};
use std::collections::HashMap;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::saga::{Command, Saga};

/// The timer that fires the payment deadline.
pub const DEADLINE_TIMER: &str = "payment_deadline";
/// The timer that sends a step's command again when its service has not answered.
pub const STEP_TIMER: &str = "step";

/// What the engine decides besides the state machine: timers and the operator flag.
#[derive(Clone, Debug)]
pub struct Bookkeeping {
    /// Time from now to the payment deadline, used when the saga starts it.
    pub deadline: chrono::Duration,
    /// Time from now to the step timer, or `None` when no step is in flight.
    pub step_timer: Option<chrono::Duration>,
    /// What the transition does to the operator flag.
    pub operator_flag: OperatorFlag,
}

/// What a transition does to the saga's operator flag (`needs_operator`, `last_error`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperatorFlag {
    /// Leave it as it is: a flag raised earlier (a dead-lettered reply, a failing timer) stays
    /// until someone deals with it.
    Keep,
    /// Flag the saga, with why.
    Raise(String),
    /// An operator acted on the saga, or it ended: clear the flag (the last error stays, for
    /// the record).
    Clear,
}

impl OperatorFlag {
    /// The `needs_operator` to write (`None`: unchanged) and the `last_error` (`None`: unchanged).
    fn columns(&self) -> (Option<bool>, Option<&str>) {
        match self {
            OperatorFlag::Keep => (None, None),
            OperatorFlag::Raise(why) => (Some(true), Some(why)),
            OperatorFlag::Clear => (Some(false), None),
        }
    }
}

/// A saga as stored, with its optimistic-concurrency version.
#[derive(Clone, Debug)]
pub struct StoredSaga {
    pub saga: Saga,
    pub version: i64,
    pub correlation_id: String,
    pub traceparent: String,
    pub tracestate: String,
    /// When the saga last changed (entered its state, for most changes).
    pub updated_at: DateTime<Utc>,
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
        "SELECT saga_id, data, version, correlation_id, traceparent, tracestate, updated_at FROM sagas WHERE saga_id = $1",
    )
    .bind(saga_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| stored_saga(&row, saga_id)).transpose()
}

/// The sagas of `saga_ids` that exist, in one statement, by id. An id missing from the result
/// has no saga.
pub async fn load_many(
    conn: &mut PgConnection,
    saga_ids: &[Uuid],
) -> Result<HashMap<Uuid, StoredSaga>, StoreError> {
    let rows = sqlx::query(
        "SELECT saga_id, data, version, correlation_id, traceparent, tracestate, updated_at FROM sagas WHERE saga_id = ANY($1)",
    )
    .bind(saga_ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let saga_id: Uuid = row.try_get("saga_id")?;
            Ok((saga_id, stored_saga(row, saga_id)?))
        })
        .collect()
}

fn stored_saga(row: &PgRow, saga_id: Uuid) -> Result<StoredSaga, StoreError> {
    let data: serde_json::Value = row.try_get("data")?;
    let saga =
        serde_json::from_value(data).map_err(|source| StoreError::Corrupt { saga_id, source })?;
    Ok(StoredSaga {
        saga,
        version: row.try_get("version")?,
        correlation_id: row.try_get("correlation_id")?,
        traceparent: row.try_get("traceparent")?,
        tracestate: row.try_get("tracestate")?,
        updated_at: row.try_get("updated_at")?,
    })
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
/// timer commands, all in the caller's transaction and in one statement (one round trip per
/// transition): the saga row is written first, so it is locked before its timers, as in every
/// path that touches both. Returns the new version.
pub async fn save(
    conn: &mut PgConnection,
    previous: Option<&StoredSaga>,
    next: &Saga,
    commands: &[Command],
    cause: &Cause<'_>,
    origin: &Origin,
    bookkeeping: &Bookkeeping,
) -> Result<i64, StoreError> {
    let corrupt = |source| StoreError::Corrupt {
        saga_id: next.order_id,
        source,
    };
    let data = serde_json::to_value(next).map_err(corrupt)?;
    let commands_json = serde_json::to_value(commands).map_err(corrupt)?;
    // Timers to arm (kind, when) and to disarm.
    let now = Utc::now();
    let mut arm: Vec<(&str, DateTime<Utc>)> = Vec::new();
    let mut disarm: Vec<&str> = Vec::new();
    for command in commands {
        match command {
            Command::StartDeadline => arm.push((DEADLINE_TIMER, now + bookkeeping.deadline)),
            Command::CancelDeadline => disarm.push(DEADLINE_TIMER),
            _ => {}
        }
    }
    match bookkeeping.step_timer {
        Some(after) => arm.push((STEP_TIMER, now + after)),
        None => disarm.push(STEP_TIMER),
    }
    let (arm_kinds, arm_at): (Vec<&str>, Vec<DateTime<Utc>>) = arm.into_iter().unzip();
    let write_saga = match previous {
        None => {
            "INSERT INTO sagas (saga_id, state, data, version, customer_id, correlation_id, traceparent, tracestate) \
             VALUES ($1, $2, $3, 1, $4, $5, $6, $7) ON CONFLICT (saga_id) DO NOTHING \
             RETURNING saga_id, version"
        }
        Some(_) => {
            "UPDATE sagas SET state = $2, data = $3, version = version + 1, updated_at = now(), \
                 needs_operator = COALESCE($9, needs_operator), last_error = COALESCE($10, last_error) \
             WHERE saga_id = $1 AND version = $8 \
             RETURNING saga_id, version"
        }
    };
    let (needs_operator, last_error) = bookkeeping.operator_flag.columns();
    let statement = format!(
        "WITH s AS ({write_saga}), \
         h AS (INSERT INTO saga_history (saga_id, version, from_state, to_state, input, message_id, message_type, commands, correlation_id) \
               SELECT saga_id, version, $11, $2, $12, $13, $14, $15, $16 FROM s), \
         armed AS (INSERT INTO saga_timers (saga_id, kind, fire_at) \
               SELECT s.saga_id, k.kind, k.fire_at FROM s, unnest($17::text[], $18::timestamptz[]) AS k(kind, fire_at) \
               ON CONFLICT (saga_id, kind) DO UPDATE SET fire_at = EXCLUDED.fire_at, failures = 0, last_error = NULL), \
         disarmed AS (DELETE FROM saga_timers t USING s WHERE t.saga_id = s.saga_id AND t.kind = ANY($19::text[])) \
         SELECT version FROM s"
    );
    let version: Option<i64> = sqlx::query_scalar(&statement)
        .bind(next.order_id)
        .bind(next.state.as_str())
        .bind(&data)
        .bind(&next.order.customer_id)
        .bind(&origin.correlation_id)
        .bind(&origin.traceparent)
        .bind(&origin.tracestate)
        .bind(previous.map(|p| p.version))
        .bind(needs_operator)
        .bind(last_error)
        .bind(previous.map(|p| p.saga.state.as_str()))
        .bind(cause.input)
        .bind(cause.message_id)
        .bind(cause.message_type)
        .bind(&commands_json)
        .bind(cause.correlation_id)
        .bind(&arm_kinds)
        .bind(&arm_at)
        .bind(&disarm)
        .fetch_optional(&mut *conn)
        .await?;
    version.ok_or(StoreError::Conflict(next.order_id))
}

/// Flags a saga as needing an operator (a message of it could not be handled at all). The flag
/// stays until an operator retries or aborts the saga, or the saga ends ([`OperatorFlag`]).
pub async fn flag_for_operator(
    conn: &mut PgConnection,
    saga_id: Uuid,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE sagas SET needs_operator = true, last_error = $2, updated_at = now() WHERE saga_id = $1")
        .bind(saga_id)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// A due timer, claimed by this transaction.
#[derive(Clone, Debug)]
pub struct DueTimer {
    pub saga_id: Uuid,
    pub kind: String,
    /// How many times in a row its step failed before.
    pub failures: i32,
}

/// Claims the earliest due timer for this transaction and deletes it (it fires once, when the
/// transaction commits); other replicas skip it. `None`: nothing is due.
///
/// Lock order: the saga row, then its timers, as in every step ([`save`] updates the saga
/// before it writes its timers). The saga is locked first, skipping sagas another
/// transaction holds (a step in flight, another replica): a timer transaction never waits
/// for a saga while it holds that saga's timers, which the step holding the saga needs next.
/// The delete reads the timer afresh, so one that the step re-armed or cancelled meanwhile
/// does not fire.
pub async fn claim_due_timer(conn: &mut PgConnection) -> Result<Option<DueTimer>, sqlx::Error> {
    let row: Option<(Uuid, String, i32)> = sqlx::query_as(
        "WITH due AS ( \
             SELECT t.saga_id, t.kind FROM saga_timers t JOIN sagas s ON s.saga_id = t.saga_id \
             WHERE t.fire_at <= now() ORDER BY t.fire_at LIMIT 1 \
             FOR UPDATE OF s SKIP LOCKED) \
         DELETE FROM saga_timers t USING due \
         WHERE t.saga_id = due.saga_id AND t.kind = due.kind AND t.fire_at <= now() \
         RETURNING t.saga_id, t.kind, t.failures",
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(saga_id, kind, failures)| DueTimer {
        saga_id,
        kind,
        failures,
    }))
}

/// Records that the step of `timer` failed with `error` (its transaction rolled back, so the
/// timer is still there): it fires again `retry_after` from now, unless a step re-armed it
/// meanwhile, and the saga is flagged for an operator with `flag`.
pub async fn timer_failed(
    conn: &mut PgConnection,
    timer: &DueTimer,
    error: &str,
    retry_after: chrono::Duration,
    flag: Option<&str>,
) -> Result<(), sqlx::Error> {
    // The saga row first, as every step locks it before its timers.
    sqlx::query("SELECT 1 FROM sagas WHERE saga_id = $1 FOR UPDATE")
        .bind(timer.saga_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE saga_timers SET failures = failures + 1, last_error = $3, fire_at = $4 \
         WHERE saga_id = $1 AND kind = $2 AND fire_at <= now()",
    )
    .bind(timer.saga_id)
    .bind(&timer.kind)
    .bind(error)
    .bind(Utc::now() + retry_after)
    .execute(&mut *conn)
    .await?;
    if let Some(flag) = flag {
        flag_for_operator(conn, timer.saga_id, flag).await?;
    }
    Ok(())
}
