//! The `payments` table.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use messaging::{InboxRows, OutboxRows};
use sqlx::{FromRow as _, PgConnection, PgExecutor, PgPool, Row as _};
use uuid::Uuid;

use crate::payment::{CustomerId, NewPayment, OrderId, Payment, PaymentId, PaymentStatus};

const COLUMNS: &str = "payment_id, order_id, amount_cents, currency, payment_method, status, \
                       decline_reason, correlation_id, traceparent, customer_id, tombstone, \
                       attempt_key, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct Row {
    payment_id: Uuid,
    order_id: Uuid,
    amount_cents: i64,
    currency: String,
    payment_method: String,
    status: String,
    decline_reason: Option<String>,
    correlation_id: String,
    traceparent: String,
    customer_id: Option<String>,
    tombstone: bool,
    attempt_key: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<Row> for Payment {
    type Error = sqlx::Error;

    fn try_from(row: Row) -> Result<Self, Self::Error> {
        Ok(Payment {
            payment_id: PaymentId(row.payment_id),
            order_id: OrderId(row.order_id),
            amount_cents: row.amount_cents,
            currency: row.currency,
            payment_method: row.payment_method,
            status: row
                .status
                .parse()
                .map_err(|e: String| sqlx::Error::ColumnDecode {
                    index: "status".into(),
                    source: e.into(),
                })?,
            decline_reason: row.decline_reason,
            correlation_id: row.correlation_id,
            traceparent: row.traceparent,
            customer_id: row.customer_id.map(CustomerId),
            tombstone: row.tombstone,
            attempt_key: row.attempt_key,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

fn payment(row: Option<Row>) -> Result<Option<Payment>, sqlx::Error> {
    row.map(Payment::try_from).transpose()
}

/// Records the order's payment unless it has one already. Returns the order's payment (which may
/// be a tombstone) and whether it was created now.
pub async fn insert(
    conn: &mut PgConnection,
    new: &NewPayment,
) -> Result<(Payment, bool), sqlx::Error> {
    let inserted: Option<Row> = sqlx::query_as(&format!(
        "INSERT INTO payments (payment_id, order_id, amount_cents, currency, payment_method, \
                               status, decline_reason, correlation_id, traceparent, \
                               customer_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (order_id) DO NOTHING \
         RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(new.order_id)
    .bind(new.amount_cents)
    .bind(&new.currency)
    .bind(&new.payment_method)
    .bind(new.status.as_str())
    .bind(new.decline_reason.as_deref())
    .bind(&new.correlation_id)
    .bind(&new.traceparent)
    .bind(new.customer_id.as_ref())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(created) = payment(inserted)? {
        return Ok((created, true));
    }
    // The conflicting insert has committed (ON CONFLICT waited for it), so this sees its row.
    let row = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE order_id = $1"
    ))
    .bind(new.order_id)
    .fetch_optional(&mut *conn)
    .await?;
    match payment(row)? {
        Some(existing) => Ok((existing, false)),
        None => Err(sqlx::Error::RowNotFound),
    }
}

/// [`insert`] for a batch's charges (at most one per order), in the statement that records the
/// batch's inbox rows (`inbox`): each charge with the id of its message, recorded only when that
/// message is recorded now (not handled before) and its order has no payment yet. Returns the
/// message ids recorded now and the payments recorded.
pub async fn record_and_insert_all(
    conn: &mut PgConnection,
    inbox: &InboxRows<'_>,
    charges: &[(Uuid, NewPayment)],
) -> Result<(HashSet<Uuid>, Vec<Payment>), sqlx::Error> {
    static INSERT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH fresh AS ({}), inserted AS ({INSERT_CHARGES} RETURNING {COLUMNS}) \
             SELECT ARRAY(SELECT message_id FROM fresh) AS fresh, inserted.* \
             FROM (SELECT) AS one LEFT JOIN inserted ON true",
            InboxRows::insert_sql(CHARGE_PARAMETERS + 1)
        )
    });
    let charges: Vec<(Uuid, PaymentId, &NewPayment)> = charges
        .iter()
        .map(|(message, new)| (*message, PaymentId(Uuid::now_v7()), new))
        .collect();
    let arrays = ChargeArrays::new(&charges);
    let rows = inbox
        .bind(arrays.bind(sqlx::query(&INSERT)))
        .fetch_all(&mut *conn)
        .await?;
    let mut fresh = HashSet::new();
    let mut inserted = Vec::new();
    for row in &rows {
        if fresh.is_empty() {
            fresh = row.try_get::<Vec<Uuid>, _>("fresh")?.into_iter().collect();
        }
        if row.try_get::<Option<Uuid>, _>("payment_id")?.is_some() {
            inserted.push(Payment::try_from(Row::from_row(row)?)?);
        }
    }
    Ok((fresh, inserted))
}

/// A consumer batch of charges taken alone ([`messaging::Handler::takes_alone`]), one per
/// order, each with the id of its message and the payment id it gets: records them, the
/// batch's inbox rows and their replies (`replies`) in one statement with no transaction
/// around it, all of it or nothing. When an order has a payment already (or a tombstone) or a
/// message was handled before, it fails (`consumer_batch_refused`, a serialization failure)
/// having written nothing, and the consumer handles the batch in a transaction. Returns the
/// rows of the replies' keys the statement found in the outbox ([`OutboxRows::earlier_sql`]).
pub async fn charge_all_alone(
    conn: &mut PgConnection,
    inbox: &InboxRows<'_>,
    charges: &[(Uuid, PaymentId, NewPayment)],
    replies: &OutboxRows<'_>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    const INBOX: usize = CHARGE_PARAMETERS + 1;
    const REPLIES: usize = INBOX + InboxRows::PARAMETERS;
    static INSERT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH fresh AS ({}), inserted AS ({INSERT_CHARGES} RETURNING order_id), \
                  replies AS ({}), \
                  counts AS (SELECT (SELECT count(*) FROM inserted) AS written, \
                                    (SELECT count(*) FROM fresh) AS recorded) \
             SELECT {}, {} FROM counts",
            InboxRows::insert_sql(INBOX),
            OutboxRows::insert_sql(REPLIES, None),
            OutboxRows::earlier_sql(REPLIES),
            InboxRows::refused_unless_whole_sql(INBOX, "cardinality($2::uuid[])"),
        )
    });
    let arrays = ChargeArrays::new(charges);
    let query = inbox.bind(arrays.bind(sqlx::query(&INSERT)));
    replies.bind(query).fetch_one(&mut *conn).await?.try_get(0)
}

/// The `INSERT` of a batch's charges bound from `$1` ([`ChargeArrays`]), each only when its
/// message is in `fresh` (recorded now in the inbox) and its order has no payment yet.
const INSERT_CHARGES: &str = "INSERT INTO payments (payment_id, order_id, amount_cents, currency, \
       payment_method, status, decline_reason, correlation_id, traceparent, customer_id) \
     SELECT c.payment_id, c.order_id, c.amount_cents, c.currency, c.payment_method, c.status, \
       c.decline_reason, c.correlation_id, c.traceparent, c.customer_id \
     FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::text[], \
       $7::text[], $8::text[], $9::text[], $10::text[], $11::uuid[]) \
       AS c(payment_id, order_id, amount_cents, currency, payment_method, status, \
         decline_reason, correlation_id, traceparent, customer_id, message_id) \
     WHERE c.message_id IN (SELECT message_id FROM fresh) \
     ON CONFLICT (order_id) DO NOTHING";

/// The parameters [`ChargeArrays::bind`] adds.
const CHARGE_PARAMETERS: usize = 11;

/// Charges (message id, payment id, payment) as the arrays [`INSERT_CHARGES`] binds.
struct ChargeArrays<'a> {
    payment_ids: Vec<Uuid>,
    order_ids: Vec<Uuid>,
    amounts: Vec<i64>,
    currencies: Vec<&'a str>,
    methods: Vec<&'a str>,
    statuses: Vec<&'a str>,
    reasons: Vec<Option<&'a str>>,
    correlations: Vec<&'a str>,
    traceparents: Vec<&'a str>,
    customers: Vec<Option<&'a str>>,
    message_ids: Vec<Uuid>,
}

impl<'a> ChargeArrays<'a> {
    fn new<P: Borrow<NewPayment>>(charges: &'a [(Uuid, PaymentId, P)]) -> Self {
        Self {
            payment_ids: charges.iter().map(|(_, id, _)| id.0).collect(),
            order_ids: charges
                .iter()
                .map(|(.., c)| c.borrow().order_id.0)
                .collect(),
            amounts: charges
                .iter()
                .map(|(.., c)| c.borrow().amount_cents)
                .collect(),
            currencies: charges
                .iter()
                .map(|(.., c)| c.borrow().currency.as_str())
                .collect(),
            methods: charges
                .iter()
                .map(|(.., c)| c.borrow().payment_method.as_str())
                .collect(),
            statuses: charges
                .iter()
                .map(|(.., c)| c.borrow().status.as_str())
                .collect(),
            reasons: charges
                .iter()
                .map(|(.., c)| c.borrow().decline_reason.as_deref())
                .collect(),
            correlations: charges
                .iter()
                .map(|(.., c)| c.borrow().correlation_id.as_str())
                .collect(),
            traceparents: charges
                .iter()
                .map(|(.., c)| c.borrow().traceparent.as_str())
                .collect(),
            customers: charges
                .iter()
                .map(|(.., c)| c.borrow().customer_id.as_ref().map(|id| id.0.as_str()))
                .collect(),
            message_ids: charges.iter().map(|(message, ..)| *message).collect(),
        }
    }

    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.payment_ids)
            .bind(&self.order_ids)
            .bind(&self.amounts)
            .bind(&self.currencies)
            .bind(&self.methods)
            .bind(&self.statuses)
            .bind(&self.reasons)
            .bind(&self.correlations)
            .bind(&self.traceparents)
            .bind(&self.customers)
            .bind(&self.message_ids)
    }
}

pub async fn find<'e>(
    db: impl PgExecutor<'e>,
    id: PaymentId,
) -> Result<Option<Payment>, sqlx::Error> {
    let row = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE payment_id = $1 AND NOT tombstone"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?;
    payment(row)
}

pub async fn find_by_order<'e>(
    db: impl PgExecutor<'e>,
    id: OrderId,
) -> Result<Option<Payment>, sqlx::Error> {
    let row = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE order_id = $1 AND NOT tombstone"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?;
    payment(row)
}

/// The payment, locked until the end of the caller's transaction, so that concurrent
/// verifications and compensations of one payment take turns.
pub async fn lock(conn: &mut PgConnection, id: PaymentId) -> Result<Option<Payment>, sqlx::Error> {
    let row = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE payment_id = $1 AND NOT tombstone FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    payment(row)
}

/// The order's payment, or its tombstone, locked like [`lock`].
pub async fn lock_by_order(
    conn: &mut PgConnection,
    id: OrderId,
) -> Result<Option<Payment>, sqlx::Error> {
    let row = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE order_id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    payment(row)
}

/// Records that a verification is about to ask the provider, if the payment still awaits one
/// and, when `customer` is given, is that customer's: its idempotency key is `key`, unless an
/// earlier attempt left one, which is kept (so every try of one payment is the same attempt to
/// the provider). Returns the payment as it stands, whoever's it is: the caller tells another
/// customer's (or one whose customer is unknown) from the row, which nothing here changed.
pub async fn begin_attempt(
    pool: &PgPool,
    id: PaymentId,
    key: Uuid,
    customer: Option<&CustomerId>,
) -> Result<Option<Payment>, sqlx::Error> {
    let row = sqlx::query_as(&format!(
        "UPDATE payments SET \
             attempt_key = COALESCE(attempt_key, $2), attempt_started_at = now() \
         WHERE payment_id = $1 AND NOT tombstone AND status = 'AWAITING_VERIFICATION' \
           AND ($3::text IS NULL OR customer_id = $3) \
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(key)
    .bind(customer)
    .fetch_optional(pool)
    .await?;
    match payment(row)? {
        Some(payment) => Ok(Some(payment)),
        // Decided already, another customer's, or unknown: nothing to attempt. A payment's
        // customer never changes, so this read tells whose it is as the update saw it.
        None => find(pool, id).await,
    }
}

/// Records the provider's answer to attempt `key`, if the payment still awaits it, with its
/// outbox rows (`events`), in one statement that commits by itself; `None` (and nothing
/// written) when it was settled meanwhile (by another try of the same attempt, or by a
/// compensation).
pub async fn settle(
    conn: &mut PgConnection,
    id: PaymentId,
    key: Uuid,
    status: PaymentStatus,
    decline_reason: Option<&str>,
    events: &OutboxRows<'_>,
) -> Result<Option<(Payment, Vec<Uuid>)>, sqlx::Error> {
    static SETTLE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH u AS (UPDATE payments SET status = $3, \
                          decline_reason = COALESCE($4, decline_reason), updated_at = now() \
                        WHERE payment_id = $1 AND attempt_key = $2 \
                          AND status = 'AWAITING_VERIFICATION' \
                        RETURNING {COLUMNS}), \
                  e AS ({}) \
             SELECT *, {} AS earlier FROM u",
            OutboxRows::insert_sql(5, Some("EXISTS (SELECT FROM u)")),
            OutboxRows::earlier_sql(5)
        )
    });
    let query = sqlx::query(&SETTLE)
        .bind(id)
        .bind(key)
        .bind(status.as_str())
        .bind(decline_reason);
    let Some(row) = events.bind(query).fetch_optional(conn).await? else {
        return Ok(None);
    };
    let earlier = row.try_get("earlier")?;
    Ok(payment(Some(Row::from_row(&row)?))?.map(|payment| (payment, earlier)))
}

/// Records a tombstone for an order with no payment: a compensation came first, so a charge
/// arriving later must take nothing. Returns false when the order has a row already (a charge
/// committed meanwhile).
pub async fn insert_tombstone(
    conn: &mut PgConnection,
    order_id: OrderId,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO payments (payment_id, order_id, amount_cents, currency, payment_method, \
                               status, decline_reason, tombstone) \
         VALUES ($1, $2, 0, '', '', $3, $4, true) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(order_id)
    .bind(PaymentStatus::Voided.as_str())
    .bind(reason)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Sets the status (and the reason of a decline) of a payment the caller has locked.
pub async fn set_status(
    conn: &mut PgConnection,
    id: PaymentId,
    status: PaymentStatus,
    decline_reason: Option<&str>,
) -> Result<Payment, sqlx::Error> {
    let row: Row = sqlx::query_as(&format!(
        "UPDATE payments SET status = $2, decline_reason = COALESCE($3, decline_reason), updated_at = now() \
         WHERE payment_id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(status.as_str())
    .bind(decline_reason)
    .fetch_one(conn)
    .await?;
    Payment::try_from(row)
}

/// One page of a listing: up to `limit` payments of orders whose id comes after `after` (from
/// the first when `None`), in order id order.
pub async fn list_page<'e>(
    db: impl PgExecutor<'e>,
    after: Option<OrderId>,
    limit: i64,
) -> Result<Vec<Payment>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE order_id > $1 AND NOT tombstone \
         ORDER BY order_id LIMIT $2"
    ))
    .bind(after.map_or(Uuid::nil(), |id| id.0))
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.into_iter().map(Payment::try_from).collect()
}
