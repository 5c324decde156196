//! Reservations: reserving every line of an order or none, committing, releasing, the expiry
//! sweep, and reading one back. Every change is idempotent by state: repeating a command
//! repeats its outcome without a second effect.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use messaging::{InboxRows, OutboxRows};
use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use crate::domain::{
    CommitOutcome, Lines, OrderId, ReleaseOutcome, Reservation, ReservationId, ReservationLine,
    ReservationStatus, ReserveFailure, ReserveOutcome,
};
use crate::store::stock::{self, Settle};

/// `release_reason` of reservations released by the sweep or by a commit that came too late.
pub const EXPIRED: &str = "expired";

/// The reservation row of an order, without its lines.
#[derive(Debug)]
struct Head {
    id: ReservationId,
    status: ReservationStatus,
    expires_at: Option<DateTime<Utc>>,
    release_reason: Option<String>,
    /// Why the reservation was refused, if it was (then `release_reason` has the reason).
    refusal: Option<ReserveFailure>,
    /// `expires_at <= now()`, by the database's clock.
    expired: bool,
}

type HeadRow = (
    Uuid,
    String,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<String>,
    bool,
);

fn head_of(row: HeadRow) -> Result<Head, sqlx::Error> {
    let (id, status, expires_at, release_reason, refusal, expired) = row;
    Ok(Head {
        id: ReservationId(id),
        status: ReservationStatus::from_db(&status)?,
        expires_at,
        release_reason,
        refusal: refusal
            .as_deref()
            .map(ReserveFailure::from_refusal)
            .transpose()?,
        expired,
    })
}

/// The reservation row of `order_id`.
async fn head(conn: &mut PgConnection, order_id: OrderId) -> Result<Option<Head>, sqlx::Error> {
    let row: Option<HeadRow> = sqlx::query_as(
        "SELECT reservation_id, status, expires_at, release_reason, refusal, \
                COALESCE(expires_at <= now(), false) \
         FROM reservations WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await?;
    row.map(head_of).transpose()
}

/// The reservation row of `order_id` as it was, locked, and what it holds settled in the same
/// statement when it holds stock (`RESERVED`): sold ([`Settle::Sell`]; returned as expired
/// instead when it has expired) or returned ([`Settle::Return`]). Its stock rows are locked in
/// SKU order (the order every path locks them in) before any is written.
async fn settle_head(
    conn: &mut PgConnection,
    order_id: OrderId,
    settle: Settle<'_>,
) -> Result<Option<Head>, sqlx::Error> {
    let (sell, reason) = match settle {
        Settle::Sell => (true, EXPIRED),
        Settle::Return(reason) => (false, reason),
    };
    let row: Option<HeadRow> = sqlx::query_as(
        "WITH h AS (SELECT reservation_id, status, expires_at, release_reason, refusal, \
                       COALESCE(expires_at <= now(), false) AS expired \
                    FROM reservations WHERE order_id = $1 FOR UPDATE), \
              settled AS (SELECT reservation_id, $2 AND NOT expired AS sold FROM h \
                          WHERE status = 'RESERVED'), \
              held AS (SELECT l.sku, sum(l.quantity)::bigint AS quantity \
                       FROM settled JOIN reservation_lines l USING (reservation_id) GROUP BY l.sku), \
              k AS (SELECT sku FROM stock WHERE sku IN (SELECT sku FROM held) ORDER BY sku FOR UPDATE), \
              s AS (UPDATE stock s SET reserved = s.reserved - held.quantity, \
                      available = s.available + CASE WHEN settled.sold THEN 0 ELSE held.quantity END, \
                      committed = s.committed + CASE WHEN settled.sold THEN held.quantity ELSE 0 END, \
                      updated_at = now() \
                    FROM held, settled \
                    WHERE s.sku = held.sku AND (SELECT count(*) FROM k) > 0), \
              r AS (UPDATE reservations r \
                    SET status = CASE WHEN settled.sold THEN 'COMMITTED' ELSE 'RELEASED' END, \
                        release_reason = CASE WHEN settled.sold THEN r.release_reason ELSE $3 END, \
                        updated_at = now() \
                    FROM settled WHERE r.reservation_id = settled.reservation_id) \
         SELECT reservation_id, status, expires_at, release_reason, refusal, expired FROM h",
    )
    .bind(order_id)
    .bind(sell)
    .bind(reason)
    .fetch_optional(conn)
    .await?;
    row.map(head_of).transpose()
}

/// What a repeated ReserveInventory answers for an order that already has a reservation.
fn reserve_outcome_of(head: &Head) -> ReserveOutcome {
    match head.status {
        ReservationStatus::Reserved | ReservationStatus::Committed => ReserveOutcome::Reserved {
            reservation_id: head.id,
            expires_at: head.expires_at.unwrap_or_default(),
        },
        ReservationStatus::Released => match head.refusal {
            // Refused before: the same refusal.
            Some(failure) => ReserveOutcome::Failed {
                failure,
                reason: head.release_reason.clone().unwrap_or_default(),
            },
            None => ReserveOutcome::Failed {
                failure: ReserveFailure::AlreadyReleased,
                reason: "reservation was already released".to_owned(),
            },
        },
    }
}

/// Records a refusal as a tombstone holding nothing, so that the same ReserveInventory sent
/// again is refused alike, whatever the stock is by then. A reservation or release of the
/// order committed meanwhile wins, and its outcome is returned.
async fn refuse(
    conn: &mut PgConnection,
    order_id: OrderId,
    failure: ReserveFailure,
    reason: String,
) -> Result<ReserveOutcome, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO reservations (reservation_id, order_id, status, release_reason, refusal) \
         VALUES ($1, $2, 'RELEASED', $3, $4) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(ReservationId::new())
    .bind(order_id)
    .bind(&reason)
    .bind(failure.as_refusal())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(ReserveOutcome::Failed { failure, reason });
    }
    let existing = head(conn, order_id).await?.ok_or_else(|| {
        sqlx::Error::Protocol(format!("reservation of order {order_id} vanished"))
    })?;
    Ok(reserve_outcome_of(&existing))
}

/// Reserves every line for `order_id`, or nothing. An order has at most one reservation: if it
/// has one already (or a release or a refusal came first), its outcome is returned and nothing
/// more is held. A refusal is recorded.
pub async fn reserve(
    conn: &mut PgConnection,
    order_id: OrderId,
    lines: &Lines,
    ttl: Duration,
) -> Result<ReserveOutcome, sqlx::Error> {
    // No read of an existing reservation first: the common case has none, and one that
    // exists (or a release or a refusal that came first) makes the insert below, or the
    // refusal's, conflict, and then its outcome is returned and nothing more is held.
    let skus = lines.skus();
    let quantities = lines.quantities();
    // One statement: the stock rows locked in SKU order (the order every path locks them in,
    // held until the transaction ends) and checked; if every line can be held, the order
    // claimed, the stock held and the lines recorded. A reservation or release of the same
    // order committed meanwhile wins, and then nothing is held. The levels read come back for
    // a refusal's reason.
    let reservation_id = ReservationId::new();
    let (expires_at, known, levels): (Option<DateTime<Utc>>, Vec<String>, Vec<i64>) =
        sqlx::query_as(
            "WITH w AS (SELECT * FROM unnest($4::text[], $5::bigint[]) AS w(sku, quantity)), \
                  k AS (SELECT sku, available FROM stock WHERE sku = ANY($4) \
                        ORDER BY sku FOR UPDATE), \
                  ok AS (SELECT count(*) = cardinality($4) AND bool_and(k.available >= w.quantity) \
                           AS enough \
                         FROM w JOIN k USING (sku)), \
                  r AS (INSERT INTO reservations (reservation_id, order_id, status, expires_at) \
                        SELECT $1, $2, 'RESERVED', now() + make_interval(secs => $3) \
                        WHERE (SELECT enough FROM ok) \
                        ON CONFLICT (order_id) DO NOTHING RETURNING reservation_id, expires_at), \
                  h AS (UPDATE stock s SET available = s.available - w.quantity, \
                                           reserved = s.reserved + w.quantity, updated_at = now() \
                        FROM w WHERE s.sku = w.sku AND EXISTS (SELECT FROM r)), \
                  l AS (INSERT INTO reservation_lines (reservation_id, sku, quantity) \
                        SELECT r.reservation_id, w.sku, w.quantity FROM r, w) \
             SELECT (SELECT expires_at FROM r), \
                    COALESCE((SELECT array_agg(sku ORDER BY sku) FROM k), '{}'), \
                    COALESCE((SELECT array_agg(available ORDER BY sku) FROM k), '{}')",
        )
        .bind(reservation_id)
        .bind(order_id)
        .bind(ttl.as_secs_f64())
        .bind(&skus)
        .bind(&quantities)
        .fetch_one(&mut *conn)
        .await?;
    let available: HashMap<String, i64> = known.into_iter().zip(levels).collect();
    if expires_at.is_none() {
        let unknown: Vec<&str> = skus
            .iter()
            .copied()
            .filter(|s| !available.contains_key(*s))
            .collect();
        if !unknown.is_empty() {
            let reason = format!("unknown SKU: {}", unknown.join(", "));
            return refuse(conn, order_id, ReserveFailure::UnknownSku, reason).await;
        }
        let short: Vec<String> = lines
            .iter()
            .filter_map(|(sku, asked)| {
                let free = available.get(sku).copied().unwrap_or_default();
                (free < asked).then(|| format!("{sku} (asked {asked}, available {free})"))
            })
            .collect();
        if !short.is_empty() {
            let reason = format!("out of stock: {}", short.join(", "));
            return refuse(conn, order_id, ReserveFailure::OutOfStock, reason).await;
        }
    }
    let Some(expires_at) = expires_at else {
        let existing = head(conn, order_id).await?.ok_or_else(|| {
            sqlx::Error::Protocol(format!("reservation of order {order_id} vanished"))
        })?;
        return Ok(reserve_outcome_of(&existing));
    };
    Ok(ReserveOutcome::Reserved {
        reservation_id,
        expires_at,
    })
}

/// Sells the stock held for `order_id`, if it is still held and has not expired. An expired
/// reservation is released on the spot.
pub async fn commit(
    conn: &mut PgConnection,
    order_id: OrderId,
) -> Result<CommitOutcome, sqlx::Error> {
    let head = settle_head(conn, order_id, Settle::Sell).await?;
    Ok(commit_outcome(head))
}

/// What a commit answers, from the reservation as it was before the commit settled it.
fn commit_outcome(head: Option<Head>) -> CommitOutcome {
    let Some(head) = head else {
        return CommitOutcome::Failed {
            reason: "no reservation for order".to_owned(),
        };
    };
    match head.status {
        ReservationStatus::Committed => CommitOutcome::Committed {
            reservation_id: head.id,
        },
        ReservationStatus::Released if head.refusal.is_some() => CommitOutcome::Failed {
            reason: format!(
                "reservation was refused: {}",
                head.release_reason.as_deref().unwrap_or_default()
            ),
        },
        ReservationStatus::Released => CommitOutcome::Failed {
            reason: released_reason(head.release_reason.as_deref()),
        },
        // Released as expired by the commit.
        ReservationStatus::Reserved if head.expired => CommitOutcome::Failed {
            reason: released_reason(Some(EXPIRED)),
        },
        ReservationStatus::Reserved => CommitOutcome::Committed {
            reservation_id: head.id,
        },
    }
}

/// [`commit`] for a batch's commits (at most one per order), in the statement that records the
/// batch's inbox rows (`inbox`): each order with the id of its message, committed only when that
/// message is recorded now (not handled before). The reservations are locked in order id order,
/// then their stock rows in SKU order. Returns the message ids recorded now and the outcome of
/// each order committed.
pub async fn record_and_commit_all(
    conn: &mut PgConnection,
    inbox: &InboxRows<'_>,
    commits: &[(Uuid, OrderId)],
) -> Result<(HashSet<Uuid>, HashMap<Uuid, CommitOutcome>), sqlx::Error> {
    static COMMIT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH fresh AS ({}), {COMMIT_ALL} \
             SELECT ARRAY(SELECT message_id FROM fresh) AS fresh, h.order_id, h.reservation_id, \
                    h.status, h.expires_at, h.release_reason, h.refusal, h.expired \
             FROM (SELECT) AS one LEFT JOIN h ON true",
            InboxRows::insert_sql(3)
        )
    });
    let order_ids: Vec<Uuid> = commits.iter().map(|(_, order)| order.0).collect();
    let message_ids: Vec<Uuid> = commits.iter().map(|(message, _)| *message).collect();
    let query = sqlx::query(&COMMIT).bind(&order_ids).bind(&message_ids);
    let rows = inbox.bind(query).bind(EXPIRED).fetch_all(conn).await?;
    let mut fresh: HashSet<Uuid> = HashSet::new();
    let mut heads: HashMap<Uuid, Head> = HashMap::with_capacity(rows.len());
    for row in &rows {
        if fresh.is_empty() {
            fresh = row.try_get::<Vec<Uuid>, _>("fresh")?.into_iter().collect();
        }
        if let Some(order_id) = row.try_get::<Option<Uuid>, _>("order_id")? {
            let head = head_of((
                row.try_get("reservation_id")?,
                row.try_get("status")?,
                row.try_get("expires_at")?,
                row.try_get("release_reason")?,
                row.try_get("refusal")?,
                row.try_get("expired")?,
            ))?;
            heads.insert(order_id, head);
        }
    }
    // Every order committed now has an outcome: its reservation's, or none.
    let outcomes = commits
        .iter()
        .filter(|(message, _)| fresh.contains(message))
        .map(|(_, order)| (order.0, commit_outcome(heads.remove(&order.0))))
        .collect();
    Ok((fresh, outcomes))
}

/// A consumer batch of commits taken alone ([`messaging::Handler::takes_alone`]), one per
/// order, each with the id of its message and the reservation the order holds as its reserve
/// left it: commits them, records the batch's inbox rows and the replies of the commits as
/// succeeding (`replies`), in one statement with no transaction around it, all of it or
/// nothing. When a reservation is not that one, or no longer held (expired, released), or a
/// message was handled before, it fails (`consumer_batch_refused`, a serialization failure)
/// having written nothing, and the consumer handles the batch in a transaction. Returns the
/// rows of the replies' keys the statement found in the outbox ([`OutboxRows::earlier_sql`]).
pub async fn commit_all_alone(
    conn: &mut PgConnection,
    inbox: &InboxRows<'_>,
    commits: &[(Uuid, OrderId, ReservationId)],
    replies: &OutboxRows<'_>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    static COMMIT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH fresh AS ({}), {COMMIT_ALL}, replies AS ({}), \
                  counts AS (SELECT (SELECT count(*) FROM settled JOIN h USING (reservation_id) \
                                     JOIN unnest($1::uuid[], $7::uuid[]) AS e(order_id, reservation_id) \
                                       ON e.order_id = h.order_id AND e.reservation_id = h.reservation_id \
                                     WHERE settled.sold) AS written, \
                                    (SELECT count(*) FROM fresh) AS recorded) \
             SELECT {}, {} FROM counts",
            InboxRows::insert_sql(3),
            OutboxRows::insert_sql(8, None),
            OutboxRows::earlier_sql(8),
            InboxRows::refused_unless_whole_sql(3, "cardinality($1::uuid[])"),
        )
    });
    let order_ids: Vec<Uuid> = commits.iter().map(|(_, order, _)| order.0).collect();
    let message_ids: Vec<Uuid> = commits.iter().map(|(message, ..)| *message).collect();
    let reservation_ids: Vec<Uuid> = commits.iter().map(|(.., id)| id.0).collect();
    let query = sqlx::query(&COMMIT).bind(&order_ids).bind(&message_ids);
    let query = inbox.bind(query).bind(EXPIRED).bind(&reservation_ids);
    replies.bind(query).fetch_one(conn).await?.try_get(0)
}

/// The commits of a batch, after `fresh` (the batch's inbox rows recorded now): `$1` the
/// orders and `$2` their messages (an order committed only when its message is in `fresh`),
/// `$6` the release reason of an expired reservation. `h` is each order's reservation as it
/// stood, `settled` the ones committed now (`sold`) or released for having expired.
const COMMIT_ALL: &str =
    "c AS (SELECT c.order_id FROM unnest($1::uuid[], $2::uuid[]) AS c(order_id, message_id) \
       WHERE c.message_id IN (SELECT message_id FROM fresh)), \
     h AS (SELECT reservation_id, order_id, status, expires_at, release_reason, refusal, \
             COALESCE(expires_at <= now(), false) AS expired \
           FROM reservations WHERE order_id IN (SELECT order_id FROM c) \
           ORDER BY order_id FOR UPDATE), \
     settled AS (SELECT reservation_id, NOT expired AS sold FROM h WHERE status = 'RESERVED'), \
     held AS (SELECT l.sku, \
                COALESCE(sum(l.quantity) FILTER (WHERE settled.sold), 0)::bigint AS sold, \
                COALESCE(sum(l.quantity) FILTER (WHERE NOT settled.sold), 0)::bigint AS returned \
              FROM settled JOIN reservation_lines l USING (reservation_id) GROUP BY l.sku), \
     k AS (SELECT sku FROM stock WHERE sku IN (SELECT sku FROM held) ORDER BY sku FOR UPDATE), \
     s AS (UPDATE stock s SET reserved = s.reserved - held.sold - held.returned, \
             available = s.available + held.returned, \
             committed = s.committed + held.sold, \
             updated_at = now() \
           FROM held WHERE s.sku = held.sku AND (SELECT count(*) FROM k) > 0), \
     r AS (UPDATE reservations r \
           SET status = CASE WHEN settled.sold THEN 'COMMITTED' ELSE 'RELEASED' END, \
               release_reason = CASE WHEN settled.sold THEN r.release_reason ELSE $6 END, \
               updated_at = now() \
           FROM settled WHERE r.reservation_id = settled.reservation_id)";

/// Why a commit fails on a released reservation.
fn released_reason(release_reason: Option<&str>) -> String {
    match release_reason {
        Some(EXPIRED) => "reservation expired".to_owned(),
        Some(reason) if !reason.is_empty() => format!("reservation was released: {reason}"),
        _ => "reservation was released".to_owned(),
    }
}

/// Gives the stock held for `order_id` back. With no reservation, records a released
/// tombstone so that a ReserveInventory arriving later holds nothing.
pub async fn release(
    conn: &mut PgConnection,
    order_id: OrderId,
    reason: &str,
) -> Result<ReleaseOutcome, sqlx::Error> {
    let reason = if reason.trim().is_empty() {
        "released"
    } else {
        reason
    };
    // Twice at most: if the tombstone loses to a reservation committed meanwhile, that
    // reservation is there to release on the second pass.
    for _ in 0..2 {
        match settle_head(conn, order_id, Settle::Return(reason)).await? {
            Some(head) => {
                // What the reservation was before the statement settled it.
                return Ok(match head.status {
                    ReservationStatus::Reserved => ReleaseOutcome::Released,
                    ReservationStatus::Released => ReleaseOutcome::NothingHeld,
                    ReservationStatus::Committed => ReleaseOutcome::AlreadyCommitted,
                });
            }
            None => {
                let inserted = sqlx::query(
                    "INSERT INTO reservations (reservation_id, order_id, status, release_reason) \
                     VALUES ($1, $2, 'RELEASED', $3) ON CONFLICT (order_id) DO NOTHING",
                )
                .bind(ReservationId::new())
                .bind(order_id)
                .bind(reason)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if inserted == 1 {
                    return Ok(ReleaseOutcome::NothingHeld);
                }
            }
        }
    }
    Err(sqlx::Error::Protocol(format!(
        "reservation of order {order_id} neither found nor insertable"
    )))
}

/// Releases up to `batch` reservations past their deadline, in one transaction, and returns
/// how many. Reservations locked by another transaction (a commit, another replica's sweep)
/// are skipped, so any number of replicas may sweep at once.
pub async fn release_expired(pool: &PgPool, batch: i64) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT reservation_id FROM reservations \
         WHERE status = 'RESERVED' AND expires_at <= now() \
         ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    // Their stock back to available, the stock rows locked in SKU order first.
    stock::settle(&mut tx, &ids, Settle::Return(EXPIRED)).await?;
    tx.commit().await?;
    Ok(ids.len())
}

/// The reservation of `order_id` with its lines, if any. A recorded refusal is not a
/// reservation: it held nothing, and reads as none.
pub async fn find(
    conn: &mut PgConnection,
    order_id: OrderId,
) -> Result<Option<Reservation>, sqlx::Error> {
    let Some(head) = head(conn, order_id).await? else {
        return Ok(None);
    };
    if head.refusal.is_some() {
        return Ok(None);
    }
    let lines: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sku, quantity FROM reservation_lines WHERE reservation_id = $1 ORDER BY sku",
    )
    .bind(head.id)
    .fetch_all(conn)
    .await?;
    Ok(Some(Reservation {
        id: head.id,
        order_id,
        status: head.status,
        expires_at: head.expires_at,
        release_reason: head.release_reason,
        lines: lines
            .into_iter()
            .map(|(sku, quantity)| ReservationLine { sku, quantity })
            .collect(),
    }))
}

/// One page of a listing: up to `limit` reservations (with their lines) of orders whose id
/// comes after `after` (from the first when `None`), in order id order. Release tombstones
/// included, recorded refusals not (they held nothing).
pub async fn list_page(
    conn: &mut PgConnection,
    after: Option<OrderId>,
    limit: i64,
) -> Result<Vec<Reservation>, sqlx::Error> {
    type Row = (Uuid, Uuid, String, Option<DateTime<Utc>>, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT reservation_id, order_id, status, expires_at, release_reason FROM reservations \
         WHERE order_id > $1 AND refusal IS NULL ORDER BY order_id LIMIT $2",
    )
    .bind(after.map_or(Uuid::nil(), |id| id.0))
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let ids: Vec<Uuid> = rows.iter().map(|row| row.0).collect();
    let mut lines: HashMap<Uuid, Vec<ReservationLine>> = HashMap::with_capacity(ids.len());
    let stored: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT reservation_id, sku, quantity FROM reservation_lines \
         WHERE reservation_id = ANY($1) ORDER BY reservation_id, sku",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    for (reservation_id, sku, quantity) in stored {
        lines
            .entry(reservation_id)
            .or_default()
            .push(ReservationLine { sku, quantity });
    }
    rows.into_iter()
        .map(|(id, order_id, status, expires_at, release_reason)| {
            Ok(Reservation {
                id: ReservationId(id),
                order_id: OrderId(order_id),
                status: ReservationStatus::from_db(&status)?,
                expires_at,
                release_reason,
                lines: lines.remove(&id).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::released_reason;

    #[test]
    fn commit_failures_say_why_the_reservation_was_released() {
        assert_eq!(released_reason(Some("expired")), "reservation expired");
        assert_eq!(
            released_reason(Some("payment failed")),
            "reservation was released: payment failed"
        );
        assert_eq!(released_reason(None), "reservation was released");
    }
}
