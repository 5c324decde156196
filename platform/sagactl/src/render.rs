//! Sagas as operators read them: a table of sagas, one saga's timeline and current state, and
//! the same as JSON for scripts.

use std::fmt::Write as _;

use proto::saga::v1 as pb;
use serde_json::{json, Value};

use crate::{now_ms, short_duration, time};

/// A state's name as operators know it, e.g. `AWAITING_VERIFICATION`.
pub fn state_name(state: pb::SagaState) -> &'static str {
    match state {
        pb::SagaState::Unspecified => "-",
        pb::SagaState::Reserving => "RESERVING",
        pb::SagaState::Charging => "CHARGING",
        pb::SagaState::AwaitingVerification => "AWAITING_VERIFICATION",
        pb::SagaState::Committing => "COMMITTING",
        pb::SagaState::Compensating => "COMPENSATING",
        pb::SagaState::Completing => "COMPLETING",
        pb::SagaState::Failing => "FAILING",
        pb::SagaState::Completed => "COMPLETED",
        pb::SagaState::Failed => "FAILED",
    }
}

/// A state from a command line: any case, `-` or `_` between words.
pub fn parse_state(text: &str) -> Result<pb::SagaState, String> {
    let name = text.trim().to_ascii_uppercase().replace('-', "_");
    pb::SagaState::from_str_name(&format!("SAGA_STATE_{name}"))
        .filter(|s| *s != pb::SagaState::Unspecified)
        .ok_or_else(|| {
            format!(
                "unknown saga state {text:?}; one of reserving, charging, awaiting-verification, \
                 committing, compensating, completed, failed"
            )
        })
}

pub fn money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", cents / 100, cents % 100)
}

/// What most needs saying about a saga in one line: its flag, or why it failed.
fn note(saga: &pb::Saga) -> String {
    if saga.needs_operator {
        format!("NEEDS OPERATOR: {}", saga.last_error)
    } else if !saga.failure_reason.is_empty() {
        saga.failure_reason.clone()
    } else {
        String::new()
    }
}

/// Sagas as a table, newest first.
pub fn saga_table(sagas: &[pb::Saga]) -> String {
    let now = now_ms();
    let mut out = format!(
        "{:<36}  {:<21}  {:<16}  {:>14}  {:>7}  {:>8}  {:>3}  NOTE\n",
        "SAGA (ORDER)", "STATE", "CUSTOMER", "TOTAL", "AGE", "IN STATE", "TRY"
    );
    for saga in sagas {
        let _ = writeln!(
            out,
            "{:<36}  {:<21}  {:<16}  {:>14}  {:>7}  {:>8}  {:>3}  {}",
            saga.saga_id,
            state_name(saga.state()),
            saga.customer_id,
            money(saga.total_cents, &saga.currency),
            short_duration(now - saga.created_at_ms),
            short_duration(now - saga.state_since_ms),
            saga.attempts,
            note(saga)
        );
    }
    out
}

fn command(command: &pb::Command) -> String {
    if !command.reason.is_empty() {
        format!("{}({:?})", command.name, command.reason)
    } else if !command.payment_id.is_empty() {
        format!("{}({})", command.name, command.payment_id)
    } else {
        command.name.clone()
    }
}

fn commands(transition: &pb::Transition) -> String {
    if transition.commands.is_empty() {
        "nothing".to_owned()
    } else {
        transition
            .commands
            .iter()
            .map(command)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One transition on one line: time, from -> to, what caused it (type and message id), the
/// commands sent and the correlation id.
pub fn transition_line(t: &pb::Transition) -> String {
    let from = match t.from_state() {
        pb::SagaState::Unspecified => "START",
        state => state_name(state),
    };
    let mut line = format!(
        "{}  {:>21} -> {:<21}  {} <- {} {}  sent {}  correlation {}",
        time(t.at_ms),
        from,
        state_name(t.to_state()),
        t.input,
        t.message_type,
        t.message_id,
        commands(t),
        if t.correlation_id.is_empty() {
            "-"
        } else {
            &t.correlation_id
        },
    );
    if !t.operator_reason.is_empty() {
        let _ = write!(line, "  reason {:?}", t.operator_reason);
    }
    line
}

/// The current state of a saga, one field per line.
pub fn saga_block(saga: &pb::Saga) -> String {
    let now = now_ms();
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let lines = saga
        .lines
        .iter()
        .map(|l| {
            format!(
                "{} x {} @ {}",
                l.quantity,
                l.sku,
                money(l.unit_price_cents, &saga.currency)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let deadlines = if saga.deadlines.is_empty() {
        "none armed".to_owned()
    } else {
        saga.deadlines
            .iter()
            .map(|d| {
                let left = d.fire_at_ms - now;
                let when = if left >= 0 {
                    format!("in {}", short_duration(left))
                } else {
                    format!("{} overdue", short_duration(-left))
                };
                format!("{} at {} ({when})", d.kind, time(d.fire_at_ms))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let operator = if saga.needs_operator {
        format!("NEEDS AN OPERATOR: {}", saga.last_error)
    } else if saga.last_error.is_empty() {
        "not needed".to_owned()
    } else {
        format!("not needed (last error: {})", saga.last_error)
    };
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "  {name:<12} {value}");
    };
    field(
        "state",
        format!(
            "{} since {} ({} ago)",
            state_name(saga.state()),
            time(saga.state_since_ms),
            short_duration(now - saga.state_since_ms)
        ),
    );
    field("order", saga.order_id.clone());
    field("customer", saga.customer_id.clone());
    field(
        "items",
        format!(
            "{lines}; total {} by {}",
            money(saga.total_cents, &saga.currency),
            saga.payment_method
        ),
    );
    field("reservation", or_dash(&saga.reservation_id));
    field("payment", or_dash(&saga.payment_id));
    field("deadlines", deadlines);
    field("attempts", saga.attempts.to_string());
    field("operator", operator);
    if !saga.failure_reason.is_empty() {
        field("failure", saga.failure_reason.clone());
    }
    if !saga.pending_compensations.is_empty() {
        field("pending", saga.pending_compensations.join(", "));
    }
    field("correlation", or_dash(&saga.correlation_id));
    field(
        "version",
        format!(
            "{} (started {}, updated {})",
            saga.version,
            time(saga.created_at_ms),
            time(saga.updated_at_ms)
        ),
    );
    out
}

/// `sagactl show`: the timeline, oldest first, then where the saga stands.
pub fn saga_detail(detail: &pb::SagaDetail) -> String {
    let mut out = String::new();
    let Some(saga) = &detail.saga else {
        return out;
    };
    let _ = writeln!(
        out,
        "saga {} ({} transitions)\n\ntimeline",
        saga.saga_id,
        detail.history.len()
    );
    for t in &detail.history {
        let _ = writeln!(out, "  {}", transition_line(t));
    }
    let _ = writeln!(out, "\nnow");
    out.push_str(&saga_block(saga));
    out
}

/// After `sagactl retry` or `abort`: where the saga stands and what the request sent.
pub fn operated(what: &str, detail: &pb::SagaDetail) -> String {
    let Some(saga) = &detail.saga else {
        return String::new();
    };
    let last = detail.history.last();
    let mut out = format!(
        "saga {}: {what}; now {}",
        saga.saga_id,
        state_name(saga.state())
    );
    if let Some(t) = last {
        let _ = write!(out, " (transition {}, sent {})", t.version, commands(t));
    }
    out.push('\n');
    out
}

pub fn saga_json(saga: &pb::Saga) -> Value {
    json!({
        "saga_id": saga.saga_id,
        "order_id": saga.order_id,
        "state": state_name(saga.state()),
        "customer_id": saga.customer_id,
        "lines": saga.lines.iter().map(|l| json!({
            "sku": l.sku, "quantity": l.quantity, "unit_price_cents": l.unit_price_cents,
        })).collect::<Vec<_>>(),
        "total_cents": saga.total_cents,
        "currency": saga.currency,
        "payment_method": saga.payment_method,
        "reservation_id": saga.reservation_id,
        "payment_id": saga.payment_id,
        "failure_reason": saga.failure_reason,
        "pending_compensations": saga.pending_compensations,
        "attempts": saga.attempts,
        "needs_operator": saga.needs_operator,
        "last_error": saga.last_error,
        "deadlines": saga.deadlines.iter().map(|d| json!({
            "kind": d.kind, "fire_at": time(d.fire_at_ms), "fire_at_ms": d.fire_at_ms,
        })).collect::<Vec<_>>(),
        "correlation_id": saga.correlation_id,
        "version": saga.version,
        "created_at_ms": saga.created_at_ms,
        "updated_at_ms": saga.updated_at_ms,
        "state_since_ms": saga.state_since_ms,
    })
}

pub fn transition_json(t: &pb::Transition) -> Value {
    json!({
        "version": t.version,
        "from": match t.from_state() { pb::SagaState::Unspecified => Value::Null, s => json!(state_name(s)) },
        "to": state_name(t.to_state()),
        "input": t.input,
        "message_id": t.message_id,
        "message_type": t.message_type,
        "commands": t.commands.iter().map(|c| json!({
            "name": c.name, "reason": c.reason, "payment_id": c.payment_id,
        })).collect::<Vec<_>>(),
        "correlation_id": t.correlation_id,
        "at_ms": t.at_ms,
        "operator_reason": t.operator_reason,
    })
}

pub fn detail_json(detail: &pb::SagaDetail) -> Value {
    json!({
        "saga": detail.saga.as_ref().map(saga_json),
        "history": detail.history.iter().map(transition_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_parsed_as_operators_type_them() {
        assert_eq!(
            parse_state("awaiting-verification"),
            Ok(pb::SagaState::AwaitingVerification)
        );
        assert_eq!(parse_state("FAILED"), Ok(pb::SagaState::Failed));
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("done").unwrap_err().contains("compensating"));
    }

    #[test]
    fn a_transition_is_one_readable_line() {
        let t = pb::Transition {
            version: 4,
            from_state: pb::SagaState::AwaitingVerification.into(),
            to_state: pb::SagaState::Compensating.into(),
            input: "Abort".into(),
            message_id: "admin:42".into(),
            message_type: "operator.AbortSaga".into(),
            commands: vec![
                pb::Command {
                    name: "CancelDeadline".into(),
                    ..Default::default()
                },
                pb::Command {
                    name: "VoidPayment".into(),
                    reason: "aborted by an operator: fraud".into(),
                    ..Default::default()
                },
            ],
            correlation_id: "corr-1".into(),
            at_ms: 1_700_000_000_123,
            operator_reason: "fraud".into(),
        };
        assert_eq!(
            transition_line(&t),
            "2023-11-14 22:13:20.123  AWAITING_VERIFICATION -> COMPENSATING           Abort <- \
             operator.AbortSaga admin:42  sent CancelDeadline, VoidPayment(\"aborted by an \
             operator: fraud\")  correlation corr-1  reason \"fraud\""
        );
    }

    #[test]
    fn money_has_two_decimals() {
        assert_eq!(money(5800, "USD"), "58.00 USD");
        assert_eq!(money(5, "USD"), "0.05 USD");
        assert_eq!(money(-250, "USD"), "-2.50 USD");
    }
}
