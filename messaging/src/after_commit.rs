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

    /// Work that counts one in `count`.
    fn count_one(count: &Arc<AtomicUsize>) -> impl FnOnce() + Send + 'static {
        let count = count.clone();
        move || {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A transaction that defers counting one and ends with `outcome`.
    async fn deferring(count: &Arc<AtomicUsize>, outcome: Result<(), ()>) -> Result<(), ()> {
        let work = count_one(count);
        scope(async move {
            after_commit(work);
            outcome
        })
        .await
    }

    #[tokio::test]
    async fn deferred_work_runs_only_after_success() {
        let count = Arc::new(AtomicUsize::new(0));
        let ok = deferring(&count, Ok(())).await;
        assert!(ok.is_ok());
        assert_eq!(count.load(Ordering::SeqCst), 1);

        let failed = deferring(&count, Err(())).await;
        assert!(failed.is_err());
        assert_eq!(count.load(Ordering::SeqCst), 1, "rolled back: not run");

        after_commit(count_one(&count));
        assert_eq!(
            count.load(Ordering::SeqCst),
            2,
            "outside a scope: run at once"
        );
    }
}
