//! Stock levels: reading them, setting them (with an audit row), and moving units between the
//! available, reserved and committed buckets for reservations.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{Sku, StockLevel};

/// Every SKU, in SKU order.
pub async fn all(conn: &mut PgConnection) -> Result<Vec<StockLevel>, sqlx::Error> {
    let levels: Vec<StockLevel> = sqlx::query_as(
        "SELECT sku, available, reserved, committed, written_off, received FROM stock ORDER BY sku",
    )
    .fetch_all(conn)
    .await?;
    Ok(levels)
}

/// The SKUs of `skus` that exist, in SKU order.
pub async fn some(
    conn: &mut PgConnection,
    skus: &[String],
) -> Result<Vec<StockLevel>, sqlx::Error> {
    let levels: Vec<StockLevel> = sqlx::query_as(
        "SELECT sku, available, reserved, committed, written_off, received FROM stock WHERE sku = ANY($1) ORDER BY sku",
    )
    .bind(skus)
    .fetch_all(conn)
    .await?;
    Ok(levels)
}

/// Sets the units available for sale of `sku`, creating the SKU if new, and records the change
/// in `stock_adjustments` and in the ledger (`received`). Reserved and committed units are left
/// as they are.
pub async fn set(pool: &PgPool, sku: &Sku, available: i64) -> Result<StockLevel, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let before: Option<i64> =
        sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1 FOR UPDATE")
            .bind(sku.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    let level: StockLevel = sqlx::query_as(
        "INSERT INTO stock (sku, available, received) VALUES ($1, $2, $2) \
         ON CONFLICT (sku) DO UPDATE SET available = EXCLUDED.available, \
             received = stock.received + EXCLUDED.available - stock.available, updated_at = now() \
         RETURNING sku, available, reserved, committed, written_off, received",
    )
    .bind(sku.as_str())
    .bind(available)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO stock_adjustments (sku, available_before, available_after) VALUES ($1, $2, $3)",
    )
    .bind(sku.as_str())
    .bind(before)
    .bind(available)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(level)
}

/// Where the units held by reservations go, and what the reservations become.
#[derive(Clone, Copy, Debug)]
pub enum Settle<'a> {
    /// Back to available; the reservations are released for this reason.
    Return(&'a str),
    /// To committed (sold); the reservations are committed.
    Sell,
}

/// Moves the units held by `reservation_ids` (locked by the caller) out of reserved and marks
/// the reservations released or committed, locking the stock rows in SKU order first.
pub async fn settle(
    conn: &mut PgConnection,
    reservation_ids: &[Uuid],
    settle: Settle<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT 1 FROM stock WHERE sku IN \
           (SELECT sku FROM reservation_lines WHERE reservation_id = ANY($1)) \
         ORDER BY sku FOR UPDATE",
    )
    .bind(reservation_ids)
    .execute(&mut *conn)
    .await?;
    // The stock and the reservations in one statement; the status says where the units go.
    let (status, release_reason) = match settle {
        Settle::Return(reason) => ("RELEASED", Some(reason)),
        Settle::Sell => ("COMMITTED", None),
    };
    sqlx::query(
        "WITH held AS (SELECT sku, sum(quantity)::bigint AS quantity FROM reservation_lines \
                       WHERE reservation_id = ANY($1) GROUP BY sku), \
              s AS (UPDATE stock s SET reserved = s.reserved - held.quantity, \
                      available = s.available + CASE WHEN $2 = 'RELEASED' THEN held.quantity ELSE 0 END, \
                      committed = s.committed + CASE WHEN $2 = 'COMMITTED' THEN held.quantity ELSE 0 END, \
                      updated_at = now() \
                    FROM held WHERE s.sku = held.sku) \
         UPDATE reservations SET status = $2, release_reason = COALESCE($3, release_reason), \
                updated_at = now() \
         WHERE reservation_id = ANY($1)",
    )
    .bind(reservation_ids)
    .bind(status)
    .bind(release_reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes off `quantity` units of `sku`: from the available units first, then by releasing
/// the newest reservations holding the SKU. Returns the level after, and the orders whose
/// reservations were released; `None` when the SKU is unknown, an error message when there
/// are not enough units outside committed ones.
pub async fn write_off(
    conn: &mut PgConnection,
    sku: &Sku,
    quantity: i64,
    reason: &str,
) -> Result<Result<(StockLevel, Vec<Uuid>), WriteOffRefused>, sqlx::Error> {
    // Reservations first, then stock: the order every other path locks in.
    let holders: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(
        "SELECT r.reservation_id, r.order_id, l.quantity::bigint FROM reservations r \
         JOIN reservation_lines l USING (reservation_id) \
         WHERE l.sku = $1 AND r.status = 'RESERVED' \
         ORDER BY r.created_at DESC FOR UPDATE OF r",
    )
    .bind(sku.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let Some((available, reserved)): Option<(i64, i64)> =
        sqlx::query_as("SELECT available, reserved FROM stock WHERE sku = $1 FOR UPDATE")
            .bind(sku.as_str())
            .fetch_optional(&mut *conn)
            .await?
    else {
        return Ok(Err(WriteOffRefused::UnknownSku));
    };
    if quantity > available + reserved {
        return Ok(Err(WriteOffRefused::NotEnough {
            available,
            reserved,
        }));
    }
    let mut short = quantity - available;
    let mut released = Vec::new();
    let mut released_orders = Vec::new();
    for (reservation_id, order_id, held) in holders {
        if short <= 0 {
            break;
        }
        short -= held;
        released.push(reservation_id);
        released_orders.push(order_id);
    }
    if !released.is_empty() {
        let why = format!("stock written off: {reason}");
        settle(conn, &released, Settle::Return(&why)).await?;
    }
    let level: StockLevel = sqlx::query_as(
        "UPDATE stock SET available = available - $2, written_off = written_off + $2, updated_at = now() \
         WHERE sku = $1 RETURNING sku, available, reserved, committed, written_off, received",
    )
    .bind(sku.as_str())
    .bind(quantity)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO stock_write_offs (sku, quantity, reason, released_order_ids) VALUES ($1, $2, $3, $4)",
    )
    .bind(sku.as_str())
    .bind(quantity)
    .bind(reason)
    .bind(&released_orders)
    .execute(&mut *conn)
    .await?;
    Ok(Ok((level, released_orders)))
}

/// Why a write-off was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOffRefused {
    UnknownSku,
    /// Committed units are sold: only available and reserved ones can be written off.
    NotEnough {
        available: i64,
        reserved: i64,
    },
}
