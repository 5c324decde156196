//! The orchestrator's consumer: `OrderCreated` and the services' replies (order-svc's
//! confirmations included), as saga inputs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use messaging::{Handler, HandlerError, InboxRows, Incoming};
use prost::Name;
use proto::inventory::v1 as inventory;
use proto::order::v1 as order;
use proto::payment::v1 as payment;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::engine::{Engine, Trigger};
use crate::saga::{Input, Line, OrderDetails};
use crate::store::{SagaWrite, StoredSaga};

pub struct SagaHandler {
    engine: Engine,
    batch: Mutex<Batch>,
    /// The sagas as this handler last wrote them, for the batches it takes alone.
    memory: Arc<Mutex<Memory>>,
}

/// What the handler holds between [`Handler::prepare`] and [`Handler::flush`] of one batch.
#[derive(Default)]
struct Batch {
    /// Whether a batch is open: outside one, each step is saved at once.
    open: bool,
    /// The batch's sagas as they stand in it: read together by `prepare` (`None`: no saga
    /// yet), then as each step left them.
    sagas: HashMap<Uuid, Option<StoredSaga>>,
    /// The steps not saved yet, at most one per saga (one statement cannot write a row twice).
    unsaved: Vec<SagaWrite>,
    /// The sagas the batch's statements saved so far.
    saved: Vec<Uuid>,
}

/// The sagas as this handler's committed batches left them, by id, so that the next reply of
/// a saga is applied without reading it: the replies of a saga come to the consumer that sent
/// its command (one partition a saga). Only a hint: the statement of a batch taken alone writes
/// nothing unless every saga is still at the version remembered here.
#[derive(Default)]
struct Memory {
    sagas: HashMap<Uuid, StoredSaga>,
}

impl Memory {
    /// Sagas remembered at most: some hundreds of bytes each.
    const CAPACITY: usize = 10_000;

    fn remember(&mut self, sagas: impl IntoIterator<Item = StoredSaga>) {
        for stored in sagas {
            if stored.saga.state.is_terminal() {
                // Nothing more is expected of an ended saga.
                self.sagas.remove(&stored.saga.order_id);
                continue;
            }
            if self.sagas.len() >= Self::CAPACITY {
                // Sagas abandoned halfway (their replies went to another replica): start over.
                self.sagas.clear();
            }
            self.sagas.insert(stored.saga.order_id, stored);
        }
    }

    fn forget(&mut self, ids: impl IntoIterator<Item = Uuid>) {
        for id in ids {
            self.sagas.remove(&id);
        }
    }
}

impl SagaHandler {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            batch: Mutex::default(),
            memory: Arc::default(),
        }
    }

    fn batch(&self) -> std::sync::MutexGuard<'_, Batch> {
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        lock(&self.memory)
    }

    /// Saves the batch's unsaved steps, in one statement.
    async fn save_unsaved(&self, conn: &mut PgConnection) -> Result<(), HandlerError> {
        let unsaved = std::mem::take(&mut self.batch().unsaved);
        self.engine.save_all(conn, &unsaved).await?;
        self.batch()
            .saved
            .extend(unsaved.iter().map(|w| w.next.order_id));
        Ok(())
    }
}

impl SagaHandler {
    /// Saves a batch taken alone: one step a message, in one statement that records the inbox
    /// rows too and writes all or nothing.
    async fn save_alone(
        &self,
        conn: &mut PgConnection,
        inbox: &InboxRows<'_>,
    ) -> Result<(), HandlerError> {
        let unsaved = std::mem::take(&mut self.batch().unsaved);
        if unsaved.len() != inbox.len() {
            // An input ignored in the state remembered: whether it is ignored in the state
            // stored is for the transaction to tell.
            return Err(HandlerError::Transient(format!(
                "{} of {} messages step their sagas as remembered",
                unsaved.len(),
                inbox.len()
            )));
        }
        self.engine.save_all_alone(conn, &unsaved, inbox).await?;
        self.batch()
            .saved
            .extend(unsaved.iter().map(|w| w.next.order_id));
        Ok(())
    }
    /// Ends the batch after its save (`saved`): forgets its sagas if it failed (what memory said
    /// may be out of date: they are read again), and else remembers them as they were saved,
    /// once the batch has committed.
    fn close(&self, saved: Result<(), HandlerError>) -> Result<(), HandlerError> {
        let batch = std::mem::take(&mut *self.batch());
        if let Err(error) = saved {
            self.memory().forget(batch.sagas.into_keys());
            return Err(error);
        }
        let mut sagas = batch.sagas;
        let after: Vec<StoredSaga> = batch
            .saved
            .iter()
            .filter_map(|id| sagas.remove(id).flatten())
            .collect();
        let memory = self.memory.clone();
        messaging::after_commit(move || lock(&memory).remember(after));
        Ok(())
    }
}

fn lock(memory: &Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
    memory.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Handler for SagaHandler {
    /// Takes a batch alone when each of its messages is of a different saga, remembered as this
    /// handler last wrote it or started by the message.
    fn takes_alone(&self, messages: &[&Incoming]) -> bool {
        let mut sagas = HashMap::with_capacity(messages.len());
        {
            let memory = self.memory();
            for message in messages {
                let Ok((order_id, input)) = decode(message) else {
                    return false;
                };
                let stored = match memory.sagas.get(&order_id) {
                    Some(stored) => Some(stored.clone()),
                    None if matches!(input, Input::OrderCreated { .. }) => None,
                    None => return false,
                };
                if sagas.insert(order_id, stored).is_some() {
                    return false;
                }
            }
        }
        *self.batch() = Batch {
            open: true,
            sagas,
            ..Batch::default()
        };
        true
    }

    /// Reads the batch's sagas in one statement; their steps are saved together by `flush`.
    async fn prepare_recording(
        &self,
        conn: &mut PgConnection,
        messages: &[&Incoming],
        inbox: &InboxRows<'_>,
    ) -> Result<Option<HashSet<Uuid>>, HandlerError> {
        *self.batch() = Batch::default();
        // Every message's saga, those handled before included (they are not handled again):
        // the read goes with the inbox rows' statement.
        let ids: Vec<Uuid> = messages
            .iter()
            .filter_map(|m| decode(m).ok().map(|(id, _)| id))
            .collect();
        let (fresh, mut found) = self.engine.record_and_load_many(conn, inbox, &ids).await?;
        let mut batch = self.batch();
        batch.open = true;
        for id in ids {
            let stored = found.remove(&id);
            batch.sagas.entry(id).or_insert(stored);
        }
        Ok(Some(fresh))
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
        let (open, prepared, unsaved) = {
            let batch = self.batch();
            (
                batch.open,
                batch.sagas.get(&order_id).cloned(),
                batch.unsaved.iter().any(|w| w.next.order_id == order_id),
            )
        };
        if !open {
            self.engine.step(conn, order_id, &input, &trigger).await?;
            return Ok(());
        }
        if unsaved {
            // A second step of one saga in the batch: the first is saved before it.
            self.save_unsaved(conn).await?;
        }
        let stored = match prepared {
            Some(stored) => stored,
            None => self.engine.load(conn, order_id).await?,
        };
        let updated_at = chrono::Utc::now();
        if let Ok(write) = self
            .engine
            .step_unsaved(conn, order_id, &input, &trigger, stored)
            .await?
        {
            let mut batch = self.batch();
            let after = StoredSaga {
                saga: write.next.clone(),
                version: write.version(),
                correlation_id: write.origin.correlation_id.clone(),
                traceparent: write.origin.traceparent.clone(),
                tracestate: write.origin.tracestate.clone(),
                updated_at,
            };
            batch.sagas.insert(order_id, Some(after));
            batch.unsaved.push(write);
        }
        Ok(())
    }

    /// Saves the steps of the batch, in one statement; once it has committed, remembers the
    /// sagas as they left them.
    async fn flush(&self, conn: &mut PgConnection) -> Result<(), HandlerError> {
        let saved = self.save_unsaved(conn).await;
        self.close(saved)
    }

    /// Saves the steps of a batch taken alone, with its inbox rows, in one statement; then as
    /// `flush`.
    async fn flush_alone(
        &self,
        conn: &mut PgConnection,
        inbox: &InboxRows<'_>,
    ) -> Result<(), HandlerError> {
        let saved = self.save_alone(conn, inbox).await;
        self.close(saved)
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

/// The order id and saga input a message carries. A message of a type not listed here is
/// refused (and dead-lettered, its saga flagged).
pub fn decode(message: &Incoming) -> Result<(Uuid, Input), HandlerError> {
    let decoded = match message.message_type() {
        t if t == order::OrderCreated::full_name() => {
            let m: order::OrderCreated = message.decode()?;
            (m.order_id.clone(), order_created(m)?)
        }
        t if t == inventory::InventoryReserved::full_name() => {
            let m: inventory::InventoryReserved = message.decode()?;
            let reservation_id = uuid_field("reservation_id", &m.reservation_id)?;
            (m.order_id, Input::InventoryReserved { reservation_id })
        }
        t if t == inventory::InventoryReservationFailed::full_name() => {
            let m: inventory::InventoryReservationFailed = message.decode()?;
            (
                m.order_id,
                Input::InventoryReservationFailed { reason: m.reason },
            )
        }
        t if t == inventory::InventoryCommitted::full_name() => {
            let m: inventory::InventoryCommitted = message.decode()?;
            (m.order_id, Input::InventoryCommitted)
        }
        t if t == inventory::InventoryCommitFailed::full_name() => {
            let m: inventory::InventoryCommitFailed = message.decode()?;
            (
                m.order_id,
                Input::InventoryCommitFailed { reason: m.reason },
            )
        }
        t if t == inventory::InventoryReleased::full_name() => {
            let m: inventory::InventoryReleased = message.decode()?;
            (m.order_id, Input::InventoryReleased)
        }
        t if t == payment::PaymentInitiated::full_name() => {
            let m: payment::PaymentInitiated = message.decode()?;
            let payment_id = uuid_field("payment_id", &m.payment_id)?;
            (m.order_id, Input::PaymentInitiated { payment_id })
        }
        t if t == payment::PaymentSucceeded::full_name() => {
            let m: payment::PaymentSucceeded = message.decode()?;
            let payment_id = uuid_field("payment_id", &m.payment_id)?;
            (m.order_id, Input::PaymentSucceeded { payment_id })
        }
        t if t == payment::PaymentFailed::full_name() => {
            let m: payment::PaymentFailed = message.decode()?;
            (m.order_id, Input::PaymentFailed { reason: m.reason })
        }
        t if t == payment::PaymentVoided::full_name() => {
            let m: payment::PaymentVoided = message.decode()?;
            (m.order_id, Input::PaymentVoided)
        }
        t if t == payment::PaymentRefunded::full_name() => {
            let m: payment::PaymentRefunded = message.decode()?;
            (m.order_id, Input::PaymentRefunded)
        }
        t if t == order::OrderCompleted::full_name() => {
            let m: order::OrderCompleted = message.decode()?;
            (m.order_id, Input::OrderCompleted)
        }
        t if t == order::OrderFailed::full_name() => {
            let m: order::OrderFailed = message.decode()?;
            (m.order_id, Input::OrderFailed { reason: m.reason })
        }
        _ => return Err(message.unknown_type()),
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
