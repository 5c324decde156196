//! Protobuf <-> domain conversions at the edge of the service: the gRPC API and the command
//! handler's replies.

use proto::inventory::v1 as pb;
use uuid::Uuid;

use crate::domain::{OrderId, Reservation, ReservationStatus, ReserveFailure, Sku, StockLevel};
use crate::error::Error;

pub fn order_id(value: &str) -> Result<OrderId, Error> {
    Uuid::parse_str(value)
        .map(OrderId)
        .map_err(|e| match value.chars().count() {
            // A long value is not echoed back.
            0..=64 => Error::invalid("order_id", format!("{value:?} is not a UUID ({e})")),
            _ => Error::invalid("order_id", format!("is not a UUID ({e})")),
        })
}

pub fn sku(value: &str) -> Result<Sku, Error> {
    Sku::parse(value).map_err(|reason| Error::invalid("sku", reason))
}

pub fn stock_level(level: StockLevel) -> pb::StockLevel {
    pb::StockLevel {
        sku: level.sku,
        available: level.available,
        reserved: level.reserved,
        committed: level.committed,
        written_off: level.written_off,
        received: level.received,
    }
}

pub fn status(status: ReservationStatus) -> pb::ReservationStatus {
    match status {
        ReservationStatus::Reserved => pb::ReservationStatus::Reserved,
        ReservationStatus::Committed => pb::ReservationStatus::Committed,
        ReservationStatus::Released => pb::ReservationStatus::Released,
    }
}

pub fn failure(failure: ReserveFailure) -> pb::ReservationFailure {
    match failure {
        ReserveFailure::OutOfStock => pb::ReservationFailure::OutOfStock,
        ReserveFailure::UnknownSku => pb::ReservationFailure::UnknownSku,
        // Neither kind fits; the reason says what happened.
        ReserveFailure::AlreadyReleased => pb::ReservationFailure::Unspecified,
    }
}

pub fn reservation(reservation: Reservation) -> pb::Reservation {
    pb::Reservation {
        reservation_id: reservation.id.to_string(),
        order_id: reservation.order_id.to_string(),
        status: status(reservation.status).into(),
        lines: reservation
            .lines
            .into_iter()
            .map(|line| pb::ReservationLine {
                sku: line.sku,
                // Lines are made from u32 quantities; saturate rather than fail if merged ones
                // ever exceed it.
                quantity: u32::try_from(line.quantity).unwrap_or(u32::MAX),
            })
            .collect(),
        expires_at_ms: reservation.expires_at.map_or(0, |at| at.timestamp_millis()),
    }
}
