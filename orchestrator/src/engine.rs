//! Runs the state machine against the store: load, apply, save with the history, timers and
//! outgoing commands, all in the caller's transaction.

use messaging::{HandlerError, InboxRows, MessageContext, Outbox, OutboxMessage, OutboxRows};
use proto::inventory::v1 as inventory;
use proto::order::v1 as order;
use proto::payment::v1 as payment;
use proto::topics;
use sqlx::PgConnection;
use uuid::Uuid;

use telemetry::propagation::{self, TraceContext};
use tracing::Instrument as _;

use crate::saga::{self, Command, Input, Outcome, Saga, SagaState, Transition};
use crate::saga_metrics::{self, Observed};
use crate::store::{
    self, Bookkeeping, Cause, OperatorFlag, Origin, SagaWrite, StoreError, StoredSaga,
};

/// What caused a step: a message, or a timer.
#[derive(Clone, Debug)]
pub struct Trigger {
    pub message_id: String,
    pub message_type: String,
    /// The context of the causing message, if any; a timer has none and sends with the
    /// saga's own.
    pub context: Option<MessageContext>,
}

/// The engine's policy for sagas whose services do not answer.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Time the client has to verify the payment.
    pub payment_deadline: std::time::Duration,
    /// Time a service has to answer a step before its command is sent again; doubled at every
    /// attempt, up to [`MAX_STEP_DELAY`].
    pub step_timeout: std::time::Duration,
    /// Attempts of one step after which the saga is flagged as needing an operator (it keeps
    /// retrying: compensations are retried until they succeed).
    pub step_max_attempts: u32,
}

/// The longest wait between two attempts of a step.
pub const MAX_STEP_DELAY: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Clone)]
pub struct Engine {
    outbox: Outbox,
    timing: Timing,
}

impl Engine {
    pub fn new(outbox: Outbox, timing: Timing) -> Self {
        Self { outbox, timing }
    }

    /// To call once a transaction that stepped sagas has committed: wakes the relay for the
    /// commands it sent.
    pub fn committed(&self) {
        self.outbox.committed();
    }

    /// Bookkeeping of a saga after `input` caused `transition`.
    fn bookkeeping(&self, transition: &Transition, input: &Input) -> Bookkeeping {
        let next = &transition.saga;
        let chrono =
            |d: std::time::Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        let step_timer = next.state.awaits_service().then(|| {
            let factor = 2u32.saturating_pow(next.attempts.min(16));
            chrono(
                self.timing
                    .step_timeout
                    .saturating_mul(factor)
                    .min(MAX_STEP_DELAY),
            )
        });
        // A flag is only cleared by what answers it: an operator's request, or the saga's end.
        // Any other transition leaves it, whoever raised it (a dead letter, a failing timer).
        let operator_flag = match input {
            _ if next.state.is_terminal() => OperatorFlag::Clear,
            _ if transition.alert.is_some() => {
                OperatorFlag::Raise(transition.alert.clone().unwrap_or_default())
            }
            Input::Retry | Input::Abort { .. } => OperatorFlag::Clear,
            Input::StepTimedOut if next.attempts >= self.timing.step_max_attempts => {
                OperatorFlag::Raise(format!(
                    "step {} not answered after {} attempts; still retrying",
                    next.state, next.attempts
                ))
            }
            _ => OperatorFlag::Keep,
        };
        Bookkeeping {
            deadline: chrono(self.timing.payment_deadline),
            step_timer,
            operator_flag,
        }
    }

    /// Applies `input` to the saga of `order_id`. Returns the saga after the step, or `None`
    /// when the input was ignored.
    pub async fn step(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        input: &Input,
        trigger: &Trigger,
    ) -> Result<Option<Saga>, HandlerError> {
        Ok(self.try_step(conn, order_id, input, trigger).await?.ok())
    }

    /// Like [`Engine::step`], but says why an input was ignored (for operators' requests).
    pub async fn try_step(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        input: &Input,
        trigger: &Trigger,
    ) -> Result<Result<Saga, &'static str>, HandlerError> {
        let stored = self.load(conn, order_id).await?;
        match self
            .step_unsaved(conn, order_id, input, trigger, stored)
            .await?
        {
            Ok(write) => {
                self.save_all(conn, std::slice::from_ref(&write)).await?;
                Ok(Ok(write.next))
            }
            Err(why) => Ok(Err(why)),
        }
    }

    /// Applies `input` to `stored`, the saga of `order_id` as read in this transaction
    /// (`None`: it has none yet), and enqueues the commands it sends, but leaves the saga to
    /// save: the caller saves it (with others, [`Engine::save_all`]) before its transaction
    /// commits. `Err`: the input was ignored, and why.
    pub async fn step_unsaved(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        input: &Input,
        trigger: &Trigger,
        stored: Option<StoredSaga>,
    ) -> Result<Result<SagaWrite, &'static str>, HandlerError> {
        let span = transition_span(order_id, input, stored.as_ref(), trigger);
        let transition = self
            .transition(conn, order_id, input, trigger, stored)
            .instrument(span)
            .await?;
        if let Err(why) = &transition {
            tracing::debug!(%order_id, input = input.name(), why, "input ignored");
        }
        Ok(transition)
    }

    /// Saves transitions of distinct sagas made by [`Engine::step_unsaved`], in one statement,
    /// with the commands a consumer's batch holds so far ([`messaging::outbox::take_held`]).
    pub async fn save_all(
        &self,
        conn: &mut PgConnection,
        writes: &[SagaWrite],
    ) -> Result<(), HandlerError> {
        self.save(conn, writes, None).await
    }

    /// Like [`Engine::save_all`], for a consumer batch taken alone
    /// ([`messaging::Handler::takes_alone`]): on a connection with no transaction, one step a
    /// message of `inbox` (the batch's inbox rows, recorded by the same statement), all
    /// written or none ([`store::save_all`]).
    pub async fn save_all_alone(
        &self,
        conn: &mut PgConnection,
        writes: &[SagaWrite],
        inbox: &InboxRows<'_>,
    ) -> Result<(), HandlerError> {
        self.save(conn, writes, Some(inbox)).await
    }

    async fn save(
        &self,
        conn: &mut PgConnection,
        writes: &[SagaWrite],
        alone: Option<&InboxRows<'_>>,
    ) -> Result<(), HandlerError> {
        if writes.is_empty() {
            return Ok(());
        }
        let commands = messaging::outbox::take_held();
        let earlier = store::save_all(conn, writes, &OutboxRows::new(&commands)?, alone)
            .await
            .map_err(store_error)?;
        self.outbox.recorded_held(conn, commands, earlier).await?;
        Ok(())
    }

    /// Reads the sagas of `order_ids` for [`Engine::step_unsaved`], in the statement that
    /// records a consumer batch's inbox rows; returns the ids recorded now too.
    pub async fn record_and_load_many(
        &self,
        conn: &mut PgConnection,
        inbox: &InboxRows<'_>,
        order_ids: &[Uuid],
    ) -> Result<
        (
            std::collections::HashSet<Uuid>,
            std::collections::HashMap<Uuid, StoredSaga>,
        ),
        HandlerError,
    > {
        store::record_and_load_many(conn, inbox, order_ids)
            .await
            .map_err(store_error)
    }

    /// Reads the saga of `order_id`, for [`Engine::step_unsaved`].
    pub async fn load(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
    ) -> Result<Option<StoredSaga>, HandlerError> {
        store::load(conn, order_id).await.map_err(store_error)
    }

    /// Applies `input` to the loaded saga and enqueues its commands, in the `saga.transition`
    /// span; returns what to save.
    async fn transition(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        input: &Input,
        trigger: &Trigger,
        stored: Option<StoredSaga>,
    ) -> Result<Result<SagaWrite, &'static str>, HandlerError> {
        let transition = match saga::apply(stored.as_ref().map(|s| &s.saga), order_id, input) {
            Outcome::Changed(t) => t,
            Outcome::Ignored(why) => {
                tracing::Span::current().record("to", "-");
                return Ok(Err(why));
            }
        };
        let incoming = trigger.context.clone().unwrap_or_default();
        let origin = match &stored {
            Some(s) => Origin {
                correlation_id: s.correlation_id.clone(),
                traceparent: s.traceparent.clone(),
                tracestate: s.tracestate.clone(),
            },
            None => Origin {
                correlation_id: incoming.correlation_id.clone(),
                traceparent: incoming.traceparent.clone(),
                tracestate: incoming.tracestate.clone(),
            },
        };
        let context = MessageContext {
            correlation_id: origin.correlation_id.clone(),
            causation_id: trigger.message_id.clone(),
            traceparent: non_empty_or(&incoming.traceparent, &origin.traceparent),
            tracestate: non_empty_or(&incoming.tracestate, &origin.tracestate),
        };
        let messages: Vec<OutboxMessage> = transition
            .commands
            .iter()
            .filter_map(|command| self.message(&transition.saga, command, &context))
            .collect();
        self.outbox.enqueue(conn, &messages).await?;
        let observed = Observed {
            from: stored.as_ref().map(|s| s.saga.state),
            to: transition.saga.state,
            time_in_from: stored
                .as_ref()
                .and_then(|s| (chrono::Utc::now() - s.updated_at).to_std().ok())
                .unwrap_or_default(),
            failure: (transition.saga.state == SagaState::Failed).then(|| {
                saga_metrics::failure_category(
                    transition
                        .saga
                        .failure_reason
                        .as_deref()
                        .unwrap_or_default(),
                )
            }),
        };
        if observed.counts() {
            messaging::after_commit(move || observed.record());
        }
        tracing::Span::current().record("to", transition.saga.state.as_str());
        let from = stored
            .as_ref()
            .map(|s| s.saga.state.as_str())
            .unwrap_or("-");
        let to = transition.saga.state.as_str();
        // The saga's start and end at info, every step between at debug: default settings
        // write two lines per saga here, not one per message.
        if stored.is_none() || transition.saga.state.is_terminal() {
            tracing::info!(%order_id, from, to, input = input.name(), correlation_id = %context.correlation_id, "saga transition");
        } else {
            tracing::debug!(%order_id, from, to, input = input.name(), correlation_id = %context.correlation_id, "saga transition");
        }
        let bookkeeping = self.bookkeeping(&transition, input);
        Ok(Ok(SagaWrite {
            previous: stored.as_ref().map(|s| (s.version, s.saga.state)),
            next: transition.saga,
            commands: transition.commands,
            cause: Cause {
                input: input.name(),
                message_id: trigger.message_id.clone(),
                message_type: trigger.message_type.clone(),
                correlation_id: context.correlation_id,
            },
            origin,
            bookkeeping,
        }))
    }

    /// The Kafka message of a command; timer commands have none.
    fn message(
        &self,
        saga: &Saga,
        command: &Command,
        context: &MessageContext,
    ) -> Option<OutboxMessage> {
        let id = saga.order_id;
        let order_id = id.to_string();
        let message = match command {
            Command::ReserveInventory => self.outbox.message(
                topics::INVENTORY_COMMANDS,
                id,
                &inventory::ReserveInventory {
                    order_id,
                    lines: saga
                        .order
                        .lines
                        .iter()
                        .map(|l| inventory::ReservationLine {
                            sku: l.sku.clone(),
                            quantity: l.quantity,
                        })
                        .collect(),
                },
                context,
            ),
            Command::CommitInventory => self.outbox.message(
                topics::INVENTORY_COMMANDS,
                id,
                &inventory::CommitInventory { order_id },
                context,
            ),
            Command::ReleaseInventory { reason } => self.outbox.message(
                topics::INVENTORY_COMMANDS,
                id,
                &inventory::ReleaseInventory {
                    order_id,
                    reason: reason.clone(),
                },
                context,
            ),
            Command::ChargePayment => self.outbox.message(
                topics::PAYMENT_COMMANDS,
                id,
                &payment::ChargePayment {
                    order_id,
                    amount_cents: saga.order.total_cents,
                    currency: saga.order.currency.clone(),
                    payment_method: saga.order.payment_method.clone(),
                    customer_id: saga.order.customer_id.clone(),
                },
                context,
            ),
            Command::VoidPayment { reason } => self.outbox.message(
                topics::PAYMENT_COMMANDS,
                id,
                &payment::VoidPayment {
                    order_id,
                    reason: reason.clone(),
                },
                context,
            ),
            Command::RefundPayment { reason } => self.outbox.message(
                topics::PAYMENT_COMMANDS,
                id,
                &payment::RefundPayment {
                    order_id,
                    reason: reason.clone(),
                },
                context,
            ),
            Command::MarkPaymentInitiated { payment_id } => self.outbox.message(
                topics::ORDER_COMMANDS,
                id,
                &order::MarkPaymentInitiated {
                    order_id,
                    payment_id: payment_id.to_string(),
                },
                context,
            ),
            Command::CompleteOrder => self.outbox.message(
                topics::ORDER_COMMANDS,
                id,
                &order::CompleteOrder { order_id },
                context,
            ),
            Command::FailOrder { reason } => self.outbox.message(
                topics::ORDER_COMMANDS,
                id,
                &order::FailOrder {
                    order_id,
                    reason: reason.clone(),
                },
                context,
            ),
            Command::StartDeadline | Command::CancelDeadline => return None,
        };
        Some(message)
    }
}

/// The span of one step: `saga.transition` with the order, the input and the states. A step
/// caused by a message is a child of the message's span; one caused by a timer (no span of its
/// own) or an operator (a request of another trace) continues the saga's trace, linked to the
/// operator's request.
fn transition_span(
    order_id: Uuid,
    input: &Input,
    stored: Option<&StoredSaga>,
    trigger: &Trigger,
) -> tracing::Span {
    let correlation_id = match (stored, &trigger.context) {
        (Some(s), _) if !s.correlation_id.is_empty() => s.correlation_id.as_str(),
        (_, Some(context)) => context.correlation_id.as_str(),
        _ => "",
    };
    let span = tracing::info_span!(
        "saga.transition",
        %order_id,
        input = input.name(),
        from = stored.map_or("-", |s| s.saga.state.as_str()),
        to = tracing::field::Empty,
        %correlation_id,
    );
    if let Some(stored) = stored.filter(|_| propagation::enabled()) {
        let saga_trace = propagation::remote_span_context(&stored.traceparent, &stored.tracestate);
        let current = TraceContext::current().and_then(|c| c.span_context());
        let same_trace = matches!((&saga_trace, &current), (Some(saga), Some(current)) if saga.trace_id() == current.trace_id());
        if saga_trace.is_some() && !same_trace {
            propagation::set_parent(&span, &stored.traceparent, &stored.tracestate);
            if let Some(current) = current {
                propagation::add_link(&span, current);
            }
        }
    }
    span
}

fn non_empty_or(first: &str, second: &str) -> String {
    if first.is_empty() { second } else { first }.to_owned()
}

fn store_error(e: StoreError) -> HandlerError {
    match e {
        // Retried from the read, which then sees the other writer's result.
        StoreError::Conflict(_) => HandlerError::Transient(e.to_string()),
        StoreError::Corrupt { .. } => HandlerError::Permanent(e.to_string()),
        StoreError::Database(db) => db.into(),
    }
}
