//! Deduplication of handled messages, in the handler's own transaction, for a retention
//! period (7 days by default).
//!
//! Why forgetting is safe: a message is refused (dead-lettered for an operator, never
//! applied) when it is older than the retention less a margin for clock skew between the
//! services ([`check_age`]); rows are deleted once their handling is older than the
//! retention ([`purge`]). A message is handled after it was written, so a message young
//! enough to be accepted was, if handled before, handled recently enough to be still in the
//! inbox. Redeliveries (a consumer that crashed before its offset commit) and republished
//! rows (a relay that crashed between the broker's acknowledgement and its delete) come
//! within seconds or minutes, far inside the window.

use std::collections::HashSet;
use std::sync::LazyLock;
use std::time::Duration;

use proto::messaging::v1::Envelope;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, PgPool, Postgres, Row as _};
use uuid::Uuid;

use crate::consumer::HandlerError;

/// How long a handled message's id is kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The clock skew between services tolerated: a tenth of the retention, at most an hour.
fn skew_margin(retention: Duration) -> Duration {
    (retention / 10).min(Duration::from_secs(3600))
}

/// How often a consumer deletes what the inbox no longer needs.
pub(crate) fn purge_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(500), Duration::from_secs(600))
}

/// When the message was written, in milliseconds since the epoch: the envelope's time, or the
/// time in its id (a UUID v7); `None` if neither says.
fn written_at_ms(envelope: &Envelope, id: Uuid) -> Option<u64> {
    if envelope.occurred_at_ms > 0 {
        return u64::try_from(envelope.occurred_at_ms).ok();
    }
    let (seconds, nanos) = id.get_timestamp()?.to_unix();
    Some(seconds * 1000 + u64::from(nanos) / 1_000_000)
}

/// Refuses a message too old for the inbox to tell whether it was handled already.
pub(crate) fn check_age(
    envelope: &Envelope,
    id: Uuid,
    retention: Duration,
) -> Result<(), HandlerError> {
    let Some(written) = written_at_ms(envelope, id) else {
        return Ok(());
    };
    let now = crate::envelope::now_ms().max(0) as u64;
    let oldest_accepted =
        now.saturating_sub((retention - skew_margin(retention)).as_millis() as u64);
    if written < oldest_accepted {
        return Err(HandlerError::Permanent(format!(
            "message {id} was written {:.0?} ago, longer than the inbox's retention ({retention:?}) \
             allows to tell whether it was handled already; not applied, for an operator to decide",
            Duration::from_millis(now.saturating_sub(written))
        )));
    }
    Ok(())
}

/// Deletes the ids handled longer than `retention` ago, a batch at a time.
pub(crate) async fn purge(pool: &PgPool, retention: Duration) {
    loop {
        let deleted = sqlx::query(
            "DELETE FROM inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM inbox \
             WHERE handled_at < now() - make_interval(secs => $1) LIMIT 5000))",
        )
        .bind(retention.as_secs_f64())
        .execute(pool)
        .await;
        match deleted {
            Ok(done) if done.rows_affected() == 5000 => continue,
            Ok(done) => {
                if done.rows_affected() > 0 {
                    tracing::debug!(deleted = done.rows_affected(), "inbox purged");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "purging the inbox failed; the next round retries");
                return;
            }
        }
    }
}

/// Records `message_id` as handled. Returns `false` when it was handled before, in which case
/// the caller must not apply its effect again.
pub async fn record(
    conn: &mut PgConnection,
    message_id: Uuid,
    message_type: &str,
    topic: &str,
) -> Result<bool, sqlx::Error> {
    let fresh = record_all(conn, &[(message_id, message_type, topic)]).await?;
    Ok(fresh.contains(&message_id))
}

/// Records a batch of messages (id, type, topic) as handled, in one statement. Returns the ids
/// recorded now; an id handled before, or twice in `messages`, is recorded once, so the
/// caller applies the effect of each returned id once and of no other.
pub async fn record_all(
    conn: &mut PgConnection,
    messages: &[(Uuid, &str, &str)],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    InboxRows::new(messages).record(conn).await
}

/// A batch's inbox rows as the arrays one `INSERT INTO inbox` binds, for a handler that records
/// them in its own first statement ([`crate::Handler::prepare_recording`]): the batch's read
/// and its deduplication in one round trip.
#[derive(Debug)]
pub struct InboxRows<'a> {
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    topics: Vec<&'a str>,
}

impl<'a> InboxRows<'a> {
    /// The number of parameters [`bind`](Self::bind) adds.
    pub const PARAMETERS: usize = 3;

    /// Messages as (id, type, topic).
    pub fn new(messages: &[(Uuid, &'a str, &'a str)]) -> Self {
        Self {
            ids: messages.iter().map(|m| m.0).collect(),
            types: messages.iter().map(|m| m.1).collect(),
            topics: messages.iter().map(|m| m.2).collect(),
        }
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// For the one statement of a batch taken alone ([`crate::Handler::flush_alone`]), which
    /// selects from columns `written` (the rows it wrote) and `recorded` (the inbox rows of
    /// [`insert_sql`](Self::insert_sql) it recorded): an expression that fails the statement,
    /// having written nothing, unless it wrote `meant` rows and recorded every row bound from
    /// `$first` (messaging migration 0006's `consumer_batch_refused`, a serialization failure).
    pub fn refused_unless_whole_sql(first: usize, meant: &str) -> String {
        format!(
            "CASE WHEN written <> {meant} OR recorded <> cardinality(${first}::uuid[]) \
             THEN consumer_batch_refused(written, {meant}, recorded, cardinality(${first}::uuid[])) END"
        )
    }

    /// The `INSERT` (a statement, or the body of a data-modifying `WITH` query) of the rows
    /// bound from parameter `$first` on, returning the ids recorded now (`message_id`): an id
    /// handled before, or twice in the batch, is recorded and returned once at most.
    pub fn insert_sql(first: usize) -> String {
        format!(
            "INSERT INTO inbox (message_id, message_type, topic) \
             SELECT * FROM unnest(${}::uuid[], ${}::text[], ${}::text[]) \
             ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
            first,
            first + 1,
            first + 2
        )
    }

    /// Records the rows in a statement of their own ([`record_all`]).
    pub async fn record(&self, conn: &mut PgConnection) -> Result<HashSet<Uuid>, sqlx::Error> {
        static INSERT: LazyLock<String> = LazyLock::new(|| InboxRows::insert_sql(1));
        self.bind(sqlx::query(&INSERT))
            .fetch_all(conn)
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect()
    }

    /// Binds the rows' arrays, in the order [`insert_sql`](Self::insert_sql) numbers them.
    pub fn bind<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query.bind(&self.ids).bind(&self.types).bind(&self.topics)
    }
}
