//! Property test of the pure transition function, against a model of the services.
//!
//! The model reacts to commands as the real services do (inventory reserves, commits and
//! releases; payment charges, voids and refunds; the client verifies), while proptest picks the
//! order in which everything is delivered, duplicates replies, and fires the deadline at any
//! moment. Whatever the schedule, once everything in flight has been delivered the saga has
//! ended, and its end matches the world: a completed order has its stock committed and its
//! payment taken; a failed one holds no stock and kept no money. order-svc confirms the
//! order's final status and may dead-letter a command (the step timer sends it again): the
//! saga ends only once its order is confirmed, with the status the saga reached.

use std::collections::VecDeque;

use orchestrator::saga::{apply, Command, Input, Line, OrderDetails, Outcome, Saga, SagaState};
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stock {
    None,
    Reserved,
    Committed,
    Released,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OrderStatus {
    Pending,
    PaymentInitiated,
    Completed,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Money {
    None,
    Awaiting,
    Succeeded,
    Declined,
    Voided,
    Refunded,
}

/// How the world behaves in one run.
#[derive(Clone, Debug)]
struct Scenario {
    in_stock: bool,
    approves: bool,
    reservation_expires: bool,
    actions: Vec<u8>,
}

struct World {
    scenario: Scenario,
    saga: Option<Saga>,
    deadline_armed: bool,
    inventory_commands: VecDeque<Command>,
    payment_commands: VecDeque<Command>,
    order_commands: VecDeque<Command>,
    inventory_replies: VecDeque<Input>,
    payment_replies: VecDeque<Input>,
    order_replies: VecDeque<Input>,
    delivered: Vec<Input>,
    stock: Stock,
    money: Money,
    sent: Vec<Command>,
    order: OrderStatus,
    failure_reason: String,
}

const ORDER: Uuid = Uuid::from_u128(0x1234);
const RESERVATION: Uuid = Uuid::from_u128(0x5678);
const PAYMENT: Uuid = Uuid::from_u128(0x9abc);

impl World {
    fn new(scenario: Scenario) -> Self {
        let mut world = World {
            scenario,
            saga: None,
            deadline_armed: false,
            inventory_commands: VecDeque::new(),
            payment_commands: VecDeque::new(),
            order_commands: VecDeque::new(),
            inventory_replies: VecDeque::new(),
            payment_replies: VecDeque::new(),
            order_replies: VecDeque::new(),
            delivered: Vec::new(),
            stock: Stock::None,
            money: Money::None,
            sent: Vec::new(),
            order: OrderStatus::Pending,
            failure_reason: String::new(),
        };
        world.deliver(Input::OrderCreated {
            order: OrderDetails {
                customer_id: "c-1".into(),
                lines: vec![Line {
                    sku: "SKU-MOUSE".into(),
                    quantity: 2,
                    unit_price_cents: 2900,
                }],
                total_cents: 5800,
                currency: "USD".into(),
                payment_method: "pm_card_visa".into(),
            },
        });
        world
    }

    fn deliver(&mut self, input: Input) {
        self.delivered.push(input.clone());
        let before = self.saga.as_ref().map(|s| s.state);
        match apply(self.saga.as_ref(), ORDER, &input) {
            Outcome::Ignored(_) => {}
            Outcome::Changed(t) => {
                if let Some(before) = before {
                    assert!(
                        !before.is_terminal(),
                        "a finished saga changed on {input:?}"
                    );
                }
                // The model's order-svc never contradicts the saga.
                assert_eq!(t.alert, None, "on {input:?}");
                // A saga ends only once order-svc has confirmed its order so.
                match t.saga.state {
                    SagaState::Completed => assert_eq!(self.order, OrderStatus::Completed),
                    SagaState::Failed => assert_eq!(self.order, OrderStatus::Failed),
                    _ => {}
                }
                for command in &t.commands {
                    self.route(command.clone());
                }
                self.saga = Some(t.saga);
            }
        }
    }

    fn route(&mut self, command: Command) {
        // Contradictions: never commit after releasing, never charge after voiding, never
        // complete and fail the same order.
        match &command {
            Command::CommitInventory => assert!(
                !self
                    .sent
                    .iter()
                    .any(|c| matches!(c, Command::ReleaseInventory { .. })),
                "commit after release: {:?}",
                self.sent
            ),
            Command::ChargePayment => assert!(
                !self.sent.iter().any(|c| matches!(
                    c,
                    Command::VoidPayment { .. } | Command::RefundPayment { .. }
                )),
                "charge after void or refund: {:?}",
                self.sent
            ),
            Command::CompleteOrder => assert!(
                !self
                    .sent
                    .iter()
                    .any(|c| matches!(c, Command::FailOrder { .. })),
                "complete after fail: {:?}",
                self.sent
            ),
            Command::FailOrder { .. } => assert!(
                !self
                    .sent
                    .iter()
                    .any(|c| matches!(c, Command::CompleteOrder)),
                "fail after complete: {:?}",
                self.sent
            ),
            _ => {}
        }
        self.sent.push(command.clone());
        match command {
            Command::ReserveInventory
            | Command::CommitInventory
            | Command::ReleaseInventory { .. } => self.inventory_commands.push_back(command),
            Command::ChargePayment
            | Command::VoidPayment { .. }
            | Command::RefundPayment { .. } => self.payment_commands.push_back(command),
            Command::MarkPaymentInitiated { .. }
            | Command::CompleteOrder
            | Command::FailOrder { .. } => self.order_commands.push_back(command),
            Command::StartDeadline => self.deadline_armed = true,
            Command::CancelDeadline => self.deadline_armed = false,
        }
    }

    /// The inventory service handling its next command, as inventory-svc does.
    fn inventory_step(&mut self) {
        let Some(command) = self.inventory_commands.pop_front() else {
            return;
        };
        let reply = match command {
            Command::ReserveInventory => match self.stock {
                Stock::None if self.scenario.in_stock => {
                    self.stock = Stock::Reserved;
                    Input::InventoryReserved {
                        reservation_id: RESERVATION,
                    }
                }
                Stock::Reserved | Stock::Committed => Input::InventoryReserved {
                    reservation_id: RESERVATION,
                },
                _ => Input::InventoryReservationFailed {
                    reason: "out of stock".into(),
                },
            },
            Command::CommitInventory => match self.stock {
                Stock::Reserved if self.scenario.reservation_expires => {
                    self.stock = Stock::Released;
                    Input::InventoryCommitFailed {
                        reason: "reservation expired".into(),
                    }
                }
                Stock::Reserved | Stock::Committed => {
                    self.stock = Stock::Committed;
                    Input::InventoryCommitted
                }
                _ => Input::InventoryCommitFailed {
                    reason: "no reservation".into(),
                },
            },
            Command::ReleaseInventory { .. } => {
                if matches!(self.stock, Stock::Reserved | Stock::None) {
                    // No reservation yet leaves a tombstone: a late reserve holds nothing.
                    self.stock = Stock::Released;
                }
                Input::InventoryReleased
            }
            other => unreachable!("{other:?} is not an inventory command"),
        };
        self.inventory_replies.push_back(reply);
    }

    /// The payment service handling its next command, as payment-svc does.
    fn payment_step(&mut self) {
        let Some(command) = self.payment_commands.pop_front() else {
            return;
        };
        let reply = match command {
            Command::ChargePayment => {
                if self.money == Money::None {
                    self.money = Money::Awaiting;
                }
                Input::PaymentInitiated {
                    payment_id: PAYMENT,
                }
            }
            Command::VoidPayment { .. } => {
                self.money = match self.money {
                    Money::Awaiting => Money::Voided,
                    Money::Succeeded => Money::Refunded,
                    other => other,
                };
                Input::PaymentVoided
            }
            Command::RefundPayment { .. } => {
                if self.money == Money::Succeeded {
                    self.money = Money::Refunded;
                }
                Input::PaymentRefunded
            }
            other => unreachable!("{other:?} is not a payment command"),
        };
        self.payment_replies.push_back(reply);
    }

    /// order-svc handling its next command, as order-svc does: statuses only move forward,
    /// and a final command is answered with the order's final status, whatever it is.
    fn order_step(&mut self) {
        let Some(command) = self.order_commands.pop_front() else {
            return;
        };
        let terminal = matches!(self.order, OrderStatus::Completed | OrderStatus::Failed);
        match command {
            Command::MarkPaymentInitiated { .. } => {
                if self.order == OrderStatus::Pending {
                    self.order = OrderStatus::PaymentInitiated;
                }
                return;
            }
            Command::CompleteOrder if !terminal => self.order = OrderStatus::Completed,
            Command::FailOrder { reason } if !terminal => {
                self.order = OrderStatus::Failed;
                self.failure_reason = reason;
            }
            Command::CompleteOrder | Command::FailOrder { .. } => {}
            other => unreachable!("{other:?} is not an order command"),
        }
        let reply = match self.order {
            OrderStatus::Completed => Input::OrderCompleted,
            _ => Input::OrderFailed {
                reason: self.failure_reason.clone(),
            },
        };
        self.order_replies.push_back(reply);
    }

    /// The client's `POST /payment/verify`: only an awaiting payment is decided.
    fn verify(&mut self) {
        if self.money != Money::Awaiting {
            return;
        }
        if self.scenario.approves {
            self.money = Money::Succeeded;
            self.payment_replies.push_back(Input::PaymentSucceeded {
                payment_id: PAYMENT,
            });
        } else {
            self.money = Money::Declined;
            self.payment_replies.push_back(Input::PaymentFailed {
                reason: "card_declined".into(),
            });
        }
    }

    fn fire_deadline(&mut self) {
        if self.deadline_armed {
            self.deadline_armed = false;
            self.deliver(Input::DeadlineExpired);
        }
    }

    fn act(&mut self, action: u8) {
        match action % 14 {
            0 => self.inventory_step(),
            1 => self.payment_step(),
            2 => {
                if let Some(r) = self.inventory_replies.pop_front() {
                    self.deliver(r)
                }
            }
            3 => {
                if let Some(r) = self.payment_replies.pop_front() {
                    self.deliver(r)
                }
            }
            4 | 5 => self.verify(),
            6 => self.fire_deadline(),
            // The step timer or an operator sends the current step again.
            8 => self.deliver(Input::StepTimedOut),
            9 => self.deliver(Input::Retry),
            10 => self.deliver(Input::Abort {
                reason: "operator".into(),
            }),
            11 => self.order_step(),
            12 => {
                if let Some(r) = self.order_replies.pop_front() {
                    self.deliver(r)
                }
            }
            13 => {
                // order-svc dead-letters a command: it has no effect and no answer.
                self.order_commands.pop_front();
            }
            _ => {
                // At-least-once delivery: an earlier reply arrives again.
                if let Some(again) = self
                    .delivered
                    .get(usize::from(action) % self.delivered.len().max(1))
                    .cloned()
                {
                    self.deliver(again)
                }
            }
        }
    }

    /// Delivers everything in flight; the client may never verify, so the deadline ends it,
    /// and a step whose command was lost is sent again by its timer.
    fn settle(&mut self) {
        for _ in 0..100 {
            let busy = !(self.inventory_commands.is_empty()
                && self.payment_commands.is_empty()
                && self.order_commands.is_empty()
                && self.inventory_replies.is_empty()
                && self.payment_replies.is_empty()
                && self.order_replies.is_empty());
            if !busy {
                if self.deadline_armed {
                    self.fire_deadline();
                    continue;
                }
                if self.saga.as_ref().is_some_and(|s| s.state.awaits_service()) {
                    self.deliver(Input::StepTimedOut);
                    continue;
                }
                return;
            }
            self.inventory_step();
            self.payment_step();
            self.order_step();
            if let Some(r) = self.inventory_replies.pop_front() {
                self.deliver(r)
            }
            if let Some(r) = self.payment_replies.pop_front() {
                self.deliver(r)
            }
            if let Some(r) = self.order_replies.pop_front() {
                self.deliver(r)
            }
        }
        panic!("the saga did not settle");
    }
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..60),
    )
        .prop_map(
            |(in_stock, approves, reservation_expires, actions)| Scenario {
                in_stock,
                approves,
                reservation_expires,
                actions,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_schedule_ends_consistently(scenario in scenario()) {
        let mut world = World::new(scenario.clone());
        for action in scenario.actions.clone() {
            world.act(action);
        }
        world.settle();
        let saga = world.saga.clone().expect("the saga started");
        prop_assert!(saga.state.is_terminal(), "ended in {:?}", saga.state);
        match saga.state {
            SagaState::Completed => {
                prop_assert_eq!(world.stock, Stock::Committed);
                prop_assert_eq!(world.money, Money::Succeeded);
                prop_assert_eq!(world.order, OrderStatus::Completed);
            }
            SagaState::Failed => {
                prop_assert!(matches!(world.stock, Stock::None | Stock::Released), "stock left {:?}", world.stock);
                prop_assert!(
                    matches!(world.money, Money::None | Money::Declined | Money::Voided | Money::Refunded),
                    "money left {:?}", world.money
                );
                prop_assert_eq!(world.order, OrderStatus::Failed);
                prop_assert_eq!(Some(&world.failure_reason), saga.failure_reason.as_ref());
            }
            other => prop_assert!(false, "not terminal: {other:?}"),
        }
        // A saga that could succeed and was verified in time does succeed.
        if scenario.in_stock && scenario.approves && !scenario.reservation_expires
            && world.delivered.iter().any(|i| matches!(i, Input::PaymentSucceeded { .. }))
            && !world.delivered.iter().any(|i| matches!(i, Input::DeadlineExpired | Input::Abort { .. }))
        {
            prop_assert_eq!(saga.state, SagaState::Completed);
        }
    }
}

#[test]
fn happy_path_sends_the_commands_in_order() {
    let mut world = World::new(Scenario {
        in_stock: true,
        approves: true,
        reservation_expires: false,
        actions: vec![],
    });
    world.inventory_step();
    world.act(2);
    world.payment_step();
    world.act(3);
    world.verify();
    world.act(3);
    world.inventory_step();
    world.act(2);
    // MarkPaymentInitiated (not answered), then CompleteOrder, confirmed.
    world.order_step();
    world.order_step();
    world.act(12);
    let names: Vec<String> = world
        .sent
        .iter()
        .map(|c| {
            format!("{c:?}")
                .split([' ', '{'])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "ReserveInventory",
            "StartDeadline",
            "ChargePayment",
            "MarkPaymentInitiated",
            "CancelDeadline",
            "CommitInventory",
            "CompleteOrder"
        ]
    );
    assert_eq!(world.saga.map(|s| s.state), Some(SagaState::Completed));
}

#[test]
fn an_order_confirmed_the_other_way_alerts_and_never_ends_the_saga() {
    let mut world = World::new(Scenario {
        in_stock: true,
        approves: true,
        reservation_expires: false,
        actions: vec![],
    });
    for action in [0, 2, 1, 3, 4, 3, 0, 2] {
        world.act(action);
    }
    let completing = world.saga.clone().expect("saga");
    assert_eq!(completing.state, SagaState::Completing);
    let failed = Input::OrderFailed {
        reason: "cancelled by support".into(),
    };
    let Outcome::Changed(t) = apply(Some(&completing), ORDER, &failed) else {
        panic!("a contradiction is recorded, not ignored");
    };
    assert_eq!(t.saga, completing, "nothing changes");
    assert!(t.commands.is_empty(), "nothing is sent");
    assert!(t.alert.is_some_and(|a| a.contains("cancelled by support")));
    // Sending the command again is all a retry does; only the confirmation asked for ends it.
    let Outcome::Changed(retried) = apply(Some(&completing), ORDER, &Input::Retry) else {
        panic!("retry");
    };
    assert_eq!(retried.commands, [Command::CompleteOrder]);
    let Outcome::Changed(done) = apply(Some(&completing), ORDER, &Input::OrderCompleted) else {
        panic!("confirmed");
    };
    assert_eq!(done.saga.state, SagaState::Completed);
}
