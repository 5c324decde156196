//! Work to do once the transaction it belongs to has committed, and never if it rolls back:
//! counting what a handler did, for instance, so that a batch retried after a rollback is not
//! counted twice.
//!
//! The consumer runs each transaction inside [`scope`]; code running in it defers work with
//! [`after_commit`]. Outside any scope (a test calling a handler directly), the work runs at
//! once.

use std::cell::RefCell;
use std::future::Future;

type Deferred = Box<dyn FnOnce() + Send>;

tokio::task_local! {
    static PENDING: RefCell<Vec<Deferred>>;
}

/// Runs `work` after the enclosing [`scope`]'s transaction commits; at once outside a scope.
pub fn after_commit(work: impl FnOnce() + Send + 'static) {
    let mut work = Some(Box::new(work) as Deferred);
    let _ = PENDING.try_with(|pending| {
        if let Some(work) = work.take() {
            pending.borrow_mut().push(work);
        }
    });
    if let Some(work) = work {
        work();
    }
}

/// Runs `transaction` (a future that commits when it returns `Ok`) and then the work it
/// deferred, only if it succeeded.
pub async fn scope<T, E, F>(transaction: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let (result, pending) = PENDING
        .scope(RefCell::new(Vec::new()), async {
            let result = transaction.await;
            let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
            (result, pending)
        })
        .await;
    if result.is_ok() {
        for work in pending {
            work();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn deferred_work_runs_only_after_success() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let ok: Result<(), ()> = scope(async move {
            after_commit(move || {
                c.fetch_add(1, Ordering::SeqCst);
            });
            Ok(())
        })
        .await;
        assert!(ok.is_ok());
        assert_eq!(count.load(Ordering::SeqCst), 1);

        let c = count.clone();
        let failed: Result<(), ()> = scope(async move {
            after_commit(move || {
                c.fetch_add(1, Ordering::SeqCst);
            });
            Err(())
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(count.load(Ordering::SeqCst), 1, "rolled back: not run");

        let c = count.clone();
        after_commit(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(
            count.load(Ordering::SeqCst),
            2,
            "outside a scope: run at once"
        );
    }
}
