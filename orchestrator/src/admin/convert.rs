//! Between the admin API's protobuf messages and the orchestrator's own types, at the edge.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use proto::saga::v1 as pb;
use uuid::Uuid;

use super::error::Error;
use crate::saga::{Command, Compensation, SagaState};
use crate::store::admin::{Cursor, HistoryRecord, SagaRecord};

/// Metadata carrying the caller's correlation id.
pub use messaging::service::CORRELATION_ID;

pub fn state(state: SagaState) -> pb::SagaState {
    match state {
        SagaState::Reserving => pb::SagaState::Reserving,
        SagaState::Charging => pb::SagaState::Charging,
        SagaState::AwaitingVerification => pb::SagaState::AwaitingVerification,
        SagaState::Committing => pb::SagaState::Committing,
        SagaState::Compensating => pb::SagaState::Compensating,
        SagaState::Completing => pb::SagaState::Completing,
        SagaState::Failing => pb::SagaState::Failing,
        SagaState::Completed => pb::SagaState::Completed,
        SagaState::Failed => pb::SagaState::Failed,
    }
}

/// A state named in a request.
pub fn state_filter(value: i32) -> Result<SagaState, Error> {
    match pb::SagaState::try_from(value) {
        Ok(pb::SagaState::Reserving) => Ok(SagaState::Reserving),
        Ok(pb::SagaState::Charging) => Ok(SagaState::Charging),
        Ok(pb::SagaState::AwaitingVerification) => Ok(SagaState::AwaitingVerification),
        Ok(pb::SagaState::Committing) => Ok(SagaState::Committing),
        Ok(pb::SagaState::Compensating) => Ok(SagaState::Compensating),
        Ok(pb::SagaState::Completing) => Ok(SagaState::Completing),
        Ok(pb::SagaState::Failing) => Ok(SagaState::Failing),
        Ok(pb::SagaState::Completed) => Ok(SagaState::Completed),
        Ok(pb::SagaState::Failed) => Ok(SagaState::Failed),
        Ok(pb::SagaState::Unspecified) | Err(_) => Err(Error::Invalid(format!(
            "states: {value} is not a saga state"
        ))),
    }
}

/// A state as stored in the history (`None`: before the saga started).
fn stored_state(name: Option<&str>) -> pb::SagaState {
    name.and_then(SagaState::parse)
        .map_or(pb::SagaState::Unspecified, state)
}

/// A saga id (an order id) from request field `field`.
pub fn saga_id(field: &str, value: &str) -> Result<Uuid, Error> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Error::Invalid(format!("{field} is required")));
    }
    Uuid::parse_str(value)
        .map_err(|_| Error::Invalid(format!("{field} must be a UUID, got {value:?}")))
}

fn ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn compensation(c: Compensation) -> &'static str {
    match c {
        Compensation::ReleaseInventory => "RELEASE_INVENTORY",
        Compensation::VoidPayment => "VOID_PAYMENT",
        Compensation::RefundPayment => "REFUND_PAYMENT",
    }
}

pub fn saga(record: SagaRecord) -> pb::Saga {
    let saga = record.saga;
    let id = saga.order_id.to_string();
    pb::Saga {
        saga_id: id.clone(),
        order_id: id,
        state: state(saga.state).into(),
        customer_id: saga.order.customer_id,
        lines: saga
            .order
            .lines
            .into_iter()
            .map(|l| pb::OrderLine {
                sku: l.sku,
                quantity: l.quantity,
                unit_price_cents: l.unit_price_cents,
            })
            .collect(),
        total_cents: saga.order.total_cents,
        currency: saga.order.currency,
        payment_method: saga.order.payment_method,
        reservation_id: saga
            .reservation_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        payment_id: saga.payment_id.map(|id| id.to_string()).unwrap_or_default(),
        failure_reason: saga.failure_reason.unwrap_or_default(),
        pending_compensations: saga
            .pending
            .into_iter()
            .map(|c| compensation(c).to_owned())
            .collect(),
        attempts: saga.attempts,
        needs_operator: record.needs_operator,
        last_error: record.last_error.unwrap_or_default(),
        deadlines: record
            .timers
            .into_iter()
            .map(|(kind, fire_at)| pb::Deadline {
                kind,
                fire_at_ms: ms(fire_at),
            })
            .collect(),
        correlation_id: record.correlation_id,
        version: record.version,
        created_at_ms: ms(record.created_at),
        updated_at_ms: ms(record.updated_at),
        state_since_ms: ms(record.state_since),
    }
}

fn command(command: Command) -> pb::Command {
    let (name, reason, payment_id) = match command {
        Command::ReserveInventory => ("ReserveInventory", None, None),
        Command::ChargePayment => ("ChargePayment", None, None),
        Command::CommitInventory => ("CommitInventory", None, None),
        Command::ReleaseInventory { reason } => ("ReleaseInventory", Some(reason), None),
        Command::VoidPayment { reason } => ("VoidPayment", Some(reason), None),
        Command::RefundPayment { reason } => ("RefundPayment", Some(reason), None),
        Command::MarkPaymentInitiated { payment_id } => {
            ("MarkPaymentInitiated", None, Some(payment_id.to_string()))
        }
        Command::CompleteOrder => ("CompleteOrder", None, None),
        Command::FailOrder { reason } => ("FailOrder", Some(reason), None),
        Command::StartDeadline => ("StartDeadline", None, None),
        Command::CancelDeadline => ("CancelDeadline", None, None),
    };
    pb::Command {
        name: name.to_owned(),
        reason: reason.unwrap_or_default(),
        payment_id: payment_id.unwrap_or_default(),
    }
}

/// The commands of a history row; one this version cannot read is shown as stored.
fn commands(stored: serde_json::Value) -> Vec<pb::Command> {
    let serde_json::Value::Array(items) = stored else {
        return vec![];
    };
    items
        .into_iter()
        .map(
            |item| match serde_json::from_value::<Command>(item.clone()) {
                Ok(c) => command(c),
                Err(_) => pb::Command {
                    name: item.to_string(),
                    ..Default::default()
                },
            },
        )
        .collect()
}

pub fn transition(record: HistoryRecord) -> pb::Transition {
    pb::Transition {
        version: record.version,
        from_state: stored_state(record.from_state.as_deref()).into(),
        to_state: stored_state(Some(&record.to_state)).into(),
        input: record.input,
        message_id: record.message_id,
        message_type: record.message_type,
        commands: commands(record.commands),
        correlation_id: record.correlation_id,
        at_ms: ms(record.created_at),
        operator_reason: record.operator_reason.unwrap_or_default(),
    }
}

/// An opaque page token: where the next page starts.
pub fn page_token(cursor: Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}:{}",
        cursor.created_at.timestamp_micros(),
        cursor.saga_id
    ))
}

pub fn cursor(token: &str) -> Result<Cursor, Error> {
    let invalid = || Error::Invalid("page_token is not one this API gave".to_owned());
    let text = URL_SAFE_NO_PAD
        .decode(token.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let (micros, id) = text.split_once(':').ok_or_else(invalid)?;
    let created_at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid)?;
    let saga_id = Uuid::parse_str(id).map_err(|_| invalid())?;
    Ok(Cursor {
        created_at,
        saga_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_strangers_are_refused() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            saga_id: Uuid::now_v7(),
        };
        assert_eq!(super::cursor(&page_token(cursor)).unwrap(), cursor);
        for bad in ["", "!!", "bm9wZQ", &URL_SAFE_NO_PAD.encode("12:nope")] {
            assert!(
                matches!(super::cursor(bad), Err(Error::Invalid(m)) if m.contains("page_token")),
                "{bad}"
            );
        }
    }

    #[test]
    fn stored_commands_are_named_with_their_reason() {
        let stored = serde_json::json!([
            {"type": "CANCEL_DEADLINE"},
            {"type": "VOID_PAYMENT", "reason": "aborted by an operator: fraud"},
            {"type": "SOMETHING_NEWER"}
        ]);
        let commands = commands(stored);
        assert_eq!(commands[0].name, "CancelDeadline");
        assert_eq!(
            (commands[1].name.as_str(), commands[1].reason.as_str()),
            ("VoidPayment", "aborted by an operator: fraud")
        );
        assert!(commands[2].name.contains("SOMETHING_NEWER"));
    }

    #[test]
    fn unspecified_states_are_refused_as_filters() {
        assert!(state_filter(pb::SagaState::Unspecified.into()).is_err());
        assert!(state_filter(99).is_err());
        assert_eq!(
            state_filter(pb::SagaState::Compensating.into()).unwrap(),
            SagaState::Compensating
        );
    }
}
