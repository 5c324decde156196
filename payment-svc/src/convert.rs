//! Domain <-> protobuf, at the edge of the service (gRPC and Kafka replies).

use proto::payment::v1 as pb;
use uuid::Uuid;

use crate::error::Error;
use crate::payment::{Payment, PaymentStatus};

pub fn status(status: PaymentStatus) -> pb::PaymentStatus {
    match status {
        PaymentStatus::AwaitingVerification => pb::PaymentStatus::AwaitingVerification,
        PaymentStatus::Succeeded => pb::PaymentStatus::Succeeded,
        PaymentStatus::Declined => pb::PaymentStatus::Declined,
        PaymentStatus::Voided => pb::PaymentStatus::Voided,
        PaymentStatus::Refunded => pb::PaymentStatus::Refunded,
    }
}

pub fn payment(payment: &Payment) -> pb::Payment {
    pb::Payment {
        payment_id: payment.payment_id.to_string(),
        order_id: payment.order_id.to_string(),
        amount_cents: payment.amount_cents,
        currency: payment.currency.clone(),
        payment_method: payment.payment_method.clone(),
        status: status(payment.status).into(),
        decline_reason: payment.decline_reason.clone().unwrap_or_default(),
        created_at_ms: payment.created_at.timestamp_millis(),
        updated_at_ms: payment.updated_at.timestamp_millis(),
    }
}

/// The payment id and status a compensation reply carries: empty and UNSPECIFIED when the order
/// has no payment.
pub fn id_and_status(payment: Option<&Payment>) -> (String, pb::PaymentStatus) {
    match payment {
        Some(p) => (p.payment_id.to_string(), status(p.status)),
        None => (String::new(), pb::PaymentStatus::Unspecified),
    }
}

/// The reply of a declined payment.
pub fn payment_failed(payment: &Payment) -> pb::PaymentFailed {
    pb::PaymentFailed {
        order_id: payment.order_id.to_string(),
        payment_id: payment.payment_id.to_string(),
        reason: payment.decline_reason.clone().unwrap_or_default(),
    }
}

/// A UUID from request field `field`.
pub fn uuid(field: &str, value: &str) -> Result<Uuid, Error> {
    if value.is_empty() {
        return Err(Error::Invalid(format!("{field} is required")));
    }
    Uuid::parse_str(value).map_err(|_| match value.chars().count() {
        // A long value is not echoed back.
        0..=64 => Error::Invalid(format!("{field} {value:?} is not a valid UUID")),
        _ => Error::Invalid(format!("{field} is not a valid UUID")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_fields_name_themselves_in_errors() {
        let error = uuid("payment_id", "nope").unwrap_err().to_string();
        assert_eq!(error, "payment_id \"nope\" is not a valid UUID");
        let error = uuid("order_id", "").unwrap_err().to_string();
        assert_eq!(error, "order_id is required");
        let id = Uuid::new_v4();
        assert_eq!(uuid("payment_id", &id.to_string()).unwrap(), id);
    }
}
