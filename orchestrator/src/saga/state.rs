use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where a saga stands. Operators see these names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaState {
    /// `ReserveInventory` sent.
    Reserving,
    /// Stock reserved; `ChargePayment` sent.
    Charging,
    /// Payment recorded; waiting for the client to verify it before the deadline.
    AwaitingVerification,
    /// Payment succeeded; `CommitInventory` sent.
    Committing,
    /// Compensations sent; waiting until every one is confirmed.
    Compensating,
    /// Stock committed and payment taken; `CompleteOrder` sent, waiting for order-svc to
    /// confirm the order `COMPLETED`.
    Completing,
    /// Nothing held any more; `FailOrder` sent, waiting for order-svc to confirm the order
    /// `FAILED`.
    Failing,
    Completed,
    Failed,
}

impl SagaState {
    pub const ALL: [SagaState; 9] = [
        SagaState::Reserving,
        SagaState::Charging,
        SagaState::AwaitingVerification,
        SagaState::Committing,
        SagaState::Compensating,
        SagaState::Completing,
        SagaState::Failing,
        SagaState::Completed,
        SagaState::Failed,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, SagaState::Completed | SagaState::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Reserving => "RESERVING",
            SagaState::Charging => "CHARGING",
            SagaState::AwaitingVerification => "AWAITING_VERIFICATION",
            SagaState::Committing => "COMMITTING",
            SagaState::Compensating => "COMPENSATING",
            SagaState::Completing => "COMPLETING",
            SagaState::Failing => "FAILING",
            SagaState::Completed => "COMPLETED",
            SagaState::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<SagaState> {
        SagaState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compensation sent and not yet confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compensation {
    ReleaseInventory,
    VoidPayment,
    RefundPayment,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
}

/// What the saga knows of its order, from `OrderCreated`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderDetails {
    pub customer_id: String,
    pub lines: Vec<Line>,
    pub total_cents: i64,
    pub currency: String,
    pub payment_method: String,
}

/// The whole state of one saga, stored as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    pub order_id: Uuid,
    pub state: SagaState,
    pub order: OrderDetails,
    pub reservation_id: Option<Uuid>,
    pub payment_id: Option<Uuid>,
    /// Why the saga is failing or failed; set when compensation starts.
    pub failure_reason: Option<String>,
    /// Compensations sent and not yet confirmed (while `Compensating`).
    pub pending: BTreeSet<Compensation>,
    /// How many times the current step's commands were sent again (by its timer or an
    /// operator); 0 when the step starts.
    #[serde(default)]
    pub attempts: u32,
}

impl SagaState {
    /// States waiting on a service's reply, which a step timer watches.
    pub fn awaits_service(self) -> bool {
        matches!(
            self,
            SagaState::Reserving
                | SagaState::Charging
                | SagaState::Committing
                | SagaState::Compensating
                | SagaState::Completing
                | SagaState::Failing
        )
    }
}
