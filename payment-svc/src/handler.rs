//! The commands of the saga on `payment.commands`, each applied in the consumer's inbox
//! transaction with its reply on `saga.replies`.
//!
//! Idempotent by state as well as by the inbox: a command sent again (a new message, say after
//! the orchestrator retried) finds the payment as the first one left it and replies the same.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use messaging::{Handler, HandlerError, InboxRows, Incoming, Outbox, OutboxRows, Prepared};
use prost::Name as _;
use proto::payment::v1 as pb;
use proto::topics::SAGA_REPLIES;
use sqlx::PgConnection;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::convert;
use crate::payment::{CustomerId, NewPayment, OrderId, Payment, PaymentId, PaymentStatus};
use crate::provider::{Decision, PaymentProvider};
use crate::store;

/// Currency of a charge that names none: the platform sells in US dollars.
const DEFAULT_CURRENCY: &str = "USD";

/// A command of `payment.commands`, decoded.
enum Command {
    Charge(pb::ChargePayment),
    Void(pb::VoidPayment),
    Refund(pb::RefundPayment),
}

impl Command {
    /// The order the command is about, as the command says it.
    fn order_id(&self) -> &str {
        match self {
            Self::Charge(c) => &c.order_id,
            Self::Void(c) => &c.order_id,
            Self::Refund(c) => &c.order_id,
        }
    }

    /// A message of a type not listed here is refused (and dead-lettered).
    fn decode(message: &Incoming) -> Result<Self, HandlerError> {
        Ok(match message.message_type() {
            t if t == pb::ChargePayment::full_name() => Self::Charge(message.decode()?),
            t if t == pb::VoidPayment::full_name() => Self::Void(message.decode()?),
            t if t == pb::RefundPayment::full_name() => Self::Refund(message.decode()?),
            _ => return Err(message.unknown_type()),
        })
    }
}

pub struct PaymentCommands {
    outbox: Outbox,
    provider: Arc<dyn PaymentProvider>,
    provider_timeout: Duration,
    /// The payments a batch's charges recorded in its first statement (or, for a batch taken
    /// alone, will record in its one statement), by message id, for `handle` to reply with.
    prepared: Prepared<Payment>,
    /// The charges of a batch taken alone ([`Handler::takes_alone`]), each with its message's
    /// id and the payment id it gets, recorded by `flush_alone`.
    alone: Mutex<Option<Vec<(Uuid, PaymentId, NewPayment)>>>,
}

impl PaymentCommands {
    pub fn new(
        outbox: Outbox,
        provider: Arc<dyn PaymentProvider>,
        provider_timeout: Duration,
    ) -> Self {
        Self {
            outbox,
            provider,
            provider_timeout,
            prepared: Prepared::default(),
            alone: Mutex::default(),
        }
    }

    fn alone(&self) -> std::sync::MutexGuard<'_, Option<Vec<(Uuid, PaymentId, NewPayment)>>> {
        self.alone.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn reply<M: prost::Message + prost::Name>(
        &self,
        conn: &mut PgConnection,
        message: &Incoming,
        order_id: OrderId,
        reply: &M,
    ) -> Result<(), HandlerError> {
        let out = self
            .outbox
            .message(SAGA_REPLIES, order_id.0, reply, &message.context());
        self.outbox.enqueue(conn, &[out]).await?;
        Ok(())
    }

    /// The payment a ChargePayment records, or why the command can never be applied.
    fn new_payment(
        &self,
        command: pb::ChargePayment,
        message: &Incoming,
    ) -> Result<NewPayment, HandlerError> {
        let order_id = order_id(&command.order_id)?;
        if command.amount_cents < 0 {
            return Err(HandlerError::Permanent(format!(
                "ChargePayment for order {order_id}: amount_cents must not be negative, got {}",
                command.amount_cents
            )));
        }
        // Empty from an orchestrator older than the field: the payment's customer is unknown.
        let customer_id = CustomerId::parse(&command.customer_id).map_err(|problem| {
            HandlerError::Permanent(format!(
                "ChargePayment for order {order_id}: customer_id {problem}"
            ))
        })?;
        let (status, decline_reason) = match self.provider.check_method(&command.payment_method) {
            Ok(()) => (PaymentStatus::AwaitingVerification, None),
            Err(reason) => (PaymentStatus::Declined, Some(reason)),
        };
        let currency = if command.currency.is_empty() {
            DEFAULT_CURRENCY.to_owned()
        } else {
            command.currency
        };
        Ok(NewPayment {
            order_id,
            amount_cents: command.amount_cents,
            currency,
            payment_method: command.payment_method,
            status,
            decline_reason,
            correlation_id: message.envelope.correlation_id.clone(),
            traceparent: message.envelope.traceparent.clone(),
            customer_id,
        })
    }

    /// Records a payment awaiting verification, or a declined one when the provider refuses
    /// the method. Sent again, it replies as the recorded payment stands. After a compensation
    /// of the order (its tombstone), it records nothing and replies that the payment failed.
    async fn charge(
        &self,
        conn: &mut PgConnection,
        command: pb::ChargePayment,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        // Recorded by the batch's first statement, or now.
        let (payment, created) = match self.prepared.take(message) {
            Some(payment) => (payment, true),
            None => store::insert(conn, &self.new_payment(command, message)?).await?,
        };
        let order_id = payment.order_id;
        if payment.tombstone {
            // A compensation came first: the saga has given this order up, so nothing may be
            // charged. A failure is what the saga's every state can take: while charging it
            // compensates, once compensating or failed it ignores it.
            let compensated = payment.decline_reason.as_deref().unwrap_or_default();
            tracing::warn!(%order_id, compensated, "ChargePayment after the order's payment was voided: refused");
            let reply = pb::PaymentFailed {
                order_id: order_id.to_string(),
                payment_id: String::new(),
                reason: format!(
                    "the order's payment was voided before it was charged ({compensated}); nothing was charged"
                ),
            };
            return self.reply(conn, message, order_id, &reply).await;
        }
        if created {
            tracing::debug!(
                %order_id,
                payment_id = %payment.payment_id,
                status = %payment.status,
                correlation_id = %payment.correlation_id,
                "payment recorded"
            );
        } else {
            tracing::debug!(%order_id, payment_id = %payment.payment_id, "ChargePayment again: replying as before");
        }
        if payment.status == PaymentStatus::Declined {
            self.reply(conn, message, order_id, &convert::payment_failed(&payment))
                .await
        } else {
            let reply = pb::PaymentInitiated {
                order_id: order_id.to_string(),
                payment_id: payment.payment_id.to_string(),
            };
            self.reply(conn, message, order_id, &reply).await
        }
    }

    /// Applies a compensation (`next` maps the current status to the new one) to the order's
    /// payment. Returns the payment id and final status, or `None` when the order has none; then
    /// a tombstone is recorded, so that a charge arriving later takes nothing.
    async fn compensate(
        &self,
        conn: &mut PgConnection,
        order_id: OrderId,
        what: &str,
        reason: &str,
        next: fn(PaymentStatus) -> PaymentStatus,
    ) -> Result<Option<Payment>, HandlerError> {
        // Twice at most: if the tombstone loses to a charge committed meanwhile, that payment
        // is there to compensate on the second pass.
        let mut locked = None;
        for _ in 0..2 {
            if let Some(payment) = store::lock_by_order(conn, order_id).await? {
                locked = Some(payment);
                break;
            }
            let tombstone = if reason.trim().is_empty() {
                what
            } else {
                reason
            };
            if store::insert_tombstone(conn, order_id, tombstone).await? {
                tracing::warn!(%order_id, reason, "{what}: the order has no payment; a later charge will be refused");
                return Ok(None);
            }
        }
        let Some(payment) = locked else {
            return Err(HandlerError::Transient(format!(
                "payment of order {order_id} neither found nor insertable"
            )));
        };
        if payment.tombstone {
            tracing::debug!(%order_id, reason, "{what}: the order has no payment");
            return Ok(None);
        }
        let (settled, decline_reason) = self.settle_attempt(&payment).await?;
        let status = next(settled);
        if status == payment.status {
            tracing::debug!(%order_id, payment_id = %payment.payment_id, %status, reason, "{what}: nothing to change");
            return Ok(Some(payment));
        }
        let updated =
            store::set_status(conn, payment.payment_id, status, decline_reason.as_deref()).await?;
        tracing::debug!(
            %order_id,
            payment_id = %payment.payment_id,
            from = %payment.status,
            to = %status,
            reason,
            "{what}"
        );
        Ok(Some(updated))
    }

    /// The status of a payment once its verification attempt, if one was made and never
    /// recorded (its answer lost, or still on its way), is settled: the provider is asked again
    /// with the attempt's idempotency key, which answers as before and charges nothing more. So
    /// a compensation knows whether money was taken. Only such payments wait on the provider,
    /// for at most its timeout; a timeout is transient, and the command is retried.
    async fn settle_attempt(
        &self,
        payment: &Payment,
    ) -> Result<(PaymentStatus, Option<String>), HandlerError> {
        let (PaymentStatus::AwaitingVerification, Some(key)) =
            (payment.status, payment.attempt_key)
        else {
            return Ok((payment.status, None));
        };
        let decision = tokio::time::timeout(
            self.provider_timeout,
            self.provider.verify(payment, &key.to_string()),
        )
        .await
        .map_err(|_| {
            HandlerError::Transient(format!(
                "the payment provider did not settle attempt {key} of payment {} within {} ms",
                payment.payment_id,
                self.provider_timeout.as_millis()
            ))
        })?;
        tracing::debug!(payment_id = %payment.payment_id, attempt = %key, ?decision, "open verification attempt settled");
        Ok(match decision {
            Decision::Approved => (PaymentStatus::Succeeded, None),
            Decision::Declined { reason } => (PaymentStatus::Declined, Some(reason)),
        })
    }

    async fn void(
        &self,
        conn: &mut PgConnection,
        command: pb::VoidPayment,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let order_id = order_id(&command.order_id)?;
        let payment = self
            .compensate(
                conn,
                order_id,
                "payment voided",
                &command.reason,
                PaymentStatus::voided,
            )
            .await?;
        let (payment_id, status) = convert::id_and_status(payment.as_ref());
        let reply = pb::PaymentVoided {
            order_id: order_id.to_string(),
            payment_id,
            status: status.into(),
        };
        self.reply(conn, message, order_id, &reply).await
    }

    async fn refund(
        &self,
        conn: &mut PgConnection,
        command: pb::RefundPayment,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let order_id = order_id(&command.order_id)?;
        let payment = self
            .compensate(
                conn,
                order_id,
                "payment refunded",
                &command.reason,
                PaymentStatus::refunded,
            )
            .await?;
        let (payment_id, status) = convert::id_and_status(payment.as_ref());
        let reply = pb::PaymentRefunded {
            order_id: order_id.to_string(),
            payment_id,
            status: status.into(),
        };
        self.reply(conn, message, order_id, &reply).await
    }
}

fn order_id(value: &str) -> Result<OrderId, HandlerError> {
    Uuid::parse_str(value)
        .map(OrderId)
        .map_err(|_| HandlerError::Permanent(format!("order_id {value:?} is not a valid UUID")))
}

#[async_trait]
impl Handler for PaymentCommands {
    /// Records the batch's charges in the statement that records its inbox rows, the first
    /// command of each order when it is a charge (any other, and a second command of an order,
    /// is applied by `handle` in the batch's order).
    async fn prepare_recording(
        &self,
        conn: &mut PgConnection,
        messages: &[&Incoming],
        inbox: &InboxRows<'_>,
    ) -> Result<Option<HashSet<Uuid>>, HandlerError> {
        self.prepared.clear();
        *self.alone() = None;
        // A message that does not decode, or a charge that can never be applied, is refused by
        // `handle`, with its error.
        let first = messaging::first_of_each(messages, |m| {
            let command = Command::decode(m).ok()?;
            Some((command.order_id().to_owned(), command))
        });
        let charges: Vec<(Uuid, NewPayment)> = first
            .into_iter()
            .filter_map(|(message, command)| match command {
                Command::Charge(charge) => Some((
                    message.message_id().ok()?,
                    self.new_payment(charge, message).ok()?,
                )),
                _ => None,
            })
            .collect();
        let (fresh, inserted) = store::record_and_insert_all(conn, inbox, &charges).await?;
        let by_order: HashMap<Uuid, Uuid> = charges
            .iter()
            .map(|(id, new)| (new.order_id.0, *id))
            .collect();
        self.prepared.set(
            inserted
                .into_iter()
                .filter_map(|payment| by_order.get(&payment.order_id.0).map(|id| (*id, payment))),
        );
        Ok(Some(fresh))
    }

    /// Takes a batch alone when it is charges only, of different orders, each one that can be
    /// applied: its replies are known before its statement runs (the payment ids are made
    /// here), so the charges, the inbox rows and the replies are one statement. A charge of an
    /// order that has a payment already makes that statement refuse the batch, and the
    /// transaction replies as that payment stands.
    fn takes_alone(&self, messages: &[&Incoming]) -> bool {
        let mut orders = HashSet::with_capacity(messages.len());
        let mut charges = Vec::with_capacity(messages.len());
        for message in messages {
            let (Ok(id), Ok(Command::Charge(charge))) =
                (message.message_id(), Command::decode(message))
            else {
                return false;
            };
            let Ok(new) = self.new_payment(charge, message) else {
                return false;
            };
            if !orders.insert(new.order_id) {
                return false;
            }
            charges.push((id, PaymentId(Uuid::now_v7()), new));
        }
        self.prepared.set(
            charges
                .iter()
                .map(|(message, payment_id, new)| (*message, new.recorded_as(*payment_id))),
        );
        *self.alone() = Some(charges);
        true
    }

    async fn flush(&self, _conn: &mut PgConnection) -> Result<(), HandlerError> {
        self.prepared.clear();
        Ok(())
    }

    /// Records the charges of the batch taken alone with its inbox rows and replies.
    async fn flush_alone(
        &self,
        conn: &mut PgConnection,
        inbox: &InboxRows<'_>,
    ) -> Result<(), HandlerError> {
        self.prepared.clear();
        let Some(alone) = self.alone().take() else {
            return Err(HandlerError::Transient("no batch taken alone".to_owned()));
        };
        let replies = messaging::outbox::take_held();
        let earlier =
            store::charge_all_alone(conn, inbox, &alone, &OutboxRows::new(&replies)?).await?;
        self.outbox.recorded_held(conn, replies, earlier).await?;
        Ok(())
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let order_id = &message.envelope.saga_id;
        match Command::decode(message)? {
            Command::Charge(command) => {
                let span = tracing::info_span!("payment.charge", %order_id);
                self.charge(conn, command, message).instrument(span).await
            }
            Command::Void(command) => {
                let span = tracing::info_span!("payment.void", %order_id);
                self.void(conn, command, message).instrument(span).await
            }
            Command::Refund(command) => {
                let span = tracing::info_span!("payment.refund", %order_id);
                self.refund(conn, command, message).instrument(span).await
            }
        }
    }
}
