//! Graceful shutdown: one token, cancelled on SIGINT or SIGTERM.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}

/// How long a service's tasks get to finish once shutdown began, before they are aborted.
pub const GRACE: Duration = Duration::from_secs(10);

/// Waits for `tasks` to finish after shutdown began, at most `grace`; what is still running
/// then is aborted (its work is safe to redo: nothing is acknowledged before it commits).
pub async fn drain(
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut tasks = tasks;
    let mut first_error = None;
    let wait = async {
        while let Some(result) = tasks.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = format!("{e:#}"), "task failed");
                    first_error.get_or_insert(e);
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => {
                    first_error.get_or_insert(anyhow::anyhow!("task panicked: {e}"));
                }
            }
        }
    };
    if tokio::time::timeout(grace, wait).await.is_err() {
        tracing::warn!(
            ?grace,
            "tasks still running after the grace period: aborting them"
        );
        tasks.abort_all();
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs `task` and cancels `cancel` when it ends, so that one failed part stops the service.
pub async fn cancel_when_done<F>(cancel: CancellationToken, task: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let _guard = cancel.drop_guard();
    task.await
}
