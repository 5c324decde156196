//! The platform's consistency audit, through the services' own APIs:
//!
//! - every `COMPLETED` order has one succeeded payment of exactly its total, and a committed
//!   reservation of exactly its lines;
//! - every `FAILED` order has no money kept (its payment, if any, declined, voided or refunded)
//!   and no stock held (its reservation, if any, released);
//! - no saga is stuck past its deadline;
//! - stock is conserved per SKU: `received = available + reserved + committed + written_off`.
//!
//! Orders, payments and reservations are streamed by each service in order id order and
//! matched as they come (a merge join), so the audit holds a few pages in memory whatever the
//! number of orders. Orders still in flight are not judged: their saga is, by the stuck check.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::inventory::v1 as inventory;
use proto::order::v1 as order;
use proto::payment::v1 as payment;
use proto::saga::v1 as saga;
use serde::Serialize;
use tonic::Streaming;
use uuid::Uuid;

use crate::render::{money, state_name};
use crate::{now_ms, short_duration, time, AdminClient, Failure};

/// Where the audit asks.
pub struct Targets {
    pub admin: AdminClient,
    pub admin_url: String,
    pub order_url: String,
    pub inventory_url: String,
    pub payment_url: String,
}

/// One inconsistency, with the ids an operator needs to look into it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which rule is broken, e.g. `completed-order-payment`.
    pub check: &'static str,
    /// The ids involved, by kind (`order`, `payment`, `reservation`, `saga`, `sku`).
    pub ids: BTreeMap<&'static str, String>,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VIOLATION {}", self.check)?;
        for (kind, id) in &self.ids {
            write!(f, " {kind}={id}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What the audit went through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub orders: u64,
    pub payments: u64,
    pub reservations: u64,
    pub skus: u64,
    pub unfinished_sagas_stuck: u64,
    pub violations: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "audit: {} orders, {} payments, {} reservations, {} SKUs checked; {} violation{}",
            self.orders,
            self.payments,
            self.reservations,
            self.skus,
            self.violations,
            if self.violations == 1 { "" } else { "s" }
        )
    }
}

fn violation(check: &'static str, ids: &[(&'static str, &str)], message: String) -> Violation {
    Violation {
        check,
        ids: ids
            .iter()
            .filter(|(_, id)| !id.is_empty())
            .map(|(kind, id)| (*kind, (*id).to_owned()))
            .collect(),
        message,
    }
}

fn payment_status(p: &payment::Payment) -> &'static str {
    match p.status() {
        payment::PaymentStatus::Unspecified => "UNSPECIFIED",
        payment::PaymentStatus::AwaitingVerification => "AWAITING_VERIFICATION",
        payment::PaymentStatus::Succeeded => "SUCCEEDED",
        payment::PaymentStatus::Declined => "DECLINED",
        payment::PaymentStatus::Voided => "VOIDED",
        payment::PaymentStatus::Refunded => "REFUNDED",
    }
}

fn reservation_status(r: &inventory::Reservation) -> &'static str {
    match r.status() {
        inventory::ReservationStatus::Unspecified => "UNSPECIFIED",
        inventory::ReservationStatus::Reserved => "RESERVED",
        inventory::ReservationStatus::Committed => "COMMITTED",
        inventory::ReservationStatus::Released => "RELEASED",
    }
}

/// Quantities by SKU (lines of one SKU added up).
fn by_sku<'a>(lines: impl IntoIterator<Item = (&'a str, u64)>) -> BTreeMap<&'a str, u64> {
    let mut merged = BTreeMap::new();
    for (sku, quantity) in lines {
        *merged.entry(sku).or_default() += quantity;
    }
    merged
}

fn describe(lines: &BTreeMap<&str, u64>) -> String {
    if lines.is_empty() {
        return "nothing".to_owned();
    }
    lines
        .iter()
        .map(|(sku, q)| format!("{sku} x{q}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rules an order in a final status must follow, given its payment and reservation.
pub fn check_order(
    order: &order::Order,
    payment: Option<&payment::Payment>,
    reservation: Option<&inventory::Reservation>,
) -> Vec<Violation> {
    let mut found = Vec::new();
    let order_id = order.order_id.as_str();
    let payment_id = payment.map_or("", |p| p.payment_id.as_str());
    let reservation_id = reservation.map_or("", |r| r.reservation_id.as_str());
    match order.status() {
        order::OrderStatus::Completed => {
            let ids = [("order", order_id), ("payment", payment_id)];
            match payment {
                None => found.push(violation(
                    "completed-order-payment",
                    &ids,
                    "the order is COMPLETED but has no payment".into(),
                )),
                Some(p) => {
                    if p.status() != payment::PaymentStatus::Succeeded {
                        found.push(violation(
                            "completed-order-payment",
                            &ids,
                            format!(
                                "the order is COMPLETED but its payment is {}, not SUCCEEDED",
                                payment_status(p)
                            ),
                        ));
                    }
                    if p.amount_cents != order.total_cents || p.currency != order.currency {
                        found.push(violation(
                            "completed-order-payment",
                            &ids,
                            format!(
                                "the payment is of {}, the order's total {}",
                                money(p.amount_cents, &p.currency),
                                money(order.total_cents, &order.currency)
                            ),
                        ));
                    }
                    if !order.payment_id.is_empty() && order.payment_id != p.payment_id {
                        found.push(violation(
                            "completed-order-payment",
                            &ids,
                            format!(
                                "the order names payment {}, the payment service has {}",
                                order.payment_id, p.payment_id
                            ),
                        ));
                    }
                }
            }
            let ids = [("order", order_id), ("reservation", reservation_id)];
            let ordered = by_sku(
                order
                    .lines
                    .iter()
                    .map(|l| (l.sku.as_str(), u64::from(l.quantity))),
            );
            match reservation {
                None => found.push(violation(
                    "completed-order-stock",
                    &ids,
                    format!(
                        "the order is COMPLETED but no stock was reserved for it ({})",
                        describe(&ordered)
                    ),
                )),
                Some(r) => {
                    if r.status() != inventory::ReservationStatus::Committed {
                        found.push(violation(
                            "completed-order-stock",
                            &ids,
                            format!(
                                "the order is COMPLETED but its reservation is {}, not COMMITTED",
                                reservation_status(r)
                            ),
                        ));
                    }
                    let committed = by_sku(
                        r.lines
                            .iter()
                            .map(|l| (l.sku.as_str(), u64::from(l.quantity))),
                    );
                    if committed != ordered {
                        found.push(violation(
                            "completed-order-stock",
                            &ids,
                            format!(
                                "the reservation holds {}, the order is for {}",
                                describe(&committed),
                                describe(&ordered)
                            ),
                        ));
                    }
                }
            }
        }
        order::OrderStatus::Failed => {
            if let Some(p) = payment {
                if matches!(
                    p.status(),
                    payment::PaymentStatus::Succeeded
                        | payment::PaymentStatus::AwaitingVerification
                ) {
                    found.push(violation(
                        "failed-order-money",
                        &[("order", order_id), ("payment", payment_id)],
                        format!(
                            "the order is FAILED but its payment of {} is {}: money is kept",
                            money(p.amount_cents, &p.currency),
                            payment_status(p)
                        ),
                    ));
                }
            }
            if let Some(r) = reservation {
                if matches!(
                    r.status(),
                    inventory::ReservationStatus::Reserved
                        | inventory::ReservationStatus::Committed
                ) {
                    let held = by_sku(
                        r.lines
                            .iter()
                            .map(|l| (l.sku.as_str(), u64::from(l.quantity))),
                    );
                    found.push(violation(
                        "failed-order-stock",
                        &[("order", order_id), ("reservation", reservation_id)],
                        format!(
                            "the order is FAILED but its reservation is {}: {} held",
                            reservation_status(r),
                            describe(&held)
                        ),
                    ));
                }
            }
        }
        // In flight: judged by its saga, not here.
        order::OrderStatus::Pending
        | order::OrderStatus::PaymentInitiated
        | order::OrderStatus::Unspecified => {}
    }
    found
}

/// The rule of one SKU's stock.
pub fn check_stock(level: &inventory::StockLevel) -> Option<Violation> {
    let accounted = level.available + level.reserved + level.committed + level.written_off;
    (accounted != level.received).then(|| {
        violation(
            "stock-conservation",
            &[("sku", level.sku.as_str())],
            format!(
                "{} units were received but {accounted} are accounted for: {} available + {} \
                 reserved + {} committed + {} written off ({} {})",
                level.received,
                level.available,
                level.reserved,
                level.committed,
                level.written_off,
                (accounted - level.received).abs(),
                if accounted > level.received {
                    "appeared"
                } else {
                    "vanished"
                }
            ),
        )
    })
}

fn stuck(saga: &saga::Saga) -> Violation {
    let now = now_ms();
    let mut message = format!(
        "{} since {} ({}), {} attempt{} of the step",
        state_name(saga.state()),
        time(saga.state_since_ms),
        short_duration(now - saga.state_since_ms),
        saga.attempts,
        if saga.attempts == 1 { "" } else { "s" }
    );
    if let Some(deadline) = saga
        .deadlines
        .iter()
        .find(|d| d.kind == "payment_deadline" && d.fire_at_ms < now)
    {
        message.push_str(&format!(
            "; its payment deadline passed {} ago",
            short_duration(now - deadline.fire_at_ms)
        ));
    }
    if !saga.last_error.is_empty() {
        message.push_str(&format!("; last error: {}", saga.last_error));
    }
    violation("stuck-saga", &[("saga", saga.saga_id.as_str())], message)
}

/// A stream of items in order id order, read one ahead to match with the others.
struct Sorted<T> {
    /// What is listed, e.g. "payments".
    what: &'static str,
    service: &'static str,
    url: String,
    stream: Streaming<T>,
    order_id: fn(&T) -> &str,
    head: Option<(Uuid, T)>,
    last: Option<Uuid>,
    count: u64,
}

impl<T> Sorted<T> {
    async fn open(
        (what, service, url): (&'static str, &'static str, &str),
        stream: Streaming<T>,
        order_id: fn(&T) -> &str,
    ) -> Result<Sorted<T>, Failure> {
        let mut sorted = Sorted {
            what,
            service,
            url: url.to_owned(),
            stream,
            order_id,
            head: None,
            last: None,
            count: 0,
        };
        sorted.advance().await?;
        Ok(sorted)
    }

    async fn advance(&mut self) -> Result<(), Failure> {
        let next = self.stream.message().await.map_err(|status| {
            Failure::Error(format!(
                "reading the {}: {}",
                self.what,
                Failure::from_status(self.service, &self.url, &status)
            ))
        })?;
        self.head = match next {
            None => None,
            Some(item) => {
                self.count += 1;
                let text = (self.order_id)(&item);
                let id = Uuid::parse_str(text).map_err(|_| {
                    Failure::Error(format!(
                        "{} listed {} with an invalid order id {text:?}",
                        self.service, self.what
                    ))
                })?;
                if self.last.is_some_and(|last| last >= id) {
                    return Err(Failure::Error(format!(
                        "{} does not list {} in order id order (at {id}): is it an older version?",
                        self.service, self.what
                    )));
                }
                self.last = Some(id);
                Some((id, item))
            }
        };
        Ok(())
    }

    /// The item of `order_id`, passing over those of orders before it.
    async fn take(&mut self, order_id: Uuid) -> Result<Option<T>, Failure> {
        while self.head.as_ref().is_some_and(|(id, _)| *id < order_id) {
            self.advance().await?;
        }
        if self.head.as_ref().is_none_or(|(id, _)| *id != order_id) {
            return Ok(None);
        }
        let item = self.head.take().map(|(_, item)| item);
        self.advance().await?;
        Ok(item)
    }

    /// Reads what is left, to count it.
    async fn drain(&mut self) -> Result<(), Failure> {
        while self.head.is_some() {
            self.advance().await?;
        }
        Ok(())
    }
}

fn stream_error<'a>(service: &'a str, url: &'a str) -> impl Fn(tonic::Status) -> Failure + 'a {
    move |status| Failure::from_status(service, url, &status)
}

/// Runs every check; `found` is told each violation as soon as it is found.
pub async fn run(
    targets: &mut Targets,
    stuck_after: Duration,
    mut found: impl FnMut(&Violation),
) -> Result<Summary, Failure> {
    let mut summary = Summary::default();
    let mut report = |v: Violation, summary: &mut Summary| {
        summary.violations += 1;
        found(&v);
    };

    let order_channel = crate::connect("order-svc", &targets.order_url).await?;
    let payment_channel = crate::connect("payment-svc", &targets.payment_url).await?;
    let inventory_channel = crate::connect("inventory-svc", &targets.inventory_url).await?;
    let mut orders_client = order::order_service_client::OrderServiceClient::new(order_channel)
        .max_decoding_message_size(16 << 20);
    let mut payments_client =
        payment::payment_service_client::PaymentServiceClient::new(payment_channel);
    let mut inventory_client =
        inventory::inventory_service_client::InventoryServiceClient::new(inventory_channel);

    let (orders, payments, reservations) = tokio::try_join!(
        async {
            orders_client
                .list_orders(order::ListOrdersRequest::default())
                .await
                .map_err(stream_error("order-svc", &targets.order_url))
        },
        async {
            payments_client
                .list_payments(payment::ListPaymentsRequest::default())
                .await
                .map_err(stream_error("payment-svc", &targets.payment_url))
        },
        async {
            inventory_client
                .list_reservations(inventory::ListReservationsRequest::default())
                .await
                .map_err(stream_error("inventory-svc", &targets.inventory_url))
        },
    )?;
    let mut orders = orders.into_inner();
    let mut payments = Sorted::open(
        ("payments", "payment-svc", &targets.payment_url),
        payments.into_inner(),
        |p: &payment::Payment| &p.order_id,
    )
    .await?;
    let mut reservations = Sorted::open(
        ("reservations", "inventory-svc", &targets.inventory_url),
        reservations.into_inner(),
        |r: &inventory::Reservation| &r.order_id,
    )
    .await?;
    let mut previous: Option<Uuid> = None;
    while let Some(order) = orders.message().await.map_err(|status| {
        Failure::Error(format!(
            "reading the orders: {}",
            Failure::from_status("order-svc", &targets.order_url, &status)
        ))
    })? {
        summary.orders += 1;
        let id = Uuid::parse_str(&order.order_id).map_err(|_| {
            Failure::Error(format!(
                "order-svc listed an invalid order id {:?}",
                order.order_id
            ))
        })?;
        if previous.is_some_and(|p| p >= id) {
            return Err(Failure::Error(
                "order-svc does not list orders in order id order: is it an older version?".into(),
            ));
        }
        previous = Some(id);
        let payment = payments.take(id).await?;
        let reservation = reservations.take(id).await?;
        for v in check_order(&order, payment.as_ref(), reservation.as_ref()) {
            report(v, &mut summary);
        }
    }
    payments.drain().await?;
    reservations.drain().await?;
    summary.payments = payments.count;
    summary.reservations = reservations.count;

    let levels = inventory_client
        .get_stock(inventory::GetStockRequest::default())
        .await
        .map_err(stream_error("inventory-svc", &targets.inventory_url))?
        .into_inner()
        .levels;
    summary.skus = levels.len() as u64;
    for level in &levels {
        if let Some(v) = check_stock(level) {
            report(v, &mut summary);
        }
    }

    let mut page_token = String::new();
    loop {
        let page = targets
            .admin
            .list_sagas(saga::ListSagasRequest {
                stuck_only: true,
                stuck_after_seconds: stuck_after.as_secs().max(1),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .map_err(stream_error("the orchestrator", &targets.admin_url))?
            .into_inner();
        for saga in &page.sagas {
            summary.unfinished_sagas_stuck += 1;
            report(stuck(saga), &mut summary);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(status: order::OrderStatus, lines: &[(&str, u32)]) -> order::Order {
        order::Order {
            order_id: "o-1".into(),
            status: status.into(),
            lines: lines
                .iter()
                .map(|(sku, quantity)| order::PricedLine {
                    sku: (*sku).into(),
                    quantity: *quantity,
                    ..Default::default()
                })
                .collect(),
            total_cents: 5800,
            currency: "USD".into(),
            payment_id: "p-1".into(),
            ..Default::default()
        }
    }

    fn payment(status: payment::PaymentStatus, amount_cents: i64) -> payment::Payment {
        payment::Payment {
            payment_id: "p-1".into(),
            order_id: "o-1".into(),
            amount_cents,
            currency: "USD".into(),
            status: status.into(),
            ..Default::default()
        }
    }

    fn reservation(
        status: inventory::ReservationStatus,
        lines: &[(&str, u32)],
    ) -> inventory::Reservation {
        inventory::Reservation {
            reservation_id: "r-1".into(),
            order_id: "o-1".into(),
            status: status.into(),
            lines: lines
                .iter()
                .map(|(sku, quantity)| inventory::ReservationLine {
                    sku: (*sku).into(),
                    quantity: *quantity,
                })
                .collect(),
            expires_at_ms: 0,
        }
    }

    fn checks(found: &[Violation]) -> Vec<&str> {
        found.iter().map(|v| v.check).collect()
    }

    #[test]
    fn a_completed_order_is_paid_in_full_and_its_lines_committed() {
        use inventory::ReservationStatus::*;
        use payment::PaymentStatus::*;
        let completed = order(order::OrderStatus::Completed, &[("A", 2), ("B", 1)]);
        let committed = reservation(Committed, &[("B", 1), ("A", 2)]);
        assert!(check_order(
            &completed,
            Some(&payment(Succeeded, 5800)),
            Some(&committed)
        )
        .is_empty());

        let refunded = check_order(&completed, Some(&payment(Refunded, 5800)), Some(&committed));
        assert_eq!(checks(&refunded), ["completed-order-payment"]);
        assert!(refunded[0].message.contains("REFUNDED"));
        assert_eq!(refunded[0].ids["order"], "o-1");
        assert_eq!(refunded[0].ids["payment"], "p-1");

        let short = check_order(
            &completed,
            Some(&payment(Succeeded, 5000)),
            Some(&committed),
        );
        assert!(
            short[0].message.contains("50.00 USD"),
            "{}",
            short[0].message
        );

        let fewer = reservation(Committed, &[("A", 1), ("B", 1)]);
        let found = check_order(&completed, Some(&payment(Succeeded, 5800)), Some(&fewer));
        assert_eq!(checks(&found), ["completed-order-stock"]);
        assert_eq!(
            found[0].to_string(),
            "VIOLATION completed-order-stock order=o-1 reservation=r-1: the reservation holds \
             A x1, B x1, the order is for A x2, B x1"
        );

        let released = reservation(Released, &[("A", 2), ("B", 1)]);
        let found = check_order(&completed, None, Some(&released));
        assert_eq!(
            checks(&found),
            ["completed-order-payment", "completed-order-stock"]
        );
    }

    #[test]
    fn a_failed_order_keeps_no_money_and_holds_no_stock() {
        use inventory::ReservationStatus::*;
        use payment::PaymentStatus::*;
        let failed = order(order::OrderStatus::Failed, &[("A", 2)]);
        for settled in [Declined, Voided, Refunded] {
            assert!(check_order(
                &failed,
                Some(&payment(settled, 5800)),
                Some(&reservation(Released, &[("A", 2)]))
            )
            .is_empty());
        }
        assert!(check_order(&failed, None, None).is_empty());
        let found = check_order(
            &failed,
            Some(&payment(Succeeded, 5800)),
            Some(&reservation(Reserved, &[("A", 2)])),
        );
        assert_eq!(checks(&found), ["failed-order-money", "failed-order-stock"]);
        assert!(found[1].message.contains("A x2 held"));
    }

    #[test]
    fn orders_in_flight_are_left_to_their_saga() {
        let pending = order(order::OrderStatus::PaymentInitiated, &[("A", 2)]);
        assert!(check_order(&pending, None, None).is_empty());
    }

    #[test]
    fn stock_is_conserved() {
        let level = inventory::StockLevel {
            sku: "A".into(),
            available: 90,
            reserved: 5,
            committed: 3,
            written_off: 2,
            received: 100,
        };
        assert_eq!(check_stock(&level), None);
        let leaked = inventory::StockLevel {
            available: 88,
            ..level
        };
        let found = check_stock(&leaked).expect("violation");
        assert_eq!(found.ids["sku"], "A");
        assert!(found.message.contains("2 vanished"), "{}", found.message);
    }

    #[test]
    fn the_summary_line_counts_what_was_checked() {
        let summary = Summary {
            orders: 1234,
            payments: 1234,
            reservations: 1100,
            skus: 5,
            unfinished_sagas_stuck: 0,
            violations: 0,
        };
        assert_eq!(
            summary.to_string(),
            "audit: 1234 orders, 1234 payments, 1100 reservations, 5 SKUs checked; 0 violations"
        );
    }
}
