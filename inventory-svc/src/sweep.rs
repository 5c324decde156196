//! The expiry sweep: gives back the stock of reservations whose time to live has passed.
//!
//! It sends no message: the saga's CommitInventory finds the reservation released and fails,
//! which compensates the payment.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store::reservations;

/// Reservations released per transaction.
const BATCH: i64 = 500;

/// Sweeps every `interval` until `cancel`. Database failures are logged and retried on the
/// next tick.
pub async fn run(pool: PgPool, interval: Duration, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(e) = sweep(&pool, &cancel).await {
            tracing::warn!(error = %e, "reservation expiry sweep failed, retrying next tick");
        }
    }
}

/// Releases every expired reservation, a batch per transaction. Returns how many.
pub async fn sweep(pool: &PgPool, cancel: &CancellationToken) -> Result<usize, sqlx::Error> {
    let mut total = 0;
    loop {
        let released = reservations::release_expired(pool, BATCH).await?;
        total += released;
        if released < BATCH as usize || cancel.is_cancelled() {
            break;
        }
    }
    if total > 0 {
        tracing::info!(count = total, "expired reservations released");
    }
    Ok(total)
}
