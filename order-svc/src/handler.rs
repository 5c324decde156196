//! The saga's commands to order-svc, from `order.commands`.

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use messaging::{Handler, HandlerError, InboxRows, Incoming, Outbox, OutboxRows, Prepared};
use prost::Name as _;
use proto::order::v1::{
    CompleteOrder, FailOrder, MarkPaymentInitiated, OrderCompleted, OrderFailed,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{OrderCommand, OrderId, OrderStatus, PaymentId};
use crate::store::{self, Applied};

/// Moves orders through their statuses. Idempotent by state: statuses only move forward, so a
/// repeated, late or overtaken command changes nothing and is not an error.
///
/// `CompleteOrder` and `FailOrder` are answered on `saga.replies` with the order's final
/// status (`OrderCompleted`, `OrderFailed`), in the same transaction, whether the command
/// moved the order or found it there: the saga ends only once its order is confirmed, and
/// sends the command again until it is.
#[derive(Debug)]
pub struct OrderCommands {
    outbox: Outbox,
    /// The batch's commands applied by its first statement (or, for a batch taken alone, to
    /// be applied by its one statement): whether each moved its order.
    prepared: Prepared<bool>,
    /// The commands of a batch taken alone ([`Handler::takes_alone`]), each with its
    /// message's id and its order, applied by `flush_alone`.
    alone: Mutex<Option<Vec<(Uuid, OrderId, OrderCommand)>>>,
}

impl OrderCommands {
    pub fn new(outbox: Outbox) -> Self {
        Self {
            outbox,
            prepared: Prepared::default(),
            alone: Mutex::default(),
        }
    }

    fn alone(&self) -> std::sync::MutexGuard<'_, Option<Vec<(Uuid, OrderId, OrderCommand)>>> {
        self.alone.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Confirms the order's final status to the saga; a status that is not final (a
    /// `MarkPaymentInitiated`) is not answered.
    async fn confirm(
        &self,
        conn: &mut PgConnection,
        order_id: OrderId,
        status: OrderStatus,
        failure_reason: Option<String>,
        cause: &Incoming,
    ) -> Result<(), HandlerError> {
        let id = order_id.0.to_string();
        let topic = proto::topics::SAGA_REPLIES;
        let context = cause.context();
        let reply = match status {
            OrderStatus::Completed => self.outbox.message(
                topic,
                order_id.0,
                &OrderCompleted { order_id: id },
                &context,
            ),
            OrderStatus::Failed => self.outbox.message(
                topic,
                order_id.0,
                &OrderFailed {
                    order_id: id,
                    reason: failure_reason.unwrap_or_default(),
                },
                &context,
            ),
            OrderStatus::Pending | OrderStatus::PaymentInitiated => return Ok(()),
        };
        self.outbox.enqueue(conn, &[reply]).await?;
        Ok(())
    }
}

#[async_trait]
impl Handler for OrderCommands {
    /// Applies the batch's commands in the statement that records its inbox rows, the first
    /// of each order (a second command of one order in the batch is applied by `handle`, after
    /// the first).
    async fn prepare_recording(
        &self,
        conn: &mut PgConnection,
        messages: &[&Incoming],
        inbox: &InboxRows<'_>,
    ) -> Result<Option<HashSet<Uuid>>, HandlerError> {
        self.prepared.clear();
        *self.alone() = None;
        // A message that does not decode is refused by `handle`, with its error.
        let commands: Vec<(Uuid, OrderId, OrderCommand)> =
            messaging::first_of_each(messages, |m| {
                let (order_id, command) = decode(m).ok()?;
                let order_id = OrderId(uuid("order_id", &order_id).ok()?);
                Some((order_id, (m.message_id().ok()?, order_id, command)))
            })
            .into_iter()
            .map(|(_, command)| command)
            .collect();
        let applying: Vec<(Uuid, OrderId, &OrderCommand)> =
            commands.iter().map(|(m, o, c)| (*m, *o, c)).collect();
        let (fresh, moved) = store::record_and_apply_all(conn, inbox, &applying).await?;
        self.prepared.set(
            commands
                .iter()
                .filter(|(message, ..)| fresh.contains(message))
                .map(|(message, order, _)| (*message, moved.contains(&order.0))),
        );
        Ok(Some(fresh))
    }

    /// Takes a batch alone when its commands are of different orders: each is taken to move
    /// its order, so its reply is known before the statement runs, and the commands, the inbox
    /// rows and the replies are one statement. A command that finds its order there or past it
    /// already makes that statement refuse the batch, and the transaction replies as the order
    /// stands.
    fn takes_alone(&self, messages: &[&Incoming]) -> bool {
        let mut orders = HashSet::with_capacity(messages.len());
        let mut commands = Vec::with_capacity(messages.len());
        for message in messages {
            let (Ok(id), Ok((order_id, command))) = (message.message_id(), decode(message)) else {
                return false;
            };
            let Ok(order_id) = uuid("order_id", &order_id).map(OrderId) else {
                return false;
            };
            if !orders.insert(order_id) {
                return false;
            }
            commands.push((id, order_id, command));
        }
        self.prepared
            .set(commands.iter().map(|(message, ..)| (*message, true)));
        *self.alone() = Some(commands);
        true
    }

    async fn flush(&self, _conn: &mut PgConnection) -> Result<(), HandlerError> {
        self.prepared.clear();
        Ok(())
    }

    /// Applies the commands of the batch taken alone with its inbox rows and replies.
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
            store::apply_all_alone(conn, inbox, &alone, &OutboxRows::new(&replies)?).await?;
        self.outbox.recorded_held(conn, replies, earlier).await?;
        Ok(())
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let message_type = message.message_type();
        let (order_id, command) = decode(message)?;
        let order_id = OrderId(uuid("order_id", &order_id)?);
        let final_command = !matches!(command, OrderCommand::MarkPaymentInitiated { .. });
        let applied = match self.prepared.take(message) {
            Some(true) => Applied::Moved,
            Some(false) => store::not_moved(conn, order_id).await?,
            None => store::apply(conn, order_id, &command).await?,
        };
        match applied {
            Applied::Moved => {
                tracing::debug!(%order_id, status = %command.target(), "order status changed");
                if final_command {
                    let reason = match &command {
                        OrderCommand::Fail { reason } => Some(reason.clone()),
                        _ => None,
                    };
                    self.confirm(conn, order_id, command.target(), reason, message)
                        .await?;
                }
                Ok(())
            }
            Applied::Ignored {
                status,
                payment_id,
                failure_reason,
            } => {
                tracing::debug!(
                    %order_id,
                    %status,
                    payment_id = ?payment_id.map(|p| p.to_string()),
                    command = ?command,
                    "command ignored: the order is already at or past its status"
                );
                if final_command {
                    self.confirm(conn, order_id, status, failure_reason, message)
                        .await?;
                }
                Ok(())
            }
            Applied::UnknownOrder => Err(HandlerError::Permanent(format!(
                "{message_type} for unknown order {order_id}"
            ))),
        }
    }
}

/// The order id and command a message of `order.commands` carries. A message of a type not
/// listed here is refused (and dead-lettered).
fn decode(message: &Incoming) -> Result<(String, OrderCommand), HandlerError> {
    Ok(match message.message_type() {
        t if t == MarkPaymentInitiated::full_name() => {
            let m: MarkPaymentInitiated = message.decode()?;
            let payment_id = PaymentId(uuid("payment_id", &m.payment_id)?);
            (
                m.order_id,
                OrderCommand::MarkPaymentInitiated { payment_id },
            )
        }
        t if t == CompleteOrder::full_name() => {
            let m: CompleteOrder = message.decode()?;
            (m.order_id, OrderCommand::Complete)
        }
        t if t == FailOrder::full_name() => {
            let m: FailOrder = message.decode()?;
            let reason = if m.reason.trim().is_empty() {
                "failed (no reason given)".to_owned()
            } else {
                m.reason
            };
            (m.order_id, OrderCommand::Fail { reason })
        }
        _ => return Err(message.unknown_type()),
    })
}

fn uuid(field: &str, value: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(value)
        .map_err(|_| HandlerError::Permanent(format!("{field} must be a UUID, got {value:?}")))
}
