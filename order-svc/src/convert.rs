//! Conversion between the protobuf contracts and the domain, at the edge of the service: for
//! its gRPC API and for the messages it sends and receives over Kafka.

use chrono::{DateTime, Utc};
use messaging::MessageContext;
use proto::order::v1 as pb;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use crate::domain::{Order, OrderId, OrderLine, OrderRequest, OrderStatus, Product};
use crate::error::Error;

pub use messaging::service::CORRELATION_ID;

pub fn order_request(request: pb::CreateOrderRequest) -> Result<OrderRequest, Error> {
    OrderRequest::new(
        request.customer_id,
        request
            .items
            .into_iter()
            .map(|item| (item.sku, item.quantity))
            .collect(),
        request.payment_method,
        request.idempotency_key,
    )
}

pub fn order_id(value: &str) -> Result<OrderId, Error> {
    Uuid::parse_str(value)
        .map(OrderId)
        .map_err(|_| match value.chars().count() {
            // A long value is not echoed back.
            0..=64 => Error::Invalid(format!("order_id must be a UUID, got {value:?}")),
            _ => Error::Invalid("order_id must be a UUID".to_owned()),
        })
}

/// ListCustomerOrders' page token: where the previous page ended (creation time in
/// microseconds, then order id).
pub fn next_page_token(created_at: DateTime<Utc>, id: OrderId) -> String {
    format!("{}_{}", created_at.timestamp_micros(), id.0.simple())
}

pub fn page_token(token: &str) -> Result<(DateTime<Utc>, OrderId), Error> {
    let invalid = || Error::Invalid(format!("page_token {token:?} is not one this service gave"));
    let (micros, id) = token.split_once('_').ok_or_else(invalid)?;
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let created_at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    let id = OrderId(Uuid::try_parse(id).map_err(|_| invalid())?);
    // Only the very text this service writes (no sign, no other spelling of the id).
    if micros < 0 || next_page_token(created_at, id) != token {
        return Err(invalid());
    }
    Ok((created_at, id))
}

/// The context of the messages a request causes ([`messaging::service::request_context`]):
/// a request without a usable correlation id starts a saga of its own, with a new one.
pub fn message_context(metadata: &MetadataMap) -> MessageContext {
    let mut context = messaging::service::request_context(metadata);
    if context.correlation_id.is_empty() {
        context.correlation_id = Uuid::new_v4().to_string();
    }
    context
}

pub fn status(status: OrderStatus) -> pb::OrderStatus {
    match status {
        OrderStatus::Pending => pb::OrderStatus::Pending,
        OrderStatus::PaymentInitiated => pb::OrderStatus::PaymentInitiated,
        OrderStatus::Completed => pb::OrderStatus::Completed,
        OrderStatus::Failed => pb::OrderStatus::Failed,
    }
}

/// The statuses a listing asks for; an unknown or unspecified one is refused.
pub fn status_filter(values: &[i32]) -> Result<Vec<OrderStatus>, Error> {
    values
        .iter()
        .map(|value| match pb::OrderStatus::try_from(*value) {
            Ok(pb::OrderStatus::Pending) => Ok(OrderStatus::Pending),
            Ok(pb::OrderStatus::PaymentInitiated) => Ok(OrderStatus::PaymentInitiated),
            Ok(pb::OrderStatus::Completed) => Ok(OrderStatus::Completed),
            Ok(pb::OrderStatus::Failed) => Ok(OrderStatus::Failed),
            Ok(pb::OrderStatus::Unspecified) | Err(_) => Err(Error::Invalid(format!(
                "statuses: {value} is not an order status"
            ))),
        })
        .collect()
}

pub fn priced_line(line: &OrderLine) -> pb::PricedLine {
    pb::PricedLine {
        sku: line.sku.clone(),
        quantity: line.quantity,
        unit_price_cents: line.unit_price_cents,
        line_total_cents: line.total_cents(),
    }
}

pub fn order(order: Order) -> pb::Order {
    pb::Order {
        order_id: order.id.to_string(),
        customer_id: order.customer_id,
        status: status(order.status).into(),
        lines: order.lines.iter().map(priced_line).collect(),
        total_cents: order.total_cents,
        currency: order.currency,
        payment_method: order.payment_method,
        payment_id: order.payment_id.map(|p| p.to_string()).unwrap_or_default(),
        failure_reason: order.failure_reason.unwrap_or_default(),
        correlation_id: order.correlation_id,
        created_at_ms: order.created_at.timestamp_millis(),
        updated_at_ms: order.updated_at.timestamp_millis(),
    }
}

/// The event that starts the order's saga.
pub fn order_created(order: &Order) -> pb::OrderCreated {
    pb::OrderCreated {
        order_id: order.id.to_string(),
        customer_id: order.customer_id.clone(),
        lines: order.lines.iter().map(priced_line).collect(),
        total_cents: order.total_cents,
        currency: order.currency.clone(),
        payment_method: order.payment_method.clone(),
    }
}

pub fn product(product: Product) -> pb::Product {
    pb::Product {
        sku: product.sku,
        name: product.name,
        unit_price_cents: product.unit_price_cents,
        currency: product.currency,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_id_is_taken_from_metadata_or_made() {
        let mut metadata = MetadataMap::new();
        metadata.insert(CORRELATION_ID, "corr-42".parse().unwrap());
        metadata.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let context = message_context(&metadata);
        assert_eq!(context.correlation_id, "corr-42");
        assert!(context.traceparent.starts_with("00-0af7"));
        assert!(Uuid::parse_str(&context.causation_id).is_ok());

        let made = message_context(&MetadataMap::new());
        assert!(Uuid::parse_str(&made.correlation_id).is_ok());
        assert_eq!(made.traceparent, "");

        let mut too_long = MetadataMap::new();
        too_long.insert(CORRELATION_ID, "x".repeat(129).parse().unwrap());
        assert!(Uuid::parse_str(&message_context(&too_long).correlation_id).is_ok());
    }

    #[test]
    fn page_tokens_round_trip_and_others_are_refused() {
        let at = chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = OrderId(Uuid::now_v7());
        assert_eq!(page_token(&next_page_token(at, id)).unwrap(), (at, id));
        for token in [
            "x",
            "1_",
            "_",
            "12_not-a-uuid",
            "abc_0190f3f0000070008000000000000001",
        ] {
            assert!(page_token(token).is_err(), "{token}");
        }
    }

    #[test]
    fn order_ids_must_be_uuids() {
        assert!(matches!(order_id("nope"), Err(Error::Invalid(m)) if m.contains("order_id")));
        let id = Uuid::now_v7();
        assert_eq!(order_id(&id.to_string()).unwrap(), OrderId(id));
    }
}
