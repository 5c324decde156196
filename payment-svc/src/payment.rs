//! The payment as this service knows it, and how the saga's compensations change it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Id of a payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct PaymentId(pub Uuid);

/// Id of an order, which is also the saga's id and every message's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct OrderId(pub Uuid);

/// The customer whose order a payment is for, as order-svc and the gateway name them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct CustomerId(pub String);

/// Longest customer id (order-svc accepts no longer).
pub const MAX_CUSTOMER_ID_CHARS: usize = 128;

impl CustomerId {
    /// The customer named by a request or command field: `None` when empty (not given), an
    /// error saying what is wrong when no order could have it.
    pub fn parse(value: &str) -> Result<Option<CustomerId>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        runtime::text::identifier(value, MAX_CUSTOMER_ID_CHARS)?;
        Ok(Some(CustomerId(value.to_owned())))
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Recorded for the saga; the client has not verified it yet.
    AwaitingVerification,
    /// The provider took the money.
    Succeeded,
    /// The provider refused, or the payment method was never acceptable.
    Declined,
    /// The saga's deadline passed before a verification; no money was taken.
    Voided,
    /// Money was taken and given back.
    Refunded,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingVerification => "AWAITING_VERIFICATION",
            Self::Succeeded => "SUCCEEDED",
            Self::Declined => "DECLINED",
            Self::Voided => "VOIDED",
            Self::Refunded => "REFUNDED",
        }
    }

    /// The status after the saga voids the payment (its deadline passed): one still awaiting
    /// verification is voided; one that succeeded meanwhile is refunded, since money was taken;
    /// any other is final and unchanged.
    pub fn voided(self) -> Self {
        match self {
            Self::AwaitingVerification => Self::Voided,
            Self::Succeeded => Self::Refunded,
            Self::Declined | Self::Voided | Self::Refunded => self,
        }
    }

    /// The status after the saga asks for the money back: only a payment that succeeded has
    /// any to give back.
    pub fn refunded(self) -> Self {
        match self {
            Self::Succeeded => Self::Refunded,
            Self::AwaitingVerification | Self::Declined | Self::Voided | Self::Refunded => self,
        }
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PaymentStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "AWAITING_VERIFICATION" => Ok(Self::AwaitingVerification),
            "SUCCEEDED" => Ok(Self::Succeeded),
            "DECLINED" => Ok(Self::Declined),
            "VOIDED" => Ok(Self::Voided),
            "REFUNDED" => Ok(Self::Refunded),
            other => Err(format!("unknown payment status {other:?}")),
        }
    }
}

/// A stored payment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub amount_cents: i64,
    pub currency: String,
    pub payment_method: String,
    pub status: PaymentStatus,
    pub decline_reason: Option<String>,
    /// The saga's correlation id, reused by the replies this payment causes later.
    pub correlation_id: String,
    /// The saga's W3C trace context, likewise.
    pub traceparent: String,
    /// The order's customer; `None` for a payment recorded before payments knew it.
    pub customer_id: Option<CustomerId>,
    /// Not a payment: the order was compensated before any charge (see [`crate::store`]).
    pub tombstone: bool,
    /// The idempotency key of the verification attempt recorded before the provider was asked,
    /// if one was.
    pub attempt_key: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A payment to record for an order.
#[derive(Clone, Debug)]
pub struct NewPayment {
    pub order_id: OrderId,
    pub amount_cents: i64,
    pub currency: String,
    pub payment_method: String,
    pub status: PaymentStatus,
    pub decline_reason: Option<String>,
    pub correlation_id: String,
    pub traceparent: String,
    pub customer_id: Option<CustomerId>,
}

impl NewPayment {
    /// The payment as recording it under `payment_id` makes it, now.
    pub fn recorded_as(&self, payment_id: PaymentId) -> Payment {
        let now = Utc::now();
        Payment {
            payment_id,
            order_id: self.order_id,
            amount_cents: self.amount_cents,
            currency: self.currency.clone(),
            payment_method: self.payment_method.clone(),
            status: self.status,
            decline_reason: self.decline_reason.clone(),
            correlation_id: self.correlation_id.clone(),
            traceparent: self.traceparent.clone(),
            customer_id: self.customer_id.clone(),
            tombstone: false,
            attempt_key: None,
            created_at: now,
            updated_at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PaymentStatus::{self, *};
    use super::{CustomerId, MAX_CUSTOMER_ID_CHARS};

    const ALL: [PaymentStatus; 5] = [AwaitingVerification, Succeeded, Declined, Voided, Refunded];

    #[test]
    fn customer_ids_are_optional_and_never_what_no_order_can_have() {
        assert_eq!(CustomerId::parse(""), Ok(None));
        assert_eq!(
            CustomerId::parse("c-42"),
            Ok(Some(CustomerId("c-42".into())))
        );
        assert!(CustomerId::parse("c\u{0}42").is_err());
        assert!(CustomerId::parse(&"c".repeat(MAX_CUSTOMER_ID_CHARS + 1)).is_err());
    }

    #[test]
    fn status_names_round_trip() {
        for status in ALL {
            assert_eq!(status.as_str().parse::<PaymentStatus>(), Ok(status));
        }
        assert!("PENDING".parse::<PaymentStatus>().is_err());
    }

    #[test]
    fn void_gives_back_money_taken_and_leaves_final_states() {
        assert_eq!(AwaitingVerification.voided(), Voided);
        assert_eq!(Succeeded.voided(), Refunded);
        assert_eq!(Declined.voided(), Declined);
        assert_eq!(Voided.voided(), Voided);
        assert_eq!(Refunded.voided(), Refunded);
    }

    #[test]
    fn refund_only_changes_a_success() {
        assert_eq!(Succeeded.refunded(), Refunded);
        for status in [AwaitingVerification, Declined, Voided, Refunded] {
            assert_eq!(status.refunded(), status);
        }
    }

    #[test]
    fn compensations_are_idempotent() {
        for status in ALL {
            assert_eq!(status.voided().voided(), status.voided());
            assert_eq!(status.refunded().refunded(), status.refunded());
        }
    }
}
