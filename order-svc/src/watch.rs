//! Waiting for an order's status to change: GetOrder's long poll.
//!
//! A trigger notifies `order_status` with the order id whenever a status changes; one listener
//! per process fans the ids out to the waiting requests, whichever replica changed the order.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CHANNEL: &str = "order_status";
/// Longest a request may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Order ids whose status changed; `Uuid::nil()` means "anything may have changed" (the
/// listener reconnected and may have missed notifications).
#[derive(Clone, Debug)]
pub struct StatusWatch {
    changes: broadcast::Sender<Uuid>,
}

impl Default for StatusWatch {
    fn default() -> Self {
        Self {
            changes: broadcast::channel(4096).0,
        }
    }
}

impl StatusWatch {
    /// Subscribe before reading the order, so that no change between the read and the wait is
    /// missed.
    pub fn subscribe(&self) -> Changes {
        Changes(self.changes.subscribe())
    }

    /// Listens for status changes until `cancel`, reconnecting as needed.
    pub async fn run(self, pool: PgPool, cancel: CancellationToken) {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "order status listener: cannot connect");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "order status listener: LISTEN failed");
                continue;
            }
            let _ = self.changes.send(Uuid::nil());
            loop {
                let notification = tokio::select! {
                    _ = cancel.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match notification {
                    Ok(Some(n)) => {
                        if let Ok(id) = Uuid::parse_str(n.payload()) {
                            let _ = self.changes.send(id);
                        }
                    }
                    // The connection was lost: anything may have changed meanwhile.
                    Ok(None) => {
                        let _ = self.changes.send(Uuid::nil());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "order status listener failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// A subscription to status changes.
pub struct Changes(broadcast::Receiver<Uuid>);

impl Changes {
    /// Waits until `order_id` may have changed, or until `deadline`. Returns false on timeout.
    pub async fn changed(&mut self, order_id: Uuid, deadline: tokio::time::Instant) -> bool {
        loop {
            match tokio::time::timeout_at(deadline, self.0.recv()).await {
                Err(_) => return false,
                Ok(Ok(id)) if id == order_id || id.is_nil() => return true,
                Ok(Ok(_)) => continue,
                // Missed some: ours may be among them.
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => return true,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    tokio::time::sleep_until(deadline).await;
                    return false;
                }
            }
        }
    }
}
