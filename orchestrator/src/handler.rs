//! The orchestrator's consumer: `OrderCreated` and the services' replies (order-svc's
//! confirmations included), as saga inputs.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use messaging::{Handler, HandlerError, Incoming};
use prost::Name;
use proto::inventory::v1 as inventory;
use proto::order::v1 as order;
use proto::payment::v1 as payment;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::engine::{Engine, Trigger};
use crate::saga::{Input, Line, OrderDetails};
use crate::store::StoredSaga;

pub struct SagaHandler {
    engine: Engine,
    /// The sagas of the batch in hand, read together by [`Handler::prepare`]; each is taken
    /// by its first message (`None`: it has no saga yet), and a second message of the same
    /// saga reads what the first one wrote.
    prepared: Mutex<HashMap<Uuid, Option<StoredSaga>>>,
}

impl SagaHandler {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            prepared: Mutex::default(),
        }
    }

    fn prepared(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Option<StoredSaga>>> {
        self.prepared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Handler for SagaHandler {
    async fn prepare(
        &self,
        conn: &mut PgConnection,
        messages: &[&Incoming],
    ) -> Result<(), HandlerError> {
        self.prepared().clear();
        // A message that does not decode is refused by `handle`, with its error.
        let ids: Vec<Uuid> = messages
            .iter()
            .filter_map(|m| decode(m).ok().map(|(id, _)| id))
            .collect();
        if ids.len() < 2 {
            return Ok(());
        }
        let mut found = self.engine.load_many(conn, &ids).await?;
        let mut prepared = self.prepared();
        for id in ids {
            prepared.insert(id, found.remove(&id));
        }
        Ok(())
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let (order_id, input) = decode(message)?;
        let trigger = Trigger {
            message_id: message.envelope.message_id.clone(),
            message_type: message.envelope.message_type.clone(),
            context: Some(message.context()),
        };
        let prepared = self.prepared().remove(&order_id);
        match prepared {
            Some(stored) => {
                self.engine
                    .step_loaded(conn, order_id, &input, &trigger, stored)
                    .await?
            }
            None => self.engine.step(conn, order_id, &input, &trigger).await?,
        };
        Ok(())
    }

    /// A message of a saga that can never be handled leaves the saga waiting: flag it.
    async fn on_dead_letter(
        &self,
        conn: &mut PgConnection,
        message: &Incoming,
        error: &str,
    ) -> Result<(), HandlerError> {
        let saga_id = Uuid::parse_str(&message.envelope.saga_id)
            .or_else(|_| message.key.as_deref().unwrap_or_default().parse());
        if let Ok(saga_id) = saga_id {
            crate::store::flag_for_operator(
                conn,
                saga_id,
                &format!("{} dead-lettered: {error}", message.message_type()),
            )
            .await?;
        }
        Ok(())
    }
}

/// The order id and saga input a message carries.
pub fn decode(message: &Incoming) -> Result<(Uuid, Input), HandlerError> {
    let t = message.message_type();
    let decoded = if t == order::OrderCreated::full_name() {
        let m: order::OrderCreated = message.decode()?;
        (m.order_id.clone(), order_created(m)?)
    } else if t == inventory::InventoryReserved::full_name() {
        let m: inventory::InventoryReserved = message.decode()?;
        let reservation_id = uuid_field("reservation_id", &m.reservation_id)?;
        (m.order_id, Input::InventoryReserved { reservation_id })
    } else if t == inventory::InventoryReservationFailed::full_name() {
        let m: inventory::InventoryReservationFailed = message.decode()?;
        (
            m.order_id,
            Input::InventoryReservationFailed { reason: m.reason },
        )
    } else if t == inventory::InventoryCommitted::full_name() {
        let m: inventory::InventoryCommitted = message.decode()?;
        (m.order_id, Input::InventoryCommitted)
    } else if t == inventory::InventoryCommitFailed::full_name() {
        let m: inventory::InventoryCommitFailed = message.decode()?;
        (
            m.order_id,
            Input::InventoryCommitFailed { reason: m.reason },
        )
    } else if t == inventory::InventoryReleased::full_name() {
        let m: inventory::InventoryReleased = message.decode()?;
        (m.order_id, Input::InventoryReleased)
    } else if t == payment::PaymentInitiated::full_name() {
        let m: payment::PaymentInitiated = message.decode()?;
        let payment_id = uuid_field("payment_id", &m.payment_id)?;
        (m.order_id, Input::PaymentInitiated { payment_id })
    } else if t == payment::PaymentSucceeded::full_name() {
        let m: payment::PaymentSucceeded = message.decode()?;
        let payment_id = uuid_field("payment_id", &m.payment_id)?;
        (m.order_id, Input::PaymentSucceeded { payment_id })
    } else if t == payment::PaymentFailed::full_name() {
        let m: payment::PaymentFailed = message.decode()?;
        (m.order_id, Input::PaymentFailed { reason: m.reason })
    } else if t == payment::PaymentVoided::full_name() {
        let m: payment::PaymentVoided = message.decode()?;
        (m.order_id, Input::PaymentVoided)
    } else if t == payment::PaymentRefunded::full_name() {
        let m: payment::PaymentRefunded = message.decode()?;
        (m.order_id, Input::PaymentRefunded)
    } else if t == order::OrderCompleted::full_name() {
        let m: order::OrderCompleted = message.decode()?;
        (m.order_id, Input::OrderCompleted)
    } else if t == order::OrderFailed::full_name() {
        let m: order::OrderFailed = message.decode()?;
        (m.order_id, Input::OrderFailed { reason: m.reason })
    } else {
        return Err(message.unknown_type());
    };
    let (order_id, input) = decoded;
    Ok((uuid_field("order_id", &order_id)?, input))
}

fn order_created(m: order::OrderCreated) -> Result<Input, HandlerError> {
    if m.lines.is_empty() {
        return Err(HandlerError::Permanent("OrderCreated without lines".into()));
    }
    if let Some(bad) = m.lines.iter().find(|l| l.quantity == 0 || l.sku.is_empty()) {
        return Err(HandlerError::Permanent(format!(
            "OrderCreated with an invalid line: {bad:?}"
        )));
    }
    Ok(Input::OrderCreated {
        order: OrderDetails {
            customer_id: m.customer_id,
            lines: m
                .lines
                .into_iter()
                .map(|l| Line {
                    sku: l.sku,
                    quantity: l.quantity,
                    unit_price_cents: l.unit_price_cents,
                })
                .collect(),
            total_cents: m.total_cents,
            currency: m.currency,
            payment_method: m.payment_method,
        },
    })
}

fn uuid_field(field: &str, value: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(value)
        .map_err(|_| HandlerError::Permanent(format!("invalid {field} {value:?}")))
}
