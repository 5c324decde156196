//! Waiting for an order's status to change: GetOrder's long poll.
//!
//! A trigger notifies `order_status` whenever a status changes, with the change itself (the
//! status, the payment id, the failure reason, the time: all that changes of an order, whose
//! lines never do); one listener per process fans the changes out to the waiting requests,
//! whichever replica changed the order, and they answer without reading the order again.
//!
//! The orders this process placed lately are kept as those changes leave them
//! ([`RecentOrders`]), so that a long poll on one does not read it at all.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::{Order, OrderStatus, PaymentId};

const CHANNEL: &str = "order_status";
/// Longest a request may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// What a status change left of an order: all that may change of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusChange {
    pub status: OrderStatus,
    pub payment_id: Option<PaymentId>,
    pub failure_reason: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl StatusChange {
    /// Reads a notification's payload (see migration 0104): the order id, and the change when
    /// the payload carries it (a bare id says only that the order changed).
    pub fn parse(payload: &str) -> Option<(Uuid, Option<Arc<StatusChange>>)> {
        let mut fields = payload.splitn(5, ' ');
        let id = Uuid::parse_str(fields.next()?).ok()?;
        let Some(status) = fields.next() else {
            return Some((id, None));
        };
        let change = (|| {
            let status = OrderStatus::from_db(status)?;
            let payment_id = match fields.next()? {
                "-" => None,
                id => Some(PaymentId(Uuid::parse_str(id).ok()?)),
            };
            let updated_at = DateTime::from_timestamp_micros(fields.next()?.parse().ok()?)?;
            let failure_reason = match fields.next()? {
                "-" => None,
                reason => Some(reason.strip_prefix('+')?.to_owned()),
            };
            Some(StatusChange {
                status,
                payment_id,
                failure_reason,
                updated_at,
            })
        })();
        // A payload this release cannot read still says that the order changed.
        Some((id, change.map(Arc::new)))
    }

    /// Applies the change to `order` as read before it. A change that is not ahead of the
    /// order's status (a notification of a change the read already saw, delivered after it) is
    /// ignored: statuses only move forward. Returns whether it applied.
    pub fn apply(&self, order: &mut Order) -> bool {
        if !order.status.can_move_to(self.status) {
            return false;
        }
        order.status = self.status;
        order.payment_id = self.payment_id;
        order.failure_reason.clone_from(&self.failure_reason);
        order.updated_at = self.updated_at;
        true
    }
}

/// How many orders [`RecentOrders`] keeps (the oldest placed go first): some 80 seconds of
/// orders at 250 a second, a few megabytes.
const RECENT_ORDERS: usize = 20_000;

/// The orders this process placed lately, each as the status changes it was notified of left
/// it. Only while the listener listens: an order is remembered before its insert commits (so no
/// change of it can come before), and everything is forgotten whenever the listener loses its
/// connection (changes may have been missed), until it listens again.
#[derive(Clone, Debug, Default)]
pub struct RecentOrders(Arc<Mutex<Recent>>);

#[derive(Debug, Default)]
struct Recent {
    listening: bool,
    orders: HashMap<Uuid, Order>,
    placed: VecDeque<Uuid>,
}

impl RecentOrders {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `order`, about to be inserted (call [`forget`](Self::forget) if it is not).
    pub fn remember(&self, order: &Order) {
        let mut recent = self.lock();
        if !recent.listening {
            return;
        }
        if recent.placed.len() >= RECENT_ORDERS {
            if let Some(oldest) = recent.placed.pop_front() {
                recent.orders.remove(&oldest);
            }
        }
        recent.placed.push_back(order.id.0);
        recent.orders.insert(order.id.0, order.clone());
    }

    pub fn forget(&self, id: Uuid) {
        self.lock().orders.remove(&id);
    }

    /// The order as its last change left it, if it is kept.
    pub fn get(&self, id: Uuid) -> Option<Order> {
        let recent = self.lock();
        recent
            .listening
            .then(|| recent.orders.get(&id).cloned())
            .flatten()
    }

    /// A notification of `id`: its change applied, or the order forgotten when the
    /// notification does not carry it.
    fn changed(&self, id: Uuid, change: Option<&StatusChange>) {
        let mut recent = self.lock();
        match (recent.orders.get_mut(&id), change) {
            (Some(order), Some(change)) => {
                change.apply(order);
            }
            (Some(_), None) => {
                recent.orders.remove(&id);
            }
            (None, _) => {}
        }
    }

    /// Listening (`true`), or not, from now on; either way what is kept is forgotten.
    fn listening(&self, listening: bool) {
        let mut recent = self.lock();
        recent.listening = listening;
        recent.orders.clear();
        recent.placed.clear();
    }
}

/// What a waiter of one order is told: the order's change when the notification carries it,
/// `None` when anything may have changed (a bare notification of the order, or the listener
/// reconnected and may have missed some).
type Event = Option<Arc<StatusChange>>;

/// The waiters of each order, each told of its own order's changes only (a notification wakes
/// one waiter, not every waiting request).
#[derive(Debug, Default)]
struct Waiters {
    next: u64,
    by_order: HashMap<Uuid, Vec<(u64, mpsc::UnboundedSender<Event>)>>,
}

/// Status changes, fanned out to the requests waiting on each order.
#[derive(Clone, Debug, Default)]
pub struct StatusWatch {
    waiters: Arc<Mutex<Waiters>>,
    recent: RecentOrders,
}

impl StatusWatch {
    /// The orders placed here lately, kept by this watch.
    pub fn recent(&self) -> &RecentOrders {
        &self.recent
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribe to the changes of `order_id` before reading the order, so that no change
    /// between the read and the wait is missed.
    pub fn subscribe(&self, order_id: Uuid) -> Changes {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut waiters = self.waiters();
        waiters.next += 1;
        let key = waiters.next;
        waiters
            .by_order
            .entry(order_id)
            .or_default()
            .push((key, sender));
        Changes {
            receiver,
            watch: self.clone(),
            order_id,
            key,
        }
    }

    /// Tells the waiters of `order_id` of its change.
    fn notify(&self, order_id: Uuid, change: Event) {
        let waiters = self.waiters();
        for (_, sender) in waiters.by_order.get(&order_id).into_iter().flatten() {
            let _ = sender.send(change.clone());
        }
    }

    /// Tells every waiter that its order may have changed.
    fn notify_all(&self) {
        let waiters = self.waiters();
        for (_, sender) in waiters.by_order.values().flatten() {
            let _ = sender.send(None);
        }
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
            self.recent.listening(true);
            self.notify_all();
            loop {
                let notification = tokio::select! {
                    _ = cancel.cancelled() => break,
                    n = listener.try_recv() => n,
                };
                match notification {
                    Ok(Some(n)) => {
                        if let Some((id, change)) = StatusChange::parse(n.payload()) {
                            // Kept orders first, so that a waiter subscribing after this
                            // change finds it there.
                            self.recent.changed(id, change.as_deref());
                            self.notify(id, change);
                        }
                    }
                    // The connection was lost: anything may have changed meanwhile. Connect
                    // and listen again (the waiters are told once listening).
                    Ok(None) => {
                        tracing::warn!("order status listener lost its connection; reconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "order status listener failed; reconnecting");
                        break;
                    }
                }
            }
            self.recent.listening(false);
            if cancel.is_cancelled() {
                return;
            }
        }
    }
}

/// A subscription to the changes of one order; unsubscribed when dropped.
pub struct Changes {
    receiver: mpsc::UnboundedReceiver<Event>,
    watch: StatusWatch,
    order_id: Uuid,
    key: u64,
}

impl Drop for Changes {
    fn drop(&mut self) {
        let mut waiters = self.watch.waiters();
        if let Some(list) = waiters.by_order.get_mut(&self.order_id) {
            list.retain(|(key, _)| *key != self.key);
            if list.is_empty() {
                waiters.by_order.remove(&self.order_id);
            }
        }
    }
}

/// What a waiter learns.
#[derive(Debug)]
pub enum Changed {
    /// The order changed so: no need to read it.
    To(Arc<StatusChange>),
    /// The order may have changed: read it.
    Unknown,
    /// Nothing changed before the deadline.
    TimedOut,
}

impl Changes {
    /// Waits until the order may have changed, or until `deadline`.
    pub async fn changed(&mut self, deadline: tokio::time::Instant) -> Changed {
        match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
            Err(_) => Changed::TimedOut,
            Ok(Some(Some(change))) => Changed::To(change),
            Ok(Some(None)) => Changed::Unknown,
            // The watch is gone (the service stops): nothing more will come.
            Ok(None) => {
                tokio::time::sleep_until(deadline).await;
                Changed::TimedOut
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(status: OrderStatus) -> Order {
        let at = DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap();
        Order {
            id: crate::domain::OrderId(Uuid::now_v7()),
            customer_id: "c-1".into(),
            status,
            lines: Vec::new(),
            total_cents: 100,
            currency: "USD".into(),
            payment_method: "pm_card_visa".into(),
            payment_id: None,
            failure_reason: None,
            correlation_id: "corr".into(),
            created_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn a_payload_carries_the_change_or_only_the_order_id() {
        let id = Uuid::now_v7();
        let payment = Uuid::now_v7();
        let (got, change) = StatusChange::parse(&format!(
            "{id} PAYMENT_INITIATED {payment} 1700000000123456 -"
        ))
        .unwrap();
        assert_eq!(got, id);
        assert_eq!(
            *change.unwrap(),
            StatusChange {
                status: OrderStatus::PaymentInitiated,
                payment_id: Some(PaymentId(payment)),
                failure_reason: None,
                updated_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            }
        );
        // A reason keeps its spaces, and may be empty.
        let (_, change) =
            StatusChange::parse(&format!("{id} FAILED - 1 +out of stock: SKU-1 (asked 2)"))
                .unwrap();
        let change = change.unwrap();
        assert_eq!(
            change.failure_reason.as_deref(),
            Some("out of stock: SKU-1 (asked 2)")
        );
        assert_eq!(change.payment_id, None);
        let (_, change) = StatusChange::parse(&format!("{id} FAILED - 1 +")).unwrap();
        assert_eq!(change.unwrap().failure_reason.as_deref(), Some(""));
        // The bare id (a payload too long for NOTIFY), or one this release cannot read: the
        // order changed, read it.
        assert_eq!(StatusChange::parse(&id.to_string()), Some((id, None)));
        assert_eq!(
            StatusChange::parse(&format!("{id} SHIPPED - 1 -")),
            Some((id, None))
        );
        assert_eq!(StatusChange::parse("not-an-id PENDING - 1 -"), None);
    }

    #[tokio::test]
    async fn a_change_reaches_the_waiters_of_its_order_only() {
        let watch = StatusWatch::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (mut on_a, mut also_on_a, mut on_b) =
            (watch.subscribe(a), watch.subscribe(a), watch.subscribe(b));
        let change = Arc::new(StatusChange {
            status: OrderStatus::PaymentInitiated,
            payment_id: None,
            failure_reason: None,
            updated_at: DateTime::from_timestamp_micros(1_800_000_000_000_000).unwrap(),
        });
        watch.notify(a, Some(change.clone()));
        let soon = || tokio::time::Instant::now() + Duration::from_millis(50);
        for waiter in [&mut on_a, &mut also_on_a] {
            assert!(matches!(waiter.changed(soon()).await, Changed::To(c) if c == change));
        }
        assert!(matches!(on_b.changed(soon()).await, Changed::TimedOut));
        // A reconnection: every waiter reads again.
        watch.notify_all();
        for waiter in [&mut on_a, &mut also_on_a, &mut on_b] {
            assert!(matches!(waiter.changed(soon()).await, Changed::Unknown));
        }
        // A waiter gone is forgotten.
        drop(on_a);
        assert_eq!(watch.waiters().by_order[&a].len(), 1);
        drop((also_on_a, on_b));
        assert!(watch.waiters().by_order.is_empty());
    }

    #[test]
    fn a_change_applies_only_ahead_of_the_status_read() {
        let change = StatusChange {
            status: OrderStatus::PaymentInitiated,
            payment_id: Some(PaymentId(Uuid::now_v7())),
            failure_reason: None,
            updated_at: DateTime::from_timestamp_micros(1_800_000_000_000_000).unwrap(),
        };
        let mut pending = order(OrderStatus::Pending);
        assert!(change.apply(&mut pending));
        assert_eq!(pending.status, OrderStatus::PaymentInitiated);
        assert_eq!(pending.payment_id, change.payment_id);
        assert_eq!(pending.updated_at, change.updated_at);
        // Delivered after a read that saw a later change: stale, ignored.
        let mut completed = order(OrderStatus::Completed);
        let before = completed.clone();
        assert!(!change.apply(&mut completed));
        assert_eq!(completed, before);
        // The very change the read already saw.
        let mut seen = order(OrderStatus::PaymentInitiated);
        assert!(!change.apply(&mut seen));
    }
}
