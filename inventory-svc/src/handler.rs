//! The commands of `inventory.commands`, handled in the consumer's inbox transaction, with their
//! replies to `saga.replies` recorded in the same transaction.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use messaging::{Handler, HandlerError, InboxRows, Incoming, Outbox, OutboxRows, Prepared};
use prost::Name as _;
use proto::inventory::v1 as pb;
use sqlx::PgConnection;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::convert;
use crate::domain::{CommitOutcome, Lines, OrderId, ReleaseOutcome, ReservationId, ReserveOutcome};
use crate::store::reservations;

/// A command of `inventory.commands`, decoded.
enum Command {
    Reserve(pb::ReserveInventory),
    Commit(pb::CommitInventory),
    Release(pb::ReleaseInventory),
}

impl Command {
    /// The order the command is about, as the command says it.
    fn order_id(&self) -> &str {
        match self {
            Self::Reserve(c) => &c.order_id,
            Self::Commit(c) => &c.order_id,
            Self::Release(c) => &c.order_id,
        }
    }

    /// A message of a type not listed here is refused (and dead-lettered).
    fn decode(message: &Incoming) -> Result<Self, HandlerError> {
        Ok(match message.message_type() {
            t if t == pb::ReserveInventory::full_name() => Self::Reserve(message.decode()?),
            t if t == pb::CommitInventory::full_name() => Self::Commit(message.decode()?),
            t if t == pb::ReleaseInventory::full_name() => Self::Release(message.decode()?),
            _ => return Err(message.unknown_type()),
        })
    }
}

/// Handles ReserveInventory, CommitInventory and ReleaseInventory.
#[derive(Clone, Debug)]
pub struct CommandHandler {
    outbox: Outbox,
    reservation_ttl: Duration,
    /// The outcomes of a batch's commits, made by its first statement (or, for a batch taken
    /// alone, to be made by its one statement), by message id, for `handle` to reply with.
    prepared: Arc<Prepared<CommitOutcome>>,
    /// The reservations this handler's reserves made, by order, until their commit.
    reserved: Arc<Mutex<HashMap<Uuid, ReservationId>>>,
    /// The commits of a batch taken alone ([`Handler::takes_alone`]), each with its message's
    /// id, its order and the reservation the order holds, made by `flush_alone`.
    alone: Arc<Mutex<Option<AloneCommits>>>,
}

/// A batch's commits taken alone: (message id, order, the reservation it holds).
type AloneCommits = Vec<(Uuid, OrderId, ReservationId)>;

/// Reservations remembered at most, until their commit (those of orders that fail are never
/// committed: forgotten when the map is full).
const RESERVED_CAPACITY: usize = 10_000;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl CommandHandler {
    pub fn new(outbox: Outbox, reservation_ttl: Duration) -> Self {
        Self {
            outbox,
            reservation_ttl,
            prepared: Arc::default(),
            reserved: Arc::default(),
            alone: Arc::default(),
        }
    }

    /// Once the transaction commits, remembers (`Some`) or forgets the reservation of
    /// `order_id`.
    fn remember_after_commit(&self, order_id: OrderId, reservation: Option<ReservationId>) {
        let reserved = self.reserved.clone();
        messaging::after_commit(move || {
            let mut reserved = lock(&reserved);
            match reservation {
                Some(id) => {
                    if reserved.len() >= RESERVED_CAPACITY {
                        reserved.clear();
                    }
                    reserved.insert(order_id.0, id);
                }
                None => {
                    reserved.remove(&order_id.0);
                }
            }
        });
    }

    async fn dispatch(
        &self,
        conn: &mut PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let order_id = &message.envelope.saga_id;
        match Command::decode(message)? {
            Command::Reserve(command) => {
                let span = tracing::info_span!("inventory.reserve", %order_id);
                self.reserve(conn, command, message).instrument(span).await
            }
            Command::Commit(command) => {
                let span = tracing::info_span!("inventory.commit", %order_id);
                self.commit(conn, command, message).instrument(span).await
            }
            Command::Release(command) => {
                let span = tracing::info_span!("inventory.release", %order_id);
                self.release(conn, command, message).instrument(span).await
            }
        }
    }

    async fn reserve(
        &self,
        conn: &mut PgConnection,
        command: pb::ReserveInventory,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let order_id = order_id(&command.order_id)?;
        let lines = Lines::merge(command.lines.iter().map(|l| (l.sku.as_str(), l.quantity)))
            .map_err(|e| {
                HandlerError::Permanent(format!("ReserveInventory for order {order_id}: {e}"))
            })?;
        match reservations::reserve(conn, order_id, &lines, self.reservation_ttl).await? {
            ReserveOutcome::Reserved {
                reservation_id,
                expires_at,
            } => {
                tracing::debug!(%order_id, %reservation_id, "reserved");
                self.remember_after_commit(order_id, Some(reservation_id));
                let reply = pb::InventoryReserved {
                    order_id: order_id.to_string(),
                    reservation_id: reservation_id.to_string(),
                    expires_at_ms: expires_at.timestamp_millis(),
                };
                self.reply(conn, order_id, &reply, message).await
            }
            ReserveOutcome::Failed { failure, reason } => {
                tracing::debug!(%order_id, ?failure, %reason, "reservation refused");
                let reply = pb::InventoryReservationFailed {
                    order_id: order_id.to_string(),
                    failure: convert::failure(failure).into(),
                    reason,
                };
                self.reply(conn, order_id, &reply, message).await
            }
        }
    }

    async fn commit(
        &self,
        conn: &mut PgConnection,
        command: pb::CommitInventory,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let order_id = order_id(&command.order_id)?;
        let outcome = match self.prepared.take(message) {
            Some(outcome) => outcome,
            None => reservations::commit(conn, order_id).await?,
        };
        self.remember_after_commit(order_id, None);
        match outcome {
            CommitOutcome::Committed { reservation_id } => {
                tracing::debug!(%order_id, %reservation_id, "committed");
                let reply = pb::InventoryCommitted {
                    order_id: order_id.to_string(),
                    reservation_id: reservation_id.to_string(),
                };
                self.reply(conn, order_id, &reply, message).await
            }
            CommitOutcome::Failed { reason } => {
                tracing::debug!(%order_id, %reason, "commit refused");
                let reply = pb::InventoryCommitFailed {
                    order_id: order_id.to_string(),
                    reason,
                };
                self.reply(conn, order_id, &reply, message).await
            }
        }
    }

    async fn release(
        &self,
        conn: &mut PgConnection,
        command: pb::ReleaseInventory,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let order_id = order_id(&command.order_id)?;
        let outcome = reservations::release(conn, order_id, &command.reason).await?;
        self.remember_after_commit(order_id, None);
        match outcome {
            ReleaseOutcome::Released => {
                tracing::debug!(%order_id, reason = %command.reason, "released")
            }
            ReleaseOutcome::NothingHeld => {
                tracing::debug!(%order_id, reason = %command.reason, "nothing to release")
            }
            ReleaseOutcome::AlreadyCommitted => tracing::warn!(
                %order_id,
                reason = %command.reason,
                "release of a committed reservation ignored: its stock is sold"
            ),
        }
        let reply = pb::InventoryReleased {
            order_id: order_id.to_string(),
            released: outcome == ReleaseOutcome::Released,
        };
        self.reply(conn, order_id, &reply, message).await
    }

    async fn reply<M: prost::Message + prost::Name>(
        &self,
        conn: &mut PgConnection,
        order_id: OrderId,
        reply: &M,
        cause: &Incoming,
    ) -> Result<(), HandlerError> {
        let message = self.outbox.message(
            proto::topics::SAGA_REPLIES,
            order_id.0,
            reply,
            &cause.context(),
        );
        self.outbox.enqueue(conn, &[message]).await?;
        Ok(())
    }
}

fn order_id(value: &str) -> Result<OrderId, HandlerError> {
    Uuid::parse_str(value)
        .map(OrderId)
        .map_err(|e| HandlerError::Permanent(format!("invalid order_id {value:?}: {e}")))
}

#[async_trait]
impl Handler for CommandHandler {
    /// Commits the batch's orders in the statement that records its inbox rows, each order
    /// whose first command in the batch is a commit (any other command, and a second one of an
    /// order, is applied by `handle` in the batch's order).
    async fn prepare_recording(
        &self,
        conn: &mut PgConnection,
        messages: &[&Incoming],
        inbox: &InboxRows<'_>,
    ) -> Result<Option<HashSet<Uuid>>, HandlerError> {
        self.prepared.clear();
        *lock(&self.alone) = None;
        // A message that does not decode is refused by `handle`, with its error.
        let first = messaging::first_of_each(messages, |m| {
            let command = Command::decode(m).ok()?;
            Some((command.order_id().to_owned(), command))
        });
        let commits: Vec<(Uuid, OrderId)> = first
            .into_iter()
            .filter_map(|(message, command)| match command {
                Command::Commit(commit) => {
                    Some((message.message_id().ok()?, order_id(&commit.order_id).ok()?))
                }
                _ => None,
            })
            .collect();
        let (fresh, mut outcomes) =
            reservations::record_and_commit_all(conn, inbox, &commits).await?;
        self.prepared
            .set(commits.iter().filter_map(|(message, order)| {
                outcomes.remove(&order.0).map(|outcome| (*message, outcome))
            }));
        Ok(Some(fresh))
    }

    /// Takes a batch alone when it is commits only, of different orders, each holding the
    /// reservation this handler's reserve made: each is taken to succeed, so its reply is known
    /// before the statement runs, and the commits, the inbox rows and the replies are one
    /// statement. A reservation expired or released meanwhile makes that statement refuse the
    /// batch, and the transaction replies as the reservation stands.
    fn takes_alone(&self, messages: &[&Incoming]) -> bool {
        let mut commits = Vec::with_capacity(messages.len());
        {
            let reserved = lock(&self.reserved);
            for message in messages {
                let (Ok(id), Ok(Command::Commit(commit))) =
                    (message.message_id(), Command::decode(message))
                else {
                    return false;
                };
                let Ok(order) = order_id(&commit.order_id) else {
                    return false;
                };
                let Some(reservation) = reserved.get(&order.0) else {
                    return false;
                };
                if commits.iter().any(|(_, o, _)| *o == order) {
                    return false;
                }
                commits.push((id, order, *reservation));
            }
        }
        self.prepared
            .set(commits.iter().map(|(message, _, reservation_id)| {
                (
                    *message,
                    CommitOutcome::Committed {
                        reservation_id: *reservation_id,
                    },
                )
            }));
        *lock(&self.alone) = Some(commits);
        true
    }

    async fn flush(&self, _conn: &mut PgConnection) -> Result<(), HandlerError> {
        self.prepared.clear();
        Ok(())
    }

    /// Makes the commits of the batch taken alone with its inbox rows and replies.
    async fn flush_alone(
        &self,
        conn: &mut PgConnection,
        inbox: &InboxRows<'_>,
    ) -> Result<(), HandlerError> {
        self.prepared.clear();
        let Some(commits) = lock(&self.alone).take() else {
            return Err(HandlerError::Transient("no batch taken alone".to_owned()));
        };
        let replies = messaging::outbox::take_held();
        let earlier =
            reservations::commit_all_alone(conn, inbox, &commits, &OutboxRows::new(&replies)?)
                .await?;
        self.outbox.recorded_held(conn, replies, earlier).await?;
        Ok(())
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        // The consumer's span of this message names it and carries its correlation id.
        self.dispatch(conn, message).await
    }
}
