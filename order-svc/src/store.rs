//! The SQL of orders and the catalog. Functions take the connection (or transaction) to run
//! on, so that callers decide what commits together.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use messaging::{InboxRows, OutboxRows};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{PgConnection, PgExecutor, Postgres, Row as _};
use uuid::Uuid;

use crate::domain::{Order, OrderCommand, OrderId, OrderLine, OrderStatus, PaymentId, Product};

/// The whole catalog, by SKU.
pub async fn list_products(db: impl PgExecutor<'_>) -> Result<Vec<Product>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT sku, name, unit_price_cents, currency FROM products ORDER BY sku")
            .fetch_all(db)
            .await?;
    rows.iter().map(product).collect()
}

/// The products among `skus` that are in the catalog, by SKU.
pub async fn products(
    db: impl PgExecutor<'_>,
    skus: &[String],
) -> Result<HashMap<String, Product>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT sku, name, unit_price_cents, currency FROM products WHERE sku = ANY($1)",
    )
    .bind(skus)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| product(row).map(|p| (p.sku.clone(), p)))
        .collect()
}

fn product(row: &PgRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        unit_price_cents: row.try_get("unit_price_cents")?,
        currency: row.try_get("currency")?,
    })
}

/// The order placed with `key` and the fingerprint of its request.
pub async fn find_by_idempotency_key(
    db: impl PgExecutor<'_>,
    key: &str,
) -> Result<Option<(OrderId, String)>, sqlx::Error> {
    let row =
        sqlx::query("SELECT order_id, request_fingerprint FROM orders WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(db)
            .await?;
    row.map(|row| {
        Ok((
            OrderId(row.try_get("order_id")?),
            row.try_get("request_fingerprint")?,
        ))
    })
    .transpose()
}

/// A new order and what it is stored with besides.
pub struct NewOrder<'a> {
    pub order: &'a Order,
    pub idempotency_key: Option<&'a str>,
    pub request_fingerprint: &'a str,
}

/// What [`insert_order`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    Inserted,
    /// Another order holds the idempotency key; nothing was written.
    KeyTaken,
    /// A line's price (or currency) is not the catalog's any more; nothing was written.
    PricesChanged,
}

/// Inserts the order, its lines and its outbox rows (`events`), in one statement: it commits
/// by itself, with no transaction around it, and only if each line's price and the currency
/// are the catalog's (the order was priced from a copy of it).
///
/// The order's timestamps are the ones in `new.order` (microseconds, as stored), so that its
/// events can carry them before the statement runs.
pub async fn insert_order(
    conn: &mut PgConnection,
    new: &NewOrder<'_>,
    events: &OutboxRows<'_>,
) -> Result<Inserted, sqlx::Error> {
    static INSERT: LazyLock<String> = LazyLock::new(|| {
        // ON CONFLICT waits for a concurrent twin holding the key to commit (then does
        // nothing, and neither a line nor an event is written) or roll back (then inserts).
        format!(
            "WITH priced AS (SELECT count(*) = cardinality($11::text[]) AS current \
                   FROM products p JOIN unnest($11::text[], $13::bigint[]) AS c(sku, price) \
                     ON p.sku = c.sku AND p.unit_price_cents = c.price AND p.currency = $5), \
             o AS (INSERT INTO orders (order_id, customer_id, status, total_cents, currency, \
                     payment_method, idempotency_key, request_fingerprint, correlation_id, \
                     created_at, updated_at) \
                   SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10 FROM priced WHERE current \
                   ON CONFLICT (idempotency_key) DO NOTHING \
                   RETURNING order_id), \
             l AS (INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents) \
                   SELECT o.order_id, u.* FROM o, unnest($11::text[], $12::int[], $13::bigint[]) AS u), \
             e AS ({}) \
             SELECT EXISTS (SELECT FROM o), (SELECT current FROM priced)",
            OutboxRows::insert_sql(14, Some("EXISTS (SELECT FROM o)"))
        )
    });
    let order = new.order;
    let skus: Vec<&str> = order.lines.iter().map(|l| l.sku.as_str()).collect();
    let quantities: Vec<i32> = order
        .lines
        .iter()
        .map(|l| i32::try_from(l.quantity).unwrap_or(i32::MAX))
        .collect();
    let prices: Vec<i64> = order.lines.iter().map(|l| l.unit_price_cents).collect();
    let query = sqlx::query(&INSERT)
        .bind(order.id.0)
        .bind(&order.customer_id)
        .bind(order.status.as_str())
        .bind(order.total_cents)
        .bind(&order.currency)
        .bind(&order.payment_method)
        .bind(new.idempotency_key)
        .bind(new.request_fingerprint)
        .bind(&order.correlation_id)
        .bind(order.created_at)
        .bind(&skus)
        .bind(&quantities)
        .bind(&prices);
    let (inserted, priced): (bool, bool) =
        sqlx::FromRow::from_row(&events.bind(query).fetch_one(&mut *conn).await?)?;
    Ok(match (inserted, priced) {
        (true, _) => Inserted::Inserted,
        (false, true) => Inserted::KeyTaken,
        (false, false) => Inserted::PricesChanged,
    })
}

/// The order with its lines, in SKU order.
pub async fn get_order(conn: &mut PgConnection, id: OrderId) -> Result<Option<Order>, sqlx::Error> {
    // One round trip: the order with its lines as arrays (GetOrder's long poll reads this at
    // every status change of every waiting order).
    let row = sqlx::query(
        "SELECT o.customer_id, o.status, o.total_cents, o.currency, o.payment_method, \
             o.payment_id, o.failure_reason, o.correlation_id, o.created_at, o.updated_at, \
             l.skus, l.quantities, l.prices \
         FROM orders o, LATERAL (SELECT array_agg(sku ORDER BY sku) AS skus, \
             array_agg(quantity ORDER BY sku) AS quantities, \
             array_agg(unit_price_cents ORDER BY sku) AS prices \
             FROM order_lines WHERE order_id = o.order_id) l \
         WHERE o.order_id = $1",
    )
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let skus: Vec<String> = row.try_get::<Option<_>, _>("skus")?.unwrap_or_default();
    let quantities: Vec<i32> = row
        .try_get::<Option<_>, _>("quantities")?
        .unwrap_or_default();
    let prices: Vec<i64> = row.try_get::<Option<_>, _>("prices")?.unwrap_or_default();
    let lines = skus
        .into_iter()
        .zip(quantities)
        .zip(prices)
        .map(|((sku, quantity), unit_price_cents)| {
            Ok(OrderLine {
                sku,
                quantity: u32::try_from(quantity).map_err(|e| decode_error("quantity", e))?,
                unit_price_cents,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Some(Order {
        id,
        customer_id: row.try_get("customer_id")?,
        status: status(&row)?,
        lines,
        total_cents: row.try_get("total_cents")?,
        currency: row.try_get("currency")?,
        payment_method: row.try_get("payment_method")?,
        payment_id: row.try_get::<Option<Uuid>, _>("payment_id")?.map(PaymentId),
        failure_reason: row.try_get("failure_reason")?,
        correlation_id: row.try_get("correlation_id")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    }))
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The order moved to the command's status.
    Moved,
    /// The order's status does not allow the command (a repeated, stale or late command).
    Ignored {
        status: OrderStatus,
        payment_id: Option<PaymentId>,
        failure_reason: Option<String>,
    },
    UnknownOrder,
}

/// Moves the order as `command` says when its current status allows it
/// ([`OrderCommand::applies_from`]); one statement in the common case.
pub async fn apply(
    conn: &mut PgConnection,
    id: OrderId,
    command: &OrderCommand,
) -> Result<Applied, sqlx::Error> {
    if !apply_all(&mut *conn, &[(id, command)]).await?.is_empty() {
        return Ok(Applied::Moved);
    }
    not_moved(conn, id).await
}

/// Moves each order as its command says when its current status allows it, in one statement
/// (a batch's commands, at most one per order). Returns the orders that moved; for the others,
/// [`not_moved`] says why.
pub async fn apply_all(
    conn: &mut PgConnection,
    commands: &[(OrderId, &OrderCommand)],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let c = CommandArrays::new(
        commands
            .iter()
            .map(|(id, command)| (Uuid::nil(), *id, *command)),
    );
    c.bind(sqlx::query(
        "UPDATE orders o SET status = c.target, \
             payment_id = COALESCE(c.payment_id, o.payment_id), \
             failure_reason = COALESCE(c.reason, o.failure_reason), \
             updated_at = now() \
         FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[]) \
           AS c(order_id, target, payment_id, reason, allowed) \
         WHERE o.order_id = c.order_id AND o.status = ANY(string_to_array(c.allowed, ',')) \
         RETURNING o.order_id",
    ))
    .fetch_all(conn)
    .await?
    .iter()
    .map(|row| row.try_get(0))
    .collect()
}

/// [`apply_all`] in the statement that records a consumer batch's inbox rows (`inbox`): each
/// command with the id of its message, applied only when that message is recorded now (not
/// handled before). Returns the ids recorded now and the orders that moved.
pub async fn record_and_apply_all(
    conn: &mut PgConnection,
    inbox: &InboxRows<'_>,
    commands: &[(Uuid, OrderId, &OrderCommand)],
) -> Result<(HashSet<Uuid>, Vec<Uuid>), sqlx::Error> {
    static APPLY: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH fresh AS ({}), moved AS ({MOVE}) \
             SELECT ARRAY(SELECT message_id FROM fresh), ARRAY(SELECT order_id FROM moved)",
            InboxRows::insert_sql(7)
        )
    });
    let c = CommandArrays::new(commands.iter().copied());
    let query = c.bind(sqlx::query(&APPLY)).bind(&c.message_ids);
    let row = inbox.bind(query).fetch_one(conn).await?;
    let fresh: Vec<Uuid> = row.try_get(0)?;
    Ok((fresh.into_iter().collect(), row.try_get(1)?))
}

/// A consumer batch of commands taken alone ([`messaging::Handler::takes_alone`]), one per
/// order, each with the id of its message: applies them, records the batch's inbox rows and the
/// replies of the commands as moving their orders (`replies`), in one statement with no
/// transaction around it, all of it or nothing. When a command would not move its order (it
/// is there or past it already, or unknown) or a message was handled before, it fails
/// (`consumer_batch_refused`, a serialization failure) having written nothing, and the
/// consumer handles the batch in a transaction. Returns the rows of the replies' keys the
/// statement found in the outbox ([`OutboxRows::earlier_sql`]).
pub async fn apply_all_alone(
    conn: &mut PgConnection,
    inbox: &InboxRows<'_>,
    commands: &[(Uuid, OrderId, OrderCommand)],
    replies: &OutboxRows<'_>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    const REPLIES: usize = 7 + InboxRows::PARAMETERS;
    static APPLY: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH fresh AS ({}), moved AS ({MOVE}), replies AS ({}), \
                  counts AS (SELECT (SELECT count(*) FROM moved) AS written, \
                                    (SELECT count(*) FROM fresh) AS recorded) \
             SELECT {}, {} FROM counts",
            InboxRows::insert_sql(7),
            OutboxRows::insert_sql(REPLIES, None),
            OutboxRows::earlier_sql(REPLIES),
            InboxRows::refused_unless_whole_sql(7, "cardinality($1::uuid[])"),
        )
    });
    let c = CommandArrays::new(commands.iter().map(|(m, o, c)| (*m, *o, c)));
    let query = inbox.bind(c.bind(sqlx::query(&APPLY)).bind(&c.message_ids));
    replies.bind(query).fetch_one(conn).await?.try_get(0)
}

/// The `UPDATE` of a batch's commands bound from `$1` ([`CommandArrays`], then the message
/// ids): each moves its order when the order's status allows it and its message is in
/// `fresh` (recorded now in the inbox); returns the orders moved.
const MOVE: &str = "UPDATE orders o SET status = c.target, \
         payment_id = COALESCE(c.payment_id, o.payment_id), \
         failure_reason = COALESCE(c.reason, o.failure_reason), \
         updated_at = now() \
     FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::uuid[]) \
       AS c(order_id, target, payment_id, reason, allowed, message_id) \
     WHERE o.order_id = c.order_id \
       AND o.status = ANY(string_to_array(c.allowed, ',')) \
       AND c.message_id IN (SELECT message_id FROM fresh) \
     RETURNING o.order_id";

/// Commands as the arrays the statements above bind.
struct CommandArrays<'a> {
    ids: Vec<Uuid>,
    targets: Vec<&'static str>,
    payment_ids: Vec<Option<Uuid>>,
    reasons: Vec<Option<&'a str>>,
    allowed: Vec<String>,
    message_ids: Vec<Uuid>,
}

impl<'a> CommandArrays<'a> {
    fn new(commands: impl ExactSizeIterator<Item = (Uuid, OrderId, &'a OrderCommand)>) -> Self {
        let n = commands.len();
        let mut c = Self {
            ids: Vec::with_capacity(n),
            targets: Vec::with_capacity(n),
            payment_ids: Vec::with_capacity(n),
            reasons: Vec::with_capacity(n),
            allowed: Vec::with_capacity(n),
            message_ids: Vec::with_capacity(n),
        };
        for (message_id, id, command) in commands {
            let (payment_id, failure_reason) = match command {
                OrderCommand::MarkPaymentInitiated { payment_id } => (Some(payment_id.0), None),
                OrderCommand::Complete => (None, None),
                OrderCommand::Fail { reason } => (None, Some(reason.as_str())),
            };
            c.ids.push(id.0);
            c.targets.push(command.target().as_str());
            c.payment_ids.push(payment_id);
            c.reasons.push(failure_reason);
            let from: Vec<&str> = command
                .applies_from()
                .into_iter()
                .map(OrderStatus::as_str)
                .collect();
            c.allowed.push(from.join(","));
            c.message_ids.push(message_id);
        }
        c
    }

    /// Binds $1 to $5.
    fn bind<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.targets)
            .bind(&self.payment_ids)
            .bind(&self.reasons)
            .bind(&self.allowed)
    }
}
/// Why a command did not move the order: its status does not allow it, or there is no such
/// order.
pub async fn not_moved(conn: &mut PgConnection, id: OrderId) -> Result<Applied, sqlx::Error> {
    let row =
        sqlx::query("SELECT status, payment_id, failure_reason FROM orders WHERE order_id = $1")
            .bind(id.0)
            .fetch_optional(&mut *conn)
            .await?;
    match row {
        None => Ok(Applied::UnknownOrder),
        Some(row) => Ok(Applied::Ignored {
            status: status(&row)?,
            payment_id: row.try_get::<Option<Uuid>, _>("payment_id")?.map(PaymentId),
            failure_reason: row.try_get("failure_reason")?,
        }),
    }
}

fn status(row: &PgRow) -> Result<OrderStatus, sqlx::Error> {
    let name: &str = row.try_get("status")?;
    OrderStatus::from_db(name)
        .ok_or_else(|| decode_error("status", format!("unknown order status {name:?}")))
}

fn decode_error(column: &str, error: impl std::fmt::Display) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: error.to_string().into(),
    }
}

/// One page of a listing: up to `limit` orders with their lines whose id comes after `after`
/// (from the first when `None`), in id order, with any of `statuses` (every status when empty).
pub async fn list_page(
    conn: &mut PgConnection,
    after: Option<OrderId>,
    statuses: &[&str],
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT order_id, customer_id, status, total_cents, currency, payment_method, payment_id, \
             failure_reason, correlation_id, created_at, updated_at \
         FROM orders WHERE order_id > $1 AND (cardinality($2::text[]) = 0 OR status = ANY($2)) \
         ORDER BY order_id LIMIT $3",
    )
    .bind(after.map_or(Uuid::nil(), |id| id.0))
    .bind(statuses)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    with_lines(conn, &rows).await
}

/// Up to `limit` orders of `customer_id` with their lines, newest first (by creation time,
/// then id), older than `before` when given.
pub async fn list_customer_page(
    conn: &mut PgConnection,
    customer_id: &str,
    before: Option<(DateTime<Utc>, OrderId)>,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    let (created_at, id) = before.map_or((None, Uuid::max()), |(t, id)| (Some(t), id.0));
    let rows = sqlx::query(
        "SELECT order_id, customer_id, status, total_cents, currency, payment_method, payment_id, \
             failure_reason, correlation_id, created_at, updated_at \
         FROM orders WHERE customer_id = $1 \
             AND ($2::timestamptz IS NULL OR (created_at, order_id) < ($2, $3)) \
         ORDER BY created_at DESC, order_id DESC LIMIT $4",
    )
    .bind(customer_id)
    .bind(created_at)
    .bind(id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    with_lines(conn, &rows).await
}

/// The orders of `rows`, in their order, each with its lines (read in one query).
async fn with_lines(conn: &mut PgConnection, rows: &[PgRow]) -> Result<Vec<Order>, sqlx::Error> {
    let ids: Vec<Uuid> = rows
        .iter()
        .map(|row| row.try_get("order_id"))
        .collect::<Result<_, _>>()?;
    let mut lines: HashMap<Uuid, Vec<OrderLine>> = HashMap::with_capacity(ids.len());
    for line in sqlx::query(
        "SELECT order_id, sku, quantity, unit_price_cents FROM order_lines \
         WHERE order_id = ANY($1) ORDER BY order_id, sku",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?
    {
        let quantity: i32 = line.try_get("quantity")?;
        lines
            .entry(line.try_get("order_id")?)
            .or_default()
            .push(OrderLine {
                sku: line.try_get("sku")?,
                quantity: u32::try_from(quantity).map_err(|e| decode_error("quantity", e))?,
                unit_price_cents: line.try_get("unit_price_cents")?,
            });
    }
    rows.iter()
        .map(|row| {
            let id: Uuid = row.try_get("order_id")?;
            Ok(Order {
                id: OrderId(id),
                customer_id: row.try_get("customer_id")?,
                status: status(row)?,
                lines: lines.remove(&id).unwrap_or_default(),
                total_cents: row.try_get("total_cents")?,
                currency: row.try_get("currency")?,
                payment_method: row.try_get("payment_method")?,
                payment_id: row.try_get::<Option<Uuid>, _>("payment_id")?.map(PaymentId),
                failure_reason: row.try_get("failure_reason")?,
                correlation_id: row.try_get("correlation_id")?,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
            })
        })
        .collect()
}
