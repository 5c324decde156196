//! Fires due saga timers. Timers live in PostgreSQL, so they survive restarts; any number of
//! replicas may run this loop, each claiming different timers (`FOR UPDATE SKIP LOCKED`).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Trigger};
use crate::saga::Input;
use crate::store;

const BATCH: i64 = 100;

pub async fn run(
    pool: PgPool,
    engine: Engine,
    interval: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        match fire_due(&pool, &engine).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "firing timers failed; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Fires the due deadlines in one transaction. Returns how many were fired.
pub async fn fire_due(pool: &PgPool, engine: &Engine) -> anyhow::Result<usize> {
    // The steps' metrics count once the transaction has committed.
    messaging::after_commit::scope(fire_due_in_transaction(pool, engine)).await
}

async fn fire_due_in_transaction(pool: &PgPool, engine: &Engine) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let due = store::claim_due_timers(&mut tx, BATCH).await?;
    for (saga_id, kind) in &due {
        let input = match kind.as_str() {
            store::DEADLINE_TIMER => Input::DeadlineExpired,
            store::STEP_TIMER => Input::StepTimedOut,
            other => {
                tracing::warn!(%saga_id, kind = other, "unknown timer kind dropped");
                continue;
            }
        };
        let trigger = Trigger {
            message_id: format!("timer:{kind}:{saga_id}"),
            message_type: "timer".to_owned(),
            context: None,
        };
        engine
            .step(&mut tx, *saga_id, &input, &trigger)
            .await
            .map_err(|e| anyhow::anyhow!("{kind} timer of saga {saga_id}: {e}"))?;
    }
    tx.commit().await?;
    Ok(due.len())
}
