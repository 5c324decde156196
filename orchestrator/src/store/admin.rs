//! What operators read and write through the admin API: sagas filtered and paged newest
//! first, one saga with its timers and history, and the reason an operator gave for a step.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{StoreError, DEADLINE_TIMER};
use crate::saga::{Saga, SagaState};

/// Which sagas to list; every filter set must hold.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Any of these states; empty: every state.
    pub states: Vec<SagaState>,
    pub needs_operator: bool,
    pub customer_id: Option<String>,
    pub saga_id: Option<Uuid>,
    /// Started more than this many seconds ago.
    pub older_than_secs: Option<i64>,
    /// Started less than this many seconds ago.
    pub newer_than_secs: Option<i64>,
    /// Only unfinished sagas stuck for more than this many seconds (see [`list`]).
    pub stuck_after_secs: Option<i64>,
}

/// Where a page starts: after this saga, in the newest-first order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub saga_id: Uuid,
}

/// A saga as operators see it.
#[derive(Clone, Debug)]
pub struct SagaRecord {
    pub saga: Saga,
    pub version: i64,
    pub correlation_id: String,
    pub needs_operator: bool,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the saga entered its current state.
    pub state_since: DateTime<Utc>,
    /// Armed timers: kind and when they fire, by kind.
    pub timers: Vec<(String, DateTime<Utc>)>,
}

impl SagaRecord {
    pub fn cursor(&self) -> Cursor {
        Cursor {
            created_at: self.created_at,
            saga_id: self.saga.order_id,
        }
    }
}

/// One transition of a saga's history.
#[derive(Clone, Debug)]
pub struct HistoryRecord {
    pub version: i64,
    pub from_state: Option<String>,
    pub to_state: String,
    pub input: String,
    pub message_id: String,
    pub message_type: String,
    pub commands: serde_json::Value,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    pub operator_reason: Option<String>,
}

/// The columns of [`SagaRecord`], over `sagas s` joined with `since` (see [`FROM`]).
const COLUMNS: &str = "s.saga_id, s.data, s.version, s.correlation_id, s.needs_operator, \
     s.last_error, s.created_at, s.updated_at, since.state_since, \
     ARRAY(SELECT t.kind FROM saga_timers t WHERE t.saga_id = s.saga_id ORDER BY t.kind) AS timer_kinds, \
     ARRAY(SELECT t.fire_at FROM saga_timers t WHERE t.saga_id = s.saga_id ORDER BY t.kind) AS timer_fire_at";

/// A saga's time of entering its current state is that of its last transition that changed
/// state (a retry does not).
const FROM: &str = " FROM sagas s CROSS JOIN LATERAL ( \
     SELECT COALESCE(max(h.created_at), s.created_at) AS state_since FROM saga_history h \
     WHERE h.saga_id = s.saga_id AND h.from_state IS DISTINCT FROM h.to_state) since";

fn record(row: &PgRow) -> Result<SagaRecord, StoreError> {
    let saga_id: Uuid = row.try_get("saga_id")?;
    let data: serde_json::Value = row.try_get("data")?;
    let saga: Saga =
        serde_json::from_value(data).map_err(|source| StoreError::Corrupt { saga_id, source })?;
    let kinds: Vec<String> = row.try_get("timer_kinds")?;
    let fire_at: Vec<DateTime<Utc>> = row.try_get("timer_fire_at")?;
    Ok(SagaRecord {
        saga,
        version: row.try_get("version")?,
        correlation_id: row.try_get("correlation_id")?,
        needs_operator: row.try_get("needs_operator")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        state_since: row.try_get("state_since")?,
        timers: kinds.into_iter().zip(fire_at).collect(),
    })
}

/// Up to `limit` sagas matching `filter`, newest first, after `after`.
///
/// A saga is stuck (`stuck_after_secs`) when it is unfinished and either its payment deadline
/// passed that long ago without firing, or it has waited on a service (any unfinished state
/// but AWAITING_VERIFICATION, which waits on the client until its deadline) that long.
pub async fn list(
    conn: &mut PgConnection,
    filter: &Filter,
    after: Option<Cursor>,
    limit: i64,
) -> Result<Vec<SagaRecord>, StoreError> {
    let mut query = QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS}{FROM} WHERE true"));
    if !filter.states.is_empty() {
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        query
            .push(" AND s.state = ANY(")
            .push_bind(states)
            .push(")");
        // What the states imply of `outcome`, for the planner: the partial indexes by it
        // (`outcome` is what the indexes read, so that a step updates its row in place).
        if filter.states.iter().all(|s| !s.is_terminal()) {
            query.push(" AND s.outcome IS NULL");
        } else if filter.states.iter().all(|s| *s == SagaState::Failed) {
            query.push(" AND s.outcome = 'FAILED'");
        }
    }
    if filter.needs_operator {
        query.push(" AND s.needs_operator");
    }
    if let Some(customer_id) = &filter.customer_id {
        query
            .push(" AND s.customer_id = ")
            .push_bind(customer_id.clone());
    }
    if let Some(saga_id) = filter.saga_id {
        query.push(" AND s.saga_id = ").push_bind(saga_id);
    }
    if let Some(secs) = filter.older_than_secs {
        query
            .push(" AND s.created_at < now() - make_interval(secs => ")
            .push_bind(secs as f64)
            .push(")");
    }
    if let Some(secs) = filter.newer_than_secs {
        query
            .push(" AND s.created_at > now() - make_interval(secs => ")
            .push_bind(secs as f64)
            .push(")");
    }
    if let Some(secs) = filter.stuck_after_secs {
        query
            .push(" AND s.outcome IS NULL AND (EXISTS (SELECT 1 FROM saga_timers t WHERE t.saga_id = s.saga_id AND t.kind = ")
            .push_bind(DEADLINE_TIMER)
            .push(" AND t.fire_at < now() - make_interval(secs => ")
            .push_bind(secs as f64)
            .push(")) OR (s.state <> 'AWAITING_VERIFICATION' AND since.state_since < now() - make_interval(secs => ")
            .push_bind(secs as f64)
            .push(")))");
    }
    if let Some(after) = after {
        query
            .push(" AND (s.created_at, s.saga_id) < (")
            .push_bind(after.created_at)
            .push(", ")
            .push_bind(after.saga_id)
            .push(")");
    }
    query
        .push(" ORDER BY s.created_at DESC, s.saga_id DESC LIMIT ")
        .push_bind(limit);
    let rows = query.build().fetch_all(&mut *conn).await?;
    rows.iter().map(record).collect()
}

/// One saga, or `None` when there is no saga of that id.
pub async fn get(conn: &mut PgConnection, saga_id: Uuid) -> Result<Option<SagaRecord>, StoreError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS}{FROM} WHERE s.saga_id = $1"))
        .bind(saga_id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(record).transpose()
}

/// Every transition of a saga, oldest first.
pub async fn history(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> Result<Vec<HistoryRecord>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT version, from_state, to_state, input, message_id, message_type, commands, \
                correlation_id, created_at, operator_reason \
         FROM saga_history WHERE saga_id = $1 ORDER BY version",
    )
    .bind(saga_id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(HistoryRecord {
                version: row.try_get("version")?,
                from_state: row.try_get("from_state")?,
                to_state: row.try_get("to_state")?,
                input: row.try_get("input")?,
                message_id: row.try_get("message_id")?,
                message_type: row.try_get("message_type")?,
                commands: row.try_get("commands")?,
                correlation_id: row.try_get("correlation_id")?,
                created_at: row.try_get("created_at")?,
                operator_reason: row.try_get("operator_reason")?,
            })
        })
        .collect()
}

/// Whether a message (an operator's request) already caused a transition of the saga.
pub async fn has_caused(
    conn: &mut PgConnection,
    saga_id: Uuid,
    message_id: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM saga_history WHERE saga_id = $1 AND message_id = $2)",
    )
    .bind(saga_id)
    .bind(message_id)
    .fetch_one(conn)
    .await
}

/// Records the reason an operator gave on the transition their request caused.
pub async fn set_operator_reason(
    conn: &mut PgConnection,
    saga_id: Uuid,
    message_id: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE saga_history SET operator_reason = $3 WHERE saga_id = $1 AND message_id = $2",
    )
    .bind(saga_id)
    .bind(message_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}
