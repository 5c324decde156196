//! Fires due saga timers. Timers live in PostgreSQL, so they survive restarts; any number of
//! replicas may run this loop, each claiming different timers (`FOR UPDATE SKIP LOCKED`).
//!
//! Each timer fires in a transaction of its own, so that one that fails (a saga whose data no
//! longer decodes, a database error) rolls back only itself: it is set aside with backoff and
//! its saga flagged for an operator, while the others fire.

use std::time::Duration;

use messaging::HandlerError;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Trigger, MAX_STEP_DELAY};
use crate::saga::Input;
use crate::store::{self, DueTimer};

/// Timers fired before the loop looks again without waiting.
const BATCH: usize = 100;
/// The delay before a failed timer fires again; doubled at every failure in a row, up to
/// [`MAX_STEP_DELAY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Transient failures in a row (the database unavailable, say) after which the saga is
/// flagged; a permanent one flags it at once.
const TRANSIENT_FAILURES_FLAGGED: i32 = 3;

pub async fn run(
    pool: PgPool,
    engine: Engine,
    interval: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        match fire_batch(&pool, &engine).await {
            Ok(batch) if batch.claimed == BATCH => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "firing timers failed; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Fires the due timers, up to a batch. Returns how many fired (failed ones are not counted).
pub async fn fire_due(pool: &PgPool, engine: &Engine) -> anyhow::Result<usize> {
    Ok(fire_batch(pool, engine).await?.fired)
}

struct Batch {
    claimed: usize,
    fired: usize,
}

async fn fire_batch(pool: &PgPool, engine: &Engine) -> anyhow::Result<Batch> {
    let mut batch = Batch {
        claimed: 0,
        fired: 0,
    };
    while batch.claimed < BATCH {
        // The step's metrics count once its transaction has committed.
        match messaging::after_commit::scope(fire_one(pool, engine)).await {
            Ok(None) => break,
            Ok(Some(_)) => {
                batch.claimed += 1;
                batch.fired += 1;
            }
            Err(Failure::Claim(e)) => return Err(anyhow::anyhow!("claiming a due timer: {e}")),
            Err(Failure::Step(timer, e)) => {
                batch.claimed += 1;
                set_aside(pool, &timer, &e).await?;
            }
        }
    }
    Ok(batch)
}

enum Failure {
    /// No timer could be claimed (the database is unavailable): nothing to set aside.
    Claim(HandlerError),
    /// The timer's step failed; its transaction rolled back.
    Step(DueTimer, HandlerError),
}

/// Claims the earliest due timer and steps its saga, in one transaction. `None`: none is due.
async fn fire_one(pool: &PgPool, engine: &Engine) -> Result<Option<DueTimer>, Failure> {
    let mut tx = pool.begin().await.map_err(|e| Failure::Claim(e.into()))?;
    let Some(timer) = store::claim_due_timer(&mut tx)
        .await
        .map_err(|e| Failure::Claim(e.into()))?
    else {
        return Ok(None);
    };
    let stepped = async {
        let input = match timer.kind.as_str() {
            store::DEADLINE_TIMER => Input::DeadlineExpired,
            store::STEP_TIMER => Input::StepTimedOut,
            other => {
                tracing::warn!(saga_id = %timer.saga_id, kind = other, "unknown timer kind dropped");
                return Ok(());
            }
        };
        let trigger = Trigger {
            message_id: format!("timer:{}:{}", timer.kind, timer.saga_id),
            message_type: "timer".to_owned(),
            context: None,
        };
        engine
            .step(&mut tx, timer.saga_id, &input, &trigger)
            .await?;
        tx.commit().await?;
        engine.committed();
        Ok(())
    }
    .await;
    match stepped {
        Ok(()) => Ok(Some(timer)),
        Err(e) => Err(Failure::Step(timer, e)),
    }
}

/// Pushes a failed timer back (doubling its delay at every failure in a row) and flags its
/// saga, so that it neither blocks the other timers nor is forgotten.
async fn set_aside(pool: &PgPool, timer: &DueTimer, error: &HandlerError) -> anyhow::Result<()> {
    let failures = timer.failures.saturating_add(1);
    let retry_after = FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(timer.failures.clamp(0, 16) as u32))
        .min(MAX_STEP_DELAY);
    let message = format!(
        "{} timer failed {failures} time(s) in a row, next attempt in {} s: {error}",
        timer.kind,
        retry_after.as_secs()
    );
    let flag = match error {
        HandlerError::Permanent(_) => true,
        HandlerError::Transient(_) => failures >= TRANSIENT_FAILURES_FLAGGED,
    };
    tracing::warn!(saga_id = %timer.saga_id, kind = %timer.kind, failures, error = %error, "timer failed; set aside");
    let mut tx = pool.begin().await?;
    store::timer_failed(
        &mut tx,
        timer,
        &message,
        chrono::Duration::from_std(retry_after).unwrap_or(chrono::Duration::MAX),
        flag.then_some(message.as_str()),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
