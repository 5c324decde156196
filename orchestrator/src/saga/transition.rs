use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::state::{Compensation, OrderDetails, Saga, SagaState};

/// What can happen to a saga: the event that starts it, the services' replies, and its timer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Input {
    OrderCreated {
        order: OrderDetails,
    },
    InventoryReserved {
        reservation_id: Uuid,
    },
    InventoryReservationFailed {
        reason: String,
    },
    PaymentInitiated {
        payment_id: Uuid,
    },
    PaymentSucceeded {
        payment_id: Uuid,
    },
    PaymentFailed {
        reason: String,
    },
    InventoryCommitted,
    InventoryCommitFailed {
        reason: String,
    },
    InventoryReleased,
    PaymentVoided,
    PaymentRefunded,
    /// order-svc confirms the order `COMPLETED` (after a `CompleteOrder`, or any final
    /// command that found it so).
    OrderCompleted,
    /// order-svc confirms the order `FAILED`, with its failure reason.
    OrderFailed {
        reason: String,
    },
    /// The payment deadline passed.
    DeadlineExpired,
    /// The service of the current step has not answered in time: send its command again.
    StepTimedOut,
    /// An operator asks to send the current step's command again.
    Retry,
    /// An operator asks to compensate now.
    Abort {
        reason: String,
    },
}

impl Input {
    pub fn name(&self) -> &'static str {
        match self {
            Input::OrderCreated { .. } => "OrderCreated",
            Input::InventoryReserved { .. } => "InventoryReserved",
            Input::InventoryReservationFailed { .. } => "InventoryReservationFailed",
            Input::PaymentInitiated { .. } => "PaymentInitiated",
            Input::PaymentSucceeded { .. } => "PaymentSucceeded",
            Input::PaymentFailed { .. } => "PaymentFailed",
            Input::InventoryCommitted => "InventoryCommitted",
            Input::InventoryCommitFailed { .. } => "InventoryCommitFailed",
            Input::InventoryReleased => "InventoryReleased",
            Input::PaymentVoided => "PaymentVoided",
            Input::PaymentRefunded => "PaymentRefunded",
            Input::OrderCompleted => "OrderCompleted",
            Input::OrderFailed { .. } => "OrderFailed",
            Input::DeadlineExpired => "DeadlineExpired",
            Input::StepTimedOut => "StepTimedOut",
            Input::Retry => "Retry",
            Input::Abort { .. } => "Abort",
        }
    }
}

/// What the saga asks for: commands to the services (sent through the outbox) and its timer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Command {
    ReserveInventory,
    ChargePayment,
    CommitInventory,
    ReleaseInventory { reason: String },
    VoidPayment { reason: String },
    RefundPayment { reason: String },
    MarkPaymentInitiated { payment_id: Uuid },
    CompleteOrder,
    FailOrder { reason: String },
    StartDeadline,
    CancelDeadline,
}

/// The result of applying an input that changes the saga.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub saga: Saga,
    pub commands: Vec<Command>,
    /// The saga and the world disagree in a way it cannot repair by itself (order-svc reports
    /// the order's status the other way): an operator must look, and why.
    pub alert: Option<String>,
}

// Returned once per input and taken apart at once: boxing the large variant would only add an
// allocation to every transition.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Changed(Transition),
    /// The input means nothing in this state (a late or duplicate reply, a timer that lost a
    /// race): nothing changes and nothing is sent.
    Ignored(&'static str),
}

/// Applies `input` to `saga` (`None` before the saga starts). Pure: no I/O, no clock.
pub fn apply(saga: Option<&Saga>, order_id: Uuid, input: &Input) -> Outcome {
    let mut outcome = transition(saga, order_id, input);
    if let (Some(before), Outcome::Changed(t)) = (saga, &mut outcome) {
        if t.saga.state != before.state {
            // A new step starts its count of attempts afresh.
            t.saga.attempts = 0;
        }
    }
    outcome
}

fn transition(saga: Option<&Saga>, order_id: Uuid, input: &Input) -> Outcome {
    let Some(saga) = saga else {
        return match input {
            Input::OrderCreated { order } => Outcome::Changed(Transition {
                saga: Saga {
                    order_id,
                    state: SagaState::Reserving,
                    order: order.clone(),
                    reservation_id: None,
                    payment_id: None,
                    failure_reason: None,
                    pending: BTreeSet::new(),
                    attempts: 0,
                },
                commands: vec![Command::ReserveInventory, Command::StartDeadline],
                alert: None,
            }),
            _ => Outcome::Ignored("no saga for this order"),
        };
    };
    use SagaState::*;
    match (saga.state, input) {
        (_, Input::OrderCreated { .. }) => Outcome::Ignored("saga already started"),
        (Completed | Failed, _) => Outcome::Ignored("saga already finished"),

        (Reserving, Input::InventoryReserved { reservation_id }) => {
            let mut next = saga.clone();
            next.state = Charging;
            next.reservation_id = Some(*reservation_id);
            changed(next, vec![Command::ChargePayment])
        }
        (Reserving, Input::InventoryReservationFailed { reason }) => {
            // Nothing is held when a reservation fails: the saga fails at once.
            let reason = format!("inventory reservation failed: {reason}");
            let mut next = saga.clone();
            next.state = Failing;
            next.failure_reason = Some(reason.clone());
            changed(
                next,
                vec![Command::CancelDeadline, Command::FailOrder { reason }],
            )
        }
        (Reserving, Input::DeadlineExpired) => compensate(
            saga,
            "payment deadline passed before the stock was reserved",
            &[Compensation::ReleaseInventory],
        ),

        (Charging, Input::PaymentInitiated { payment_id }) => {
            let mut next = saga.clone();
            next.state = AwaitingVerification;
            next.payment_id = Some(*payment_id);
            changed(
                next,
                vec![Command::MarkPaymentInitiated {
                    payment_id: *payment_id,
                }],
            )
        }
        (Charging | AwaitingVerification, Input::PaymentFailed { reason }) => {
            let mut transition = compensate(
                saga,
                &format!("payment failed: {reason}"),
                &[Compensation::ReleaseInventory],
            );
            if let Outcome::Changed(t) = &mut transition {
                t.commands.insert(0, Command::CancelDeadline);
            }
            transition
        }
        (Charging | AwaitingVerification, Input::DeadlineExpired) => compensate(
            saga,
            "payment not verified before the deadline",
            &[Compensation::VoidPayment, Compensation::ReleaseInventory],
        ),

        (AwaitingVerification, Input::PaymentSucceeded { .. }) => {
            let mut next = saga.clone();
            next.state = Committing;
            changed(
                next,
                vec![Command::CancelDeadline, Command::CommitInventory],
            )
        }

        (Committing, Input::InventoryCommitted) => {
            let mut next = saga.clone();
            next.state = Completing;
            changed(next, vec![Command::CompleteOrder])
        }
        (Committing, Input::InventoryCommitFailed { reason }) => compensate(
            saga,
            &format!("inventory commit failed: {reason}"),
            &[Compensation::RefundPayment, Compensation::ReleaseInventory],
        ),

        (Compensating, Input::InventoryReleased) => confirm(saga, Compensation::ReleaseInventory),
        (Compensating, Input::PaymentVoided) => confirm(saga, Compensation::VoidPayment),
        (Compensating, Input::PaymentRefunded) => confirm(saga, Compensation::RefundPayment),
        (Compensating, Input::PaymentInitiated { payment_id }) if saga.payment_id.is_none() => {
            // The deadline passed while the charge was in flight; the void sent after it will
            // cancel this payment. Keep its id for operators.
            let mut next = saga.clone();
            next.payment_id = Some(*payment_id);
            changed(next, vec![])
        }

        // The saga ends once order-svc confirms its order; the other status is a disagreement
        // no resend repairs (order-svc's statuses are final): flag it, and keep waiting.
        (Completing, Input::OrderCompleted) => {
            let mut next = saga.clone();
            next.state = Completed;
            changed(next, vec![])
        }
        (Failing, Input::OrderFailed { .. }) => {
            let mut next = saga.clone();
            next.state = Failed;
            changed(next, vec![])
        }
        (Completing, Input::OrderFailed { reason }) => alert(
            saga,
            format!(
                "order-svc reports the order FAILED ({reason}) though its stock is committed and its payment taken"
            ),
        ),
        (Failing, Input::OrderCompleted) => alert(
            saga,
            format!(
                "order-svc reports the order COMPLETED though the saga failed ({}) and holds nothing",
                saga.failure_reason.as_deref().unwrap_or("no reason")
            ),
        ),

        (
            Reserving | Charging | Committing | Compensating | Completing | Failing,
            Input::StepTimedOut | Input::Retry,
        ) => {
            let mut next = saga.clone();
            next.attempts += 1;
            changed(next, step_commands(saga))
        }
        (AwaitingVerification, Input::Retry) => {
            Outcome::Ignored("waiting for the client to verify the payment")
        }
        (_, Input::StepTimedOut) => Outcome::Ignored("no step in flight"),

        (Reserving, Input::Abort { reason }) => compensate(
            saga,
            &format!("aborted by an operator: {reason}"),
            &[Compensation::ReleaseInventory],
        )
        .with_first(Command::CancelDeadline),
        (Charging | AwaitingVerification, Input::Abort { reason }) => compensate(
            saga,
            &format!("aborted by an operator: {reason}"),
            &[Compensation::VoidPayment, Compensation::ReleaseInventory],
        )
        .with_first(Command::CancelDeadline),
        (Committing, Input::Abort { .. }) => Outcome::Ignored(
            "the payment succeeded and the stock is being committed: retry instead",
        ),
        (Compensating, Input::Abort { .. }) => Outcome::Ignored("already compensating"),
        (Completing, Input::Abort { .. }) => Outcome::Ignored(
            "the stock is committed and the payment taken; the order is being completed: retry instead",
        ),
        (Failing, Input::Abort { .. }) => Outcome::Ignored("already failing"),

        _ => Outcome::Ignored("input does not apply in this state"),
    }
}

impl Outcome {
    fn with_first(mut self, command: Command) -> Outcome {
        if let Outcome::Changed(t) = &mut self {
            t.commands.insert(0, command);
        }
        self
    }
}

/// The commands of the step the saga is waiting on, to send again.
fn step_commands(saga: &Saga) -> Vec<Command> {
    let reason = saga.failure_reason.clone().unwrap_or_default();
    match saga.state {
        SagaState::Reserving => vec![Command::ReserveInventory],
        SagaState::Charging => vec![Command::ChargePayment],
        SagaState::Committing => vec![Command::CommitInventory],
        SagaState::Compensating => saga
            .pending
            .iter()
            .map(|c| compensation_command(*c, &reason))
            .collect(),
        SagaState::Completing => vec![Command::CompleteOrder],
        SagaState::Failing => vec![Command::FailOrder { reason }],
        SagaState::AwaitingVerification | SagaState::Completed | SagaState::Failed => vec![],
    }
}

fn compensation_command(compensation: Compensation, reason: &str) -> Command {
    let reason = reason.to_owned();
    match compensation {
        Compensation::ReleaseInventory => Command::ReleaseInventory { reason },
        Compensation::VoidPayment => Command::VoidPayment { reason },
        Compensation::RefundPayment => Command::RefundPayment { reason },
    }
}

fn changed(saga: Saga, commands: Vec<Command>) -> Outcome {
    Outcome::Changed(Transition {
        saga,
        commands,
        alert: None,
    })
}

/// Nothing changes and nothing is sent, but an operator must look: the history records the
/// input and the saga is flagged with `why`.
fn alert(saga: &Saga, why: String) -> Outcome {
    Outcome::Changed(Transition {
        saga: saga.clone(),
        commands: vec![],
        alert: Some(why),
    })
}

/// Starts compensating: sends each compensation and waits for all of them.
fn compensate(saga: &Saga, reason: &str, compensations: &[Compensation]) -> Outcome {
    let mut next = saga.clone();
    next.state = SagaState::Compensating;
    next.failure_reason = Some(reason.to_owned());
    next.pending = compensations.iter().copied().collect();
    let commands = compensations
        .iter()
        .map(|c| match c {
            Compensation::ReleaseInventory => Command::ReleaseInventory {
                reason: reason.to_owned(),
            },
            Compensation::VoidPayment => Command::VoidPayment {
                reason: reason.to_owned(),
            },
            Compensation::RefundPayment => Command::RefundPayment {
                reason: reason.to_owned(),
            },
        })
        .collect();
    changed(next, commands)
}

/// One compensation confirmed; once all are, the order is failed and the saga waits for
/// order-svc to confirm it.
fn confirm(saga: &Saga, compensation: Compensation) -> Outcome {
    if !saga.pending.contains(&compensation) {
        return Outcome::Ignored("compensation not pending");
    }
    let mut next = saga.clone();
    next.pending.remove(&compensation);
    if !next.pending.is_empty() {
        return changed(next, vec![]);
    }
    next.state = SagaState::Failing;
    let reason = next
        .failure_reason
        .clone()
        .unwrap_or_else(|| "saga failed".to_owned());
    changed(next, vec![Command::FailOrder { reason }])
}
