//! Orders as this service understands them: ids, statuses and how they move, validated
//! requests and their pricing. No I/O here.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::error::Error;

pub const MAX_CUSTOMER_ID_CHARS: usize = 128;
pub const MAX_ITEMS: usize = 50;
pub const MAX_QUANTITY: u32 = 1000;
pub const MAX_PAYMENT_METHOD_CHARS: usize = 255;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;
/// Longest SKU (inventory-svc allows no longer).
pub const MAX_SKU_CHARS: usize = 64;

/// `value` of request field `field` checked by [`runtime::text::identifier`].
fn identifier(field: &str, value: &str, max_chars: usize) -> Result<(), Error> {
    runtime::text::identifier(value, max_chars)
        .map_err(|problem| Error::Invalid(format!("{field} {problem}")))
}

/// An order's id, which is also its saga's id and the Kafka key of its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrderId(pub Uuid);

impl OrderId {
    /// A new id; version 7 ids sort by creation time, which keeps the primary key index compact.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id payment-svc gave the order's payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PaymentId(pub Uuid);

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `PENDING -> PAYMENT_INITIATED -> COMPLETED | FAILED`; `PENDING` may also end directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    Pending,
    PaymentInitiated,
    Completed,
    Failed,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 4] = [
        OrderStatus::Pending,
        OrderStatus::PaymentInitiated,
        OrderStatus::Completed,
        OrderStatus::Failed,
    ];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::PaymentInitiated => "PAYMENT_INITIATED",
            OrderStatus::Completed => "COMPLETED",
            OrderStatus::Failed => "FAILED",
        }
    }

    pub fn from_db(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, OrderStatus::Completed | OrderStatus::Failed)
    }

    /// How far along the flow the status is; statuses only move to a higher rank.
    fn rank(self) -> u8 {
        match self {
            OrderStatus::Pending => 0,
            OrderStatus::PaymentInitiated => 1,
            OrderStatus::Completed | OrderStatus::Failed => 2,
        }
    }

    /// Whether an order may move from `self` to `next`: only forward, never out of a terminal
    /// status. Commands arrive at least once and may be overtaken, so anything else is a stale
    /// or repeated command.
    pub fn can_move_to(self, next: OrderStatus) -> bool {
        !self.is_terminal() && next.rank() > self.rank()
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the saga asks of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderCommand {
    MarkPaymentInitiated { payment_id: PaymentId },
    Complete,
    Fail { reason: String },
}

impl OrderCommand {
    /// The status the command moves the order to.
    pub fn target(&self) -> OrderStatus {
        match self {
            OrderCommand::MarkPaymentInitiated { .. } => OrderStatus::PaymentInitiated,
            OrderCommand::Complete => OrderStatus::Completed,
            OrderCommand::Fail { .. } => OrderStatus::Failed,
        }
    }

    /// The statuses from which the command applies; from any other it is ignored.
    pub fn applies_from(&self) -> Vec<OrderStatus> {
        let target = self.target();
        OrderStatus::ALL
            .into_iter()
            .filter(|s| s.can_move_to(target))
            .collect()
    }
}

/// A product of the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub unit_price_cents: i64,
    pub currency: String,
}

/// One line of an order, priced from the catalog when the order was placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
}

impl OrderLine {
    /// Cannot overflow for a stored line: pricing checked it.
    pub fn total_cents(&self) -> i64 {
        self.unit_price_cents
            .saturating_mul(i64::from(self.quantity))
    }
}

/// A valid request for an order: lines of the same SKU merged, in SKU order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRequest {
    pub customer_id: String,
    pub lines: BTreeMap<String, u32>,
    pub payment_method: String,
    pub idempotency_key: Option<String>,
}

impl OrderRequest {
    /// Checks every field; the error names the field at fault. `items` are (SKU, quantity).
    pub fn new(
        customer_id: String,
        items: Vec<(String, u32)>,
        payment_method: String,
        idempotency_key: String,
    ) -> Result<Self, Error> {
        if customer_id.trim().is_empty() {
            return Err(Error::Invalid("customer_id must not be empty".into()));
        }
        identifier("customer_id", &customer_id, MAX_CUSTOMER_ID_CHARS)?;
        if items.is_empty() {
            return Err(Error::Invalid("items must hold at least one item".into()));
        }
        if items.len() > MAX_ITEMS {
            return Err(Error::Invalid(format!(
                "items must hold at most {MAX_ITEMS} items, got {}",
                items.len()
            )));
        }
        let mut lines = BTreeMap::new();
        for (i, (sku, quantity)) in items.into_iter().enumerate() {
            if sku.trim().is_empty() {
                return Err(Error::Invalid(format!("items[{i}].sku must not be empty")));
            }
            identifier(&format!("items[{i}].sku"), &sku, MAX_SKU_CHARS)?;
            if !(1..=MAX_QUANTITY).contains(&quantity) {
                return Err(Error::Invalid(format!(
                    "items[{i}].quantity must be between 1 and {MAX_QUANTITY}, got {quantity}"
                )));
            }
            let merged = lines.entry(sku.clone()).or_insert(0u32);
            *merged += quantity;
            if *merged > MAX_QUANTITY {
                return Err(Error::Invalid(format!(
                    "items: the quantities of SKU {sku} add up to {merged}, more than {MAX_QUANTITY}"
                )));
            }
        }
        if payment_method.trim().is_empty() {
            return Err(Error::Invalid("payment_method must not be empty".into()));
        }
        identifier("payment_method", &payment_method, MAX_PAYMENT_METHOD_CHARS)?;
        identifier(
            "idempotency_key",
            &idempotency_key,
            MAX_IDEMPOTENCY_KEY_CHARS,
        )?;
        let idempotency_key = Some(idempotency_key).filter(|key| !key.is_empty());
        Ok(Self {
            customer_id,
            lines,
            payment_method,
            idempotency_key,
        })
    }

    pub fn skus(&self) -> Vec<String> {
        self.lines.keys().cloned().collect()
    }

    /// Identifies what was asked (customer, merged lines, payment method), to tell a retry
    /// from a different request under the same idempotency key. SHA-256, hex.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        // Length-prefixed fields, so that no two different requests encode alike.
        let mut field = |value: &str| {
            hasher.update((value.len() as u64).to_be_bytes());
            hasher.update(value.as_bytes());
        };
        field(&self.customer_id);
        field(&self.payment_method);
        for (sku, quantity) in &self.lines {
            field(sku);
            field(&quantity.to_string());
        }
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// An order's lines priced from the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priced {
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: String,
}

/// Prices `request` from `catalog` (by SKU). Every SKU must be in it, in one currency.
pub fn price(request: &OrderRequest, catalog: &HashMap<String, Product>) -> Result<Priced, Error> {
    let mut lines = Vec::with_capacity(request.lines.len());
    let mut total_cents: i64 = 0;
    let mut currency: Option<&str> = None;
    for (sku, &quantity) in &request.lines {
        let product = catalog
            .get(sku)
            .ok_or_else(|| Error::Invalid(format!("unknown SKU: {sku}")))?;
        match currency {
            None => currency = Some(&product.currency),
            Some(c) if c != product.currency => {
                return Err(Error::Invalid(format!(
                    "items: SKU {sku} is sold in {}, the others in {c}; order them separately",
                    product.currency
                )))
            }
            Some(_) => {}
        }
        let line_total = product
            .unit_price_cents
            .checked_mul(i64::from(quantity))
            .ok_or_else(|| Error::Invalid(format!("items: the total of SKU {sku} is too large")))?;
        total_cents = total_cents
            .checked_add(line_total)
            .ok_or_else(|| Error::Invalid("items: the order total is too large".into()))?;
        lines.push(OrderLine {
            sku: sku.clone(),
            quantity,
            unit_price_cents: product.unit_price_cents,
        });
    }
    Ok(Priced {
        lines,
        total_cents,
        currency: currency.unwrap_or("USD").to_owned(),
    })
}

/// An order as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub customer_id: String,
    pub status: OrderStatus,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: String,
    pub payment_method: String,
    pub payment_id: Option<PaymentId>,
    pub failure_reason: Option<String>,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(items: &[(&str, u32)]) -> Result<OrderRequest, Error> {
        OrderRequest::new(
            "cust-1".into(),
            items.iter().map(|(s, q)| (s.to_string(), *q)).collect(),
            "pm_card_visa".into(),
            String::new(),
        )
    }

    fn invalid(result: Result<OrderRequest, Error>) -> String {
        match result {
            Err(Error::Invalid(message)) => message,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn catalog() -> HashMap<String, Product> {
        [("SKU-A", 150), ("SKU-B", 2000)]
            .into_iter()
            .map(|(sku, price)| {
                let product = Product {
                    sku: sku.into(),
                    name: sku.into(),
                    unit_price_cents: price,
                    currency: "USD".into(),
                };
                (sku.to_owned(), product)
            })
            .collect()
    }

    #[test]
    fn statuses_only_move_forward_and_terminal_ones_never_change() {
        use OrderStatus::*;
        for from in OrderStatus::ALL {
            for to in OrderStatus::ALL {
                let allowed = from.can_move_to(to);
                if from.is_terminal() || to.rank() <= from.rank() {
                    assert!(!allowed, "{from} -> {to} must be refused");
                }
            }
        }
        assert!(Pending.can_move_to(PaymentInitiated));
        assert!(Pending.can_move_to(Completed));
        assert!(Pending.can_move_to(Failed));
        assert!(PaymentInitiated.can_move_to(Completed));
        assert!(PaymentInitiated.can_move_to(Failed));
    }

    #[test]
    fn commands_apply_from_the_expected_statuses() {
        use OrderStatus::*;
        let mark = OrderCommand::MarkPaymentInitiated {
            payment_id: PaymentId(Uuid::nil()),
        };
        assert_eq!(mark.applies_from(), vec![Pending]);
        assert_eq!(
            OrderCommand::Complete.applies_from(),
            vec![Pending, PaymentInitiated]
        );
        let fail = OrderCommand::Fail { reason: "x".into() };
        assert_eq!(fail.applies_from(), vec![Pending, PaymentInitiated]);
    }

    #[test]
    fn status_names_round_trip() {
        for status in OrderStatus::ALL {
            assert_eq!(OrderStatus::from_db(status.as_str()), Some(status));
        }
        assert_eq!(OrderStatus::from_db("pending"), None);
    }

    #[test]
    fn lines_of_one_sku_are_merged_and_sorted() {
        let request = request(&[("SKU-B", 1), ("SKU-A", 2), ("SKU-B", 3)]).unwrap();
        let lines: Vec<_> = request.lines.into_iter().collect();
        assert_eq!(
            lines,
            vec![("SKU-A".to_owned(), 2), ("SKU-B".to_owned(), 4)]
        );
    }

    #[test]
    fn invalid_fields_are_named() {
        assert!(invalid(OrderRequest::new(
            " ".into(),
            vec![("SKU-A".into(), 1)],
            "pm".into(),
            String::new()
        ))
        .contains("customer_id"));
        assert!(invalid(OrderRequest::new(
            "c".repeat(129),
            vec![("SKU-A".into(), 1)],
            "pm".into(),
            String::new()
        ))
        .contains("customer_id"));
        // 128 characters, not bytes.
        assert!(OrderRequest::new(
            "é".repeat(128),
            vec![("SKU-A".into(), 1)],
            "pm".into(),
            String::new()
        )
        .is_ok());
        assert!(invalid(request(&[])).contains("items"));
        assert!(invalid(request(&[("SKU-A", 1); 51])).contains("items"));
        assert!(invalid(request(&[("SKU-A", 0)])).contains("items[0].quantity"));
        assert!(invalid(request(&[("SKU-A", 1), ("SKU-B", 1001)])).contains("items[1].quantity"));
        assert!(invalid(request(&[("SKU-A", 600), ("SKU-A", 600)])).contains("SKU-A"));
        assert!(invalid(request(&[("", 1)])).contains("items[0].sku"));
        assert!(invalid(OrderRequest::new(
            "c".into(),
            vec![("SKU-A".into(), 1)],
            String::new(),
            String::new()
        ))
        .contains("payment_method"));
        assert!(invalid(OrderRequest::new(
            "c".into(),
            vec![("SKU-A".into(), 1)],
            "pm".into(),
            "k".repeat(256)
        ))
        .contains("idempotency_key"));
        let keyed = OrderRequest::new(
            "c".into(),
            vec![("SKU-A".into(), 1)],
            "pm".into(),
            "k".repeat(255),
        )
        .unwrap();
        assert_eq!(
            keyed.idempotency_key.as_deref(),
            Some("k".repeat(255).as_str())
        );
    }

    #[test]
    fn fingerprint_ignores_item_order_and_splitting_but_not_content() {
        let a = request(&[("SKU-A", 2), ("SKU-B", 1)]).unwrap();
        let b = request(&[("SKU-B", 1), ("SKU-A", 1), ("SKU-A", 1)]).unwrap();
        let c = request(&[("SKU-A", 2), ("SKU-B", 2)]).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        let mut other_method = a.clone();
        other_method.payment_method = "pm_other".into();
        assert_ne!(a.fingerprint(), other_method.fingerprint());
    }

    #[test]
    fn prices_come_from_the_catalog() {
        let priced = price(&request(&[("SKU-B", 2), ("SKU-A", 3)]).unwrap(), &catalog()).unwrap();
        assert_eq!(priced.total_cents, 3 * 150 + 2 * 2000);
        assert_eq!(priced.currency, "USD");
        assert_eq!(priced.lines[0].sku, "SKU-A");
        assert_eq!(priced.lines[0].total_cents(), 450);
    }

    #[test]
    fn unknown_skus_are_refused() {
        let error = price(
            &request(&[("SKU-A", 1), ("SKU-NOPE", 1)]).unwrap(),
            &catalog(),
        )
        .unwrap_err();
        assert!(matches!(error, Error::Invalid(m) if m == "unknown SKU: SKU-NOPE"));
    }

    #[test]
    fn mixed_currencies_are_refused() {
        let mut catalog = catalog();
        if let Some(p) = catalog.get_mut("SKU-B") {
            p.currency = "EUR".into();
        }
        let error = price(&request(&[("SKU-A", 1), ("SKU-B", 1)]).unwrap(), &catalog).unwrap_err();
        assert!(matches!(error, Error::Invalid(m) if m.contains("SKU-B")));
    }
}
