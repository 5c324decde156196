//! Sagas in PostgreSQL: the state machine's value, its history and its timers.

pub mod admin;

use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use messaging::{InboxRows, OutboxRows};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::saga::{Command, Saga, SagaState};

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

/// The sagas of `saga_ids` that exist, by id (an id missing has no saga), read in the
/// statement that records a consumer batch's inbox rows: returns the message ids recorded now
/// too (the batch's messages not handled before).
pub async fn record_and_load_many(
    conn: &mut PgConnection,
    inbox: &InboxRows<'_>,
    saga_ids: &[Uuid],
) -> Result<(HashSet<Uuid>, HashMap<Uuid, StoredSaga>), StoreError> {
    static READ: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH fresh AS ({}) \
             SELECT ARRAY(SELECT message_id FROM fresh) AS fresh, s.saga_id, s.data, s.version, \
                    s.correlation_id, s.traceparent, s.tracestate, s.updated_at \
             FROM (SELECT) AS one LEFT JOIN sagas s ON s.saga_id = ANY($1)",
            InboxRows::insert_sql(2)
        )
    });
    let rows = inbox
        .bind(sqlx::query(&READ).bind(saga_ids))
        .fetch_all(&mut *conn)
        .await?;
    let mut fresh = HashSet::new();
    let mut sagas = HashMap::with_capacity(rows.len());
    for row in &rows {
        if fresh.is_empty() {
            fresh = row.try_get::<Vec<Uuid>, _>("fresh")?.into_iter().collect();
        }
        if let Some(saga_id) = row.try_get::<Option<Uuid>, _>("saga_id")? {
            sagas.insert(saga_id, stored_saga(row, saga_id)?);
        }
    }
    Ok((fresh, sagas))
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
pub struct Cause {
    pub input: &'static str,
    pub message_id: String,
    pub message_type: String,
    pub correlation_id: String,
}

/// The trace context a new saga keeps for the messages its timers send later.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub correlation_id: String,
    pub traceparent: String,
    pub tracestate: String,
}

/// One transition to save: the saga after it over the version it was read at (`None`: a new
/// saga), what caused it, and its timers.
#[derive(Clone, Debug)]
pub struct SagaWrite {
    pub previous: Option<(i64, SagaState)>,
    pub next: Saga,
    pub commands: Vec<Command>,
    pub cause: Cause,
    pub origin: Origin,
    pub bookkeeping: Bookkeeping,
}

impl SagaWrite {
    /// The version the saga has once this write is saved.
    pub fn version(&self) -> i64 {
        self.previous.map_or(1, |(version, _)| version + 1)
    }
}

/// Saves transitions of distinct sagas in one statement (one round trip for a consumer's
/// whole batch): each saga row with optimistic concurrency (inserted when new, updated only
/// at the version it was read at), its history row, and its timers armed and disarmed. The
/// saga rows are written first and each timer joins its saga's written row, so a saga is
/// locked before its timers, as in every path that touches both. Fails with
/// [`StoreError::Conflict`] when any saga changed since it was read; the caller's transaction
/// then rolls back and nothing of the batch is saved. `outgoing` (the messages the steps send)
/// are recorded in the outbox by the same statement. Returns the rows of the commands' keys
/// the statement found in the outbox ([`OutboxRows::earlier_sql`]).
///
/// With `alone` (a consumer batch's inbox rows, one message a step), the statement runs with
/// no transaction around it and writes all or nothing by itself: it records the inbox rows too,
/// and when a saga is not at the version read or a message was recorded before, it fails (the
/// `consumer_batch_refused` of the messaging migrations, a serialization failure) having written nothing.
pub async fn save_all(
    conn: &mut PgConnection,
    writes: &[SagaWrite],
    outgoing: &OutboxRows<'_>,
    alone: Option<&InboxRows<'_>>,
) -> Result<Vec<Uuid>, StoreError> {
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let now = Utc::now();
    let n = writes.len();
    let mut ids = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut data = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut traceparents = Vec::with_capacity(n);
    let mut tracestates = Vec::with_capacity(n);
    let mut needs_operator = Vec::with_capacity(n);
    let mut last_errors = Vec::with_capacity(n);
    let mut from_states = Vec::with_capacity(n);
    let mut inputs = Vec::with_capacity(n);
    let mut message_ids = Vec::with_capacity(n);
    let mut message_types = Vec::with_capacity(n);
    let mut commands = Vec::with_capacity(n);
    let mut cause_correlations = Vec::with_capacity(n);
    let (mut arm_ids, mut arm_kinds, mut arm_at) = (Vec::new(), Vec::new(), Vec::new());
    let (mut disarm_ids, mut disarm_kinds) = (Vec::new(), Vec::new());
    for w in writes {
        let id = w.next.order_id;
        let corrupt = |source| StoreError::Corrupt {
            saga_id: id,
            source,
        };
        ids.push(id);
        states.push(w.next.state.as_str());
        data.push(serde_json::to_value(&w.next).map_err(corrupt)?);
        expected.push(w.previous.map(|(version, _)| version));
        customers.push(w.next.order.customer_id.as_str());
        correlations.push(w.origin.correlation_id.as_str());
        traceparents.push(w.origin.traceparent.as_str());
        tracestates.push(w.origin.tracestate.as_str());
        let (needs, error) = w.bookkeeping.operator_flag.columns();
        needs_operator.push(needs);
        last_errors.push(error);
        from_states.push(w.previous.map(|(_, state)| state.as_str()));
        inputs.push(w.cause.input);
        message_ids.push(w.cause.message_id.as_str());
        message_types.push(w.cause.message_type.as_str());
        commands.push(serde_json::to_value(&w.commands).map_err(corrupt)?);
        cause_correlations.push(w.cause.correlation_id.as_str());
        // Timers to arm (kind, when) and to disarm.
        let mut step_armed = false;
        for command in &w.commands {
            match command {
                Command::StartDeadline => {
                    arm_ids.push(id);
                    arm_kinds.push(DEADLINE_TIMER);
                    arm_at.push(now + w.bookkeeping.deadline);
                }
                Command::CancelDeadline => {
                    disarm_ids.push(id);
                    disarm_kinds.push(DEADLINE_TIMER);
                }
                _ => {}
            }
        }
        if let Some(after) = w.bookkeeping.step_timer {
            step_armed = true;
            arm_ids.push(id);
            arm_kinds.push(STEP_TIMER);
            arm_at.push(now + after);
        }
        if !step_armed {
            disarm_ids.push(id);
            disarm_kinds.push(STEP_TIMER);
        }
    }
    /// The first parameter of the inbox rows, after the outbox's.
    const INBOX: usize = 22 + OutboxRows::PARAMETERS;
    static SAVE: LazyLock<String> = LazyLock::new(|| {
        format!(
        "WITH w AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::bigint[], \
               $5::text[], $6::text[], $7::text[], $8::text[], $9::bool[], $10::text[], \
               $11::text[], $12::text[], $13::text[], $14::text[], $15::jsonb[], $16::text[]) \
             AS w(saga_id, state, data, expected, customer_id, correlation_id, traceparent, \
               tracestate, needs_operator, last_error, from_state, input, message_id, \
               message_type, commands, cause_correlation)), \
         inserted AS (INSERT INTO sagas (saga_id, state, data, version, customer_id, correlation_id, traceparent, tracestate) \
               SELECT saga_id, state, data, 1, customer_id, correlation_id, traceparent, tracestate \
               FROM w WHERE expected IS NULL \
               ON CONFLICT (saga_id) DO NOTHING RETURNING saga_id, version), \
         updated AS (UPDATE sagas s SET state = w.state, data = w.data, version = s.version + 1, \
                 updated_at = now(), needs_operator = COALESCE(w.needs_operator, s.needs_operator), \
                 last_error = COALESCE(w.last_error, s.last_error) \
               FROM w WHERE s.saga_id = w.saga_id AND w.expected IS NOT NULL AND s.version = w.expected \
               RETURNING s.saga_id, s.version), \
         s AS (SELECT * FROM inserted UNION ALL SELECT * FROM updated), \
         h AS (INSERT INTO saga_history (saga_id, version, from_state, to_state, input, message_id, message_type, commands, correlation_id) \
               SELECT s.saga_id, s.version, w.from_state, w.state, w.input, w.message_id, w.message_type, w.commands, w.cause_correlation \
               FROM s JOIN w ON w.saga_id = s.saga_id), \
         armed AS (INSERT INTO saga_timers (saga_id, kind, fire_at) \
               SELECT a.saga_id, a.kind, a.fire_at FROM unnest($17::uuid[], $18::text[], $19::timestamptz[]) AS a(saga_id, kind, fire_at) \
               JOIN s ON s.saga_id = a.saga_id \
               ON CONFLICT (saga_id, kind) DO UPDATE SET fire_at = EXCLUDED.fire_at, failures = 0, last_error = NULL), \
         disarmed AS (DELETE FROM saga_timers t USING unnest($20::uuid[], $21::text[]) AS d(saga_id, kind), s \
               WHERE t.saga_id = d.saga_id AND t.kind = d.kind AND s.saga_id = d.saga_id), \
         outgoing AS ({}), \
         fresh AS ({}), \
         counts AS (SELECT (SELECT count(*) FROM s) AS written, (SELECT count(*) FROM fresh) AS recorded) \
         SELECT written, {}, CASE WHEN ${alone} THEN {} END \
         FROM counts",
        OutboxRows::insert_sql(22, None),
        InboxRows::insert_sql(INBOX),
        OutboxRows::earlier_sql(22),
        InboxRows::refused_unless_whole_sql(INBOX, "cardinality($1::uuid[])"),
        alone = INBOX + InboxRows::PARAMETERS,
    )
    });
    let query = sqlx::query(&SAVE)
        .bind(&ids)
        .bind(&states)
        .bind(&data)
        .bind(&expected)
        .bind(&customers)
        .bind(&correlations)
        .bind(&traceparents)
        .bind(&tracestates)
        .bind(&needs_operator)
        .bind(&last_errors)
        .bind(&from_states)
        .bind(&inputs)
        .bind(&message_ids)
        .bind(&message_types)
        .bind(&commands)
        .bind(&cause_correlations)
        .bind(&arm_ids)
        .bind(&arm_kinds)
        .bind(&arm_at)
        .bind(&disarm_ids)
        .bind(&disarm_kinds);
    let none = InboxRows::new(&[]);
    let query = outgoing.bind(query);
    let query = alone.unwrap_or(&none).bind(query).bind(alone.is_some());
    let row = query.fetch_one(&mut *conn).await?;
    let written: i64 = row.try_get(0)?;
    if written == n as i64 {
        return Ok(row.try_get(1)?);
    }
    // Which one: the first whose row is not at the version written (for the error only).
    let found: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT saga_id, version FROM sagas WHERE saga_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
    let conflicted = writes
        .iter()
        .find(|w| !found.contains(&(w.next.order_id, w.version())))
        .map_or(ids[0], |w| w.next.order_id);
    Err(StoreError::Conflict(conflicted))
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
