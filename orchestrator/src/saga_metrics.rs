//! What the sagas' transitions count: sagas started, completed and failed (by a bounded
//! reason), and the time spent in each step. Recorded once the transition's transaction has
//! committed ([`messaging::after_commit`]), so a step retried after a rollback counts once.

use std::time::Duration;

use telemetry::metric;

use crate::saga::SagaState;

/// The failure categories of `sagas_failed_total{reason}`, by the fixed beginning of the
/// reasons the state machine writes (`saga/transition.rs`); whatever follows (a service's
/// own words) is left out so that the label stays bounded.
const FAILURE_CATEGORIES: [(&str, &str); 6] = [
    (
        "inventory reservation failed",
        "inventory_reservation_failed",
    ),
    ("payment failed", "payment_declined"),
    (
        "payment not verified before the deadline",
        "payment_deadline",
    ),
    ("payment deadline passed", "payment_deadline"),
    ("inventory commit failed", "inventory_commit_failed"),
    ("aborted by an operator", "aborted_by_operator"),
];

/// The category of a saga's failure reason.
pub fn failure_category(reason: &str) -> &'static str {
    FAILURE_CATEGORIES
        .iter()
        .find(|(prefix, _)| reason.starts_with(prefix))
        .map_or("other", |(_, category)| category)
}

/// One transition, as the metrics see it.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The state before (`None`: the saga starts).
    pub from: Option<SagaState>,
    pub to: SagaState,
    /// How long the saga had been in `from`.
    pub time_in_from: Duration,
    /// The failure category, when the saga ends `FAILED`.
    pub failure: Option<&'static str>,
}

impl Observed {
    /// Whether the transition moves any metric (a step that stays in its state does not).
    pub fn counts(&self) -> bool {
        self.from != Some(self.to)
    }

    pub fn record(&self) {
        match self.from {
            None => metrics::counter!(metric::SAGAS_STARTED).increment(1),
            Some(from) if from != self.to => {
                metrics::histogram!(metric::SAGA_STEP_DURATION, "step" => from.as_str())
                    .record(self.time_in_from.as_secs_f64());
            }
            Some(_) => return,
        }
        match self.to {
            SagaState::Completed => metrics::counter!(metric::SAGAS_COMPLETED).increment(1),
            SagaState::Failed => metrics::counter!(
                metric::SAGAS_FAILED,
                "reason" => self.failure.unwrap_or("other"),
            )
            .increment(1),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::failure_category;
    use crate::saga::{apply, Input, Line, OrderDetails, Outcome, Saga, SagaState};

    /// The saga after `inputs`, from its `OrderCreated`.
    fn run(inputs: &[Input]) -> Saga {
        let id = Uuid::now_v7();
        let order = OrderDetails {
            customer_id: "c".into(),
            lines: vec![Line {
                sku: "SKU-MOUSE".into(),
                quantity: 1,
                unit_price_cents: 100,
            }],
            total_cents: 100,
            currency: "USD".into(),
            payment_method: "pm_card_visa".into(),
        };
        let mut saga = None;
        for input in std::iter::once(&Input::OrderCreated { order }).chain(inputs) {
            match apply(saga.as_ref(), id, input) {
                Outcome::Changed(t) => saga = Some(t.saga),
                Outcome::Ignored(why) => panic!("{} ignored: {why}", input.name()),
            }
        }
        saga.expect("a saga")
    }

    fn category_of(inputs: &[Input]) -> &'static str {
        let confirmed = Input::OrderFailed {
            reason: "confirmed".into(),
        };
        let saga = run(&[inputs, &[confirmed]].concat());
        assert_eq!(saga.state, SagaState::Failed, "{saga:?}");
        failure_category(saga.failure_reason.as_deref().expect("a reason"))
    }

    #[test]
    fn every_failure_of_the_state_machine_has_its_category() {
        let reserved = Input::InventoryReserved {
            reservation_id: Uuid::now_v7(),
        };
        let initiated = Input::PaymentInitiated {
            payment_id: Uuid::now_v7(),
        };
        let succeeded = Input::PaymentSucceeded {
            payment_id: Uuid::now_v7(),
        };
        assert_eq!(
            category_of(&[Input::InventoryReservationFailed {
                reason: "out of stock: SKU-MOUSE".into()
            }]),
            "inventory_reservation_failed"
        );
        assert_eq!(
            category_of(&[
                reserved.clone(),
                initiated.clone(),
                Input::PaymentFailed {
                    reason: "card declined".into()
                },
                Input::InventoryReleased,
            ]),
            "payment_declined"
        );
        assert_eq!(
            category_of(&[
                reserved.clone(),
                initiated.clone(),
                Input::DeadlineExpired,
                Input::PaymentVoided,
                Input::InventoryReleased,
            ]),
            "payment_deadline"
        );
        assert_eq!(
            category_of(&[Input::DeadlineExpired, Input::InventoryReleased]),
            "payment_deadline"
        );
        assert_eq!(
            category_of(&[
                reserved.clone(),
                initiated.clone(),
                succeeded,
                Input::InventoryCommitFailed {
                    reason: "reservation expired".into()
                },
                Input::PaymentRefunded,
                Input::InventoryReleased,
            ]),
            "inventory_commit_failed"
        );
        assert_eq!(
            category_of(&[
                Input::Abort {
                    reason: "customer called".into()
                },
                Input::InventoryReleased,
            ]),
            "aborted_by_operator"
        );
        assert_eq!(failure_category("something new"), "other");
    }
}
