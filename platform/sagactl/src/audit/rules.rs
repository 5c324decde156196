//! The audit's rules, without I/O: what an order in a final status, one SKU's stock and a stuck
//! saga must be found to be, and how a broken rule is told.

use std::collections::BTreeMap;

use proto::inventory::v1 as inventory;
use proto::order::v1 as order;
use proto::payment::v1 as payment;
use proto::saga::v1 as saga;
use serde::Serialize;

use crate::render::{money, state_name};
use crate::{short_duration, time};

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

/// A saga unfinished past the stuck threshold, as of `now` (ms since the epoch).
pub fn stuck(saga: &saga::Saga, now: i64) -> Violation {
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
