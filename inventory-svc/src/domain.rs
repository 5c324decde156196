//! The inventory's own types, independent of protobuf and SQL.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The order (and saga) a reservation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct OrderId(pub Uuid);

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct ReservationId(pub Uuid);

impl ReservationId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for ReservationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Most units an operator may set as available for one SKU.
pub const MAX_AVAILABLE: i64 = 1_000_000_000;

/// A stock keeping unit as operators may create it: 1 to 64 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sku(String);

impl Sku {
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() || value.len() > 64 {
            return Err(format!("must be 1 to 64 characters, got {}", value.len()));
        }
        if let Some(c) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(format!(
                "{c:?} is not allowed (only A-Z, a-z, 0-9, '_' and '-')"
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationStatus {
    Reserved,
    Committed,
    Released,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "RESERVED",
            Self::Committed => "COMMITTED",
            Self::Released => "RELEASED",
        }
    }

    /// Reads the `status` column; the table's CHECK constraint allows nothing else.
    pub fn from_db(value: &str) -> Result<Self, sqlx::Error> {
        match value {
            "RESERVED" => Ok(Self::Reserved),
            "COMMITTED" => Ok(Self::Committed),
            "RELEASED" => Ok(Self::Released),
            other => Err(sqlx::Error::Decode(
                format!("unknown reservation status {other:?}").into(),
            )),
        }
    }
}

/// Read from the `stock` table by column name.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct StockLevel {
    pub sku: String,
    pub available: i64,
    pub reserved: i64,
    pub committed: i64,
    pub written_off: i64,
    /// Every unit ever put in stock (the ledger SetStock keeps):
    /// `available + reserved + committed + written_off` when nothing went wrong.
    pub received: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationLine {
    pub sku: String,
    pub quantity: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub id: ReservationId,
    pub order_id: OrderId,
    pub status: ReservationStatus,
    /// `None` for a tombstone (released before anything was reserved).
    pub expires_at: Option<DateTime<Utc>>,
    pub release_reason: Option<String>,
    pub lines: Vec<ReservationLine>,
}

/// The lines of a reservation request, one per SKU, in SKU order (the order in which stock rows
/// are locked, so that concurrent reservations never deadlock).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lines(BTreeMap<String, i64>);

impl Lines {
    /// Merges lines of the same SKU. Every quantity must be positive, and there must be a line.
    pub fn merge<'a>(lines: impl IntoIterator<Item = (&'a str, u32)>) -> Result<Self, String> {
        let mut merged = BTreeMap::new();
        for (sku, quantity) in lines {
            if quantity == 0 {
                return Err(format!("quantity of {sku:?} must be positive"));
            }
            *merged.entry(sku.to_owned()).or_insert(0) += i64::from(quantity);
        }
        if merged.is_empty() {
            return Err("no lines to reserve".to_owned());
        }
        Ok(Self(merged))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(sku, q)| (sku.as_str(), *q))
    }

    pub fn skus(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    pub fn quantities(&self) -> Vec<i64> {
        self.0.values().copied().collect()
    }
}

/// Why a reservation could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReserveFailure {
    OutOfStock,
    UnknownSku,
    /// The order was released before (or instead of) being reserved.
    AlreadyReleased,
}

impl ReserveFailure {
    /// The `refusal` recorded for a refused reservation; `None` for a failure that records
    /// nothing of its own.
    pub fn as_refusal(self) -> Option<&'static str> {
        match self {
            Self::OutOfStock => Some("OUT_OF_STOCK"),
            Self::UnknownSku => Some("UNKNOWN_SKU"),
            Self::AlreadyReleased => None,
        }
    }

    /// Reads the `refusal` column; the table's CHECK constraint allows nothing else.
    pub fn from_refusal(value: &str) -> Result<Self, sqlx::Error> {
        match value {
            "OUT_OF_STOCK" => Ok(Self::OutOfStock),
            "UNKNOWN_SKU" => Ok(Self::UnknownSku),
            other => Err(sqlx::Error::Decode(
                format!("unknown reservation refusal {other:?}").into(),
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved {
        reservation_id: ReservationId,
        expires_at: DateTime<Utc>,
    },
    Failed {
        failure: ReserveFailure,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed { reservation_id: ReservationId },
    Failed { reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The held stock went back to available.
    Released,
    /// Nothing was held: already released, or no reservation (a tombstone now stands in).
    NothingHeld,
    /// Committed stock is sold and stays so.
    AlreadyCommitted,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_one_sku_are_merged_in_sku_order() {
        let lines = Lines::merge([("SKU-B", 2), ("SKU-A", 1), ("SKU-B", 3)]).unwrap();
        assert_eq!(
            lines.iter().collect::<Vec<_>>(),
            vec![("SKU-A", 1), ("SKU-B", 5)]
        );
    }

    #[test]
    fn zero_quantities_and_empty_requests_are_refused() {
        assert!(Lines::merge([("SKU-A", 0)]).unwrap_err().contains("SKU-A"));
        assert!(Lines::merge(std::iter::empty()).is_err());
    }

    #[test]
    fn sku_rules() {
        assert!(Sku::parse("SKU-KEYBOARD_2").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse(&"A".repeat(65)).is_err());
        assert!(Sku::parse(&"A".repeat(64)).is_ok());
        assert!(Sku::parse("SKU 1").unwrap_err().contains("' '"));
        assert!(Sku::parse("SKU-É").is_err());
    }
}
