//! The saga's commands to order-svc, from `order.commands`.

use async_trait::async_trait;
use messaging::{Handler, HandlerError, Incoming};
use prost::Name as _;
use proto::order::v1::{CompleteOrder, FailOrder, MarkPaymentInitiated};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{OrderCommand, OrderId, PaymentId};
use crate::store::{self, Applied};

/// Moves orders through their statuses. Idempotent by state: statuses only move forward, so a
/// repeated, late or overtaken command changes nothing and is not an error.
#[derive(Clone, Debug, Default)]
pub struct OrderCommands;

#[async_trait]
impl Handler for OrderCommands {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let message_type = message.message_type();
        let (order_id, command) = if message_type == MarkPaymentInitiated::full_name() {
            let m: MarkPaymentInitiated = message.decode()?;
            let payment_id = PaymentId(uuid("payment_id", &m.payment_id)?);
            (
                m.order_id,
                OrderCommand::MarkPaymentInitiated { payment_id },
            )
        } else if message_type == CompleteOrder::full_name() {
            let m: CompleteOrder = message.decode()?;
            (m.order_id, OrderCommand::Complete)
        } else if message_type == FailOrder::full_name() {
            let m: FailOrder = message.decode()?;
            let reason = if m.reason.trim().is_empty() {
                "failed (no reason given)".to_owned()
            } else {
                m.reason
            };
            (m.order_id, OrderCommand::Fail { reason })
        } else {
            return Err(message.unknown_type());
        };
        let order_id = OrderId(uuid("order_id", &order_id)?);
        match store::apply(conn, order_id, &command).await? {
            Applied::Moved => {
                tracing::info!(%order_id, status = %command.target(), "order status changed");
                Ok(())
            }
            Applied::Ignored { status, payment_id } => {
                tracing::info!(
                    %order_id,
                    %status,
                    payment_id = ?payment_id.map(|p| p.to_string()),
                    command = ?command,
                    "command ignored: the order is already at or past its status"
                );
                Ok(())
            }
            Applied::UnknownOrder => Err(HandlerError::Permanent(format!(
                "{message_type} for unknown order {order_id}"
            ))),
        }
    }
}

fn uuid(field: &str, value: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(value)
        .map_err(|_| HandlerError::Permanent(format!("{field} must be a UUID, got {value:?}")))
}
