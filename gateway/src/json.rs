//! The REST API's JSON documents and their conversion from and to the protobuf messages.

use std::collections::HashMap;

use axum::extract::{FromRequest, Request};
use chrono::{DateTime, SecondsFormat};
use proto::inventory::v1::StockLevel;
use proto::order::v1 as order;
use proto::payment::v1 as payment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// `axum::Json` whose rejections answer with the gateway's JSON errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<T>::from_request(request, state).await?;
        Ok(ApiJson(value))
    }
}

// ---- requests

/// An order to place, for the customer the token names.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateOrderBody {
    /// May be omitted; when given, it must be the token's customer (else 403).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    pub customer_id: Option<String>,
    /// One line per SKU (lines of the same SKU are added up).
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<LineItemBody>,
    /// The payment provider's token for the customer's payment method; the simulator takes
    /// `pm_card_visa` (succeeds), `pm_card_chargeDeclined` (declined) and others.
    #[schema(min_length = 1, max_length = 255, example = "pm_card_visa")]
    pub payment_method: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LineItemBody {
    /// A SKU of the catalog (`GET /products`).
    #[schema(min_length = 1, max_length = 64, example = "SKU-MOUSE")]
    pub sku: String,
    #[schema(minimum = 1, maximum = 1000)]
    pub quantity: u32,
}

impl CreateOrderBody {
    pub fn into_proto(
        self,
        customer_id: String,
        idempotency_key: String,
    ) -> order::CreateOrderRequest {
        order::CreateOrderRequest {
            customer_id,
            items: self
                .items
                .into_iter()
                .map(|item| order::LineItem {
                    sku: item.sku,
                    quantity: item.quantity,
                })
                .collect(),
            payment_method: self.payment_method,
            idempotency_key,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct VerifyPaymentBody {
    /// The order's `payment_id`, shown once the order is `PAYMENT_INITIATED`.
    #[schema(format = Uuid)]
    pub payment_id: String,
}

// ---- responses

/// A reply that breaks the contract (a missing message, an impossible value).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidReply(String);

/// `PENDING -> PAYMENT_INITIATED -> COMPLETED | FAILED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Unspecified,
    Pending,
    PaymentInitiated,
    Completed,
    Failed,
}

impl From<order::OrderStatus> for OrderStatus {
    fn from(status: order::OrderStatus) -> OrderStatus {
        match status {
            order::OrderStatus::Unspecified => OrderStatus::Unspecified,
            order::OrderStatus::Pending => OrderStatus::Pending,
            order::OrderStatus::PaymentInitiated => OrderStatus::PaymentInitiated,
            order::OrderStatus::Completed => OrderStatus::Completed,
            order::OrderStatus::Failed => OrderStatus::Failed,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderJson {
    #[schema(format = Uuid)]
    pub order_id: String,
    pub customer_id: String,
    pub status: OrderStatus,
    pub items: Vec<OrderLineJson>,
    /// Priced by the order service from its catalog.
    pub total_cents: i64,
    pub currency: String,
    pub payment_method: String,
    /// Set from `PAYMENT_INITIATED` on: what `POST /payment/verify` takes.
    #[schema(format = Uuid)]
    pub payment_id: Option<String>,
    /// Why the order failed, only when `FAILED`: `out of stock: ...`, `unknown SKU: ...`,
    /// `payment declined: <reason>`, `payment not verified in time`,
    /// `inventory commit failed: ...` (the payment refunded), `aborted by an operator: ...`.
    pub failure_reason: Option<String>,
    /// RFC 3339, UTC, milliseconds.
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// A page of the customer's orders, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrdersPageJson {
    pub orders: Vec<OrderJson>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderLineJson {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
    pub line_total_cents: i64,
}

impl TryFrom<order::Order> for OrderJson {
    type Error = InvalidReply;

    fn try_from(order: order::Order) -> Result<OrderJson, InvalidReply> {
        let status = order::OrderStatus::try_from(order.status)
            .map_err(|_| InvalidReply(format!("unknown order status {}", order.status)))?
            .into();
        Ok(OrderJson {
            created_at: timestamp(order.created_at_ms)?,
            updated_at: timestamp(order.updated_at_ms)?,
            status,
            payment_id: non_empty(order.payment_id),
            failure_reason: non_empty(order.failure_reason)
                .filter(|_| status == OrderStatus::Failed),
            items: order
                .lines
                .into_iter()
                .map(|line| OrderLineJson {
                    sku: line.sku,
                    quantity: line.quantity,
                    unit_price_cents: line.unit_price_cents,
                    line_total_cents: line.line_total_cents,
                })
                .collect(),
            order_id: order.order_id,
            customer_id: order.customer_id,
            total_cents: order.total_cents,
            currency: order.currency,
            payment_method: order.payment_method,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    Unspecified,
    AwaitingVerification,
    Succeeded,
    Declined,
    Voided,
    Refunded,
}

impl From<payment::PaymentStatus> for PaymentStatus {
    fn from(status: payment::PaymentStatus) -> PaymentStatus {
        match status {
            payment::PaymentStatus::Unspecified => PaymentStatus::Unspecified,
            payment::PaymentStatus::AwaitingVerification => PaymentStatus::AwaitingVerification,
            payment::PaymentStatus::Succeeded => PaymentStatus::Succeeded,
            payment::PaymentStatus::Declined => PaymentStatus::Declined,
            payment::PaymentStatus::Voided => PaymentStatus::Voided,
            payment::PaymentStatus::Refunded => PaymentStatus::Refunded,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentJson {
    #[schema(format = Uuid)]
    pub payment_id: String,
    #[schema(format = Uuid)]
    pub order_id: String,
    pub status: PaymentStatus,
    /// The provider's reason, only when `DECLINED` (e.g. `card_declined`, `insufficient_funds`).
    pub decline_reason: Option<String>,
    pub amount_cents: i64,
    pub currency: String,
}

impl TryFrom<payment::Payment> for PaymentJson {
    type Error = InvalidReply;

    fn try_from(payment: payment::Payment) -> Result<PaymentJson, InvalidReply> {
        let status = payment::PaymentStatus::try_from(payment.status)
            .map_err(|_| InvalidReply(format!("unknown payment status {}", payment.status)))?
            .into();
        Ok(PaymentJson {
            status,
            decline_reason: non_empty(payment.decline_reason)
                .filter(|_| status == PaymentStatus::Declined),
            payment_id: payment.payment_id,
            order_id: payment.order_id,
            amount_cents: payment.amount_cents,
            currency: payment.currency,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductsJson {
    pub products: Vec<ProductJson>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductJson {
    pub sku: String,
    pub name: String,
    pub unit_price_cents: i64,
    pub currency: String,
    /// Free to reserve now; 0 for a SKU the inventory does not stock.
    pub available: i64,
}

/// The catalog in its order, each product with the stock available for it.
pub fn products(catalog: Vec<order::Product>, stock: Vec<StockLevel>) -> ProductsJson {
    let available: HashMap<String, i64> = stock
        .into_iter()
        .map(|level| (level.sku, level.available.max(0)))
        .collect();
    ProductsJson {
        products: catalog
            .into_iter()
            .map(|product| ProductJson {
                available: available.get(&product.sku).copied().unwrap_or(0),
                sku: product.sku,
                name: product.name,
                unit_price_cents: product.unit_price_cents,
                currency: product.currency,
            })
            .collect(),
    }
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

fn timestamp(ms: i64) -> Result<String, InvalidReply> {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .ok_or_else(|| InvalidReply(format!("timestamp out of range: {ms} ms")))
}

#[cfg(test)]
mod tests {
    use proto::inventory::v1::StockLevel;
    use proto::order::v1 as order;
    use proto::payment::v1 as payment;
    use serde_json::json;

    use super::{OrderJson, PaymentJson};

    fn pending_order() -> order::Order {
        order::Order {
            order_id: "0190f3f0-0000-7000-8000-000000000001".into(),
            customer_id: "cust-1".into(),
            status: order::OrderStatus::Pending.into(),
            lines: vec![order::PricedLine {
                sku: "SKU-1".into(),
                quantity: 2,
                unit_price_cents: 1250,
                line_total_cents: 2500,
            }],
            total_cents: 2500,
            currency: "USD".into(),
            payment_method: "pm_card_visa".into(),
            payment_id: String::new(),
            failure_reason: String::new(),
            correlation_id: "corr-1".into(),
            created_at_ms: 1_700_000_000_123,
            updated_at_ms: 1_700_000_001_000,
        }
    }

    #[test]
    fn a_pending_order_has_null_payment_id_and_failure_reason() {
        let json = serde_json::to_value(OrderJson::try_from(pending_order()).unwrap()).unwrap();
        assert_eq!(
            json,
            json!({
                "order_id": "0190f3f0-0000-7000-8000-000000000001",
                "customer_id": "cust-1",
                "status": "PENDING",
                "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250, "line_total_cents": 2500}],
                "total_cents": 2500,
                "currency": "USD",
                "payment_method": "pm_card_visa",
                "payment_id": null,
                "failure_reason": null,
                "created_at": "2023-11-14T22:13:20.123Z",
                "updated_at": "2023-11-14T22:13:21.000Z",
            })
        );
    }

    #[test]
    fn order_statuses_have_their_rest_names() {
        let cases = [
            (order::OrderStatus::Pending, "PENDING"),
            (order::OrderStatus::PaymentInitiated, "PAYMENT_INITIATED"),
            (order::OrderStatus::Completed, "COMPLETED"),
            (order::OrderStatus::Failed, "FAILED"),
        ];
        for (status, name) in cases {
            let order = order::Order {
                status: status.into(),
                ..pending_order()
            };
            let json = serde_json::to_value(OrderJson::try_from(order).unwrap()).unwrap();
            assert_eq!(json["status"], name);
        }
    }

    #[test]
    fn a_failed_order_shows_its_reason_and_payment() {
        let order = order::Order {
            status: order::OrderStatus::Failed.into(),
            payment_id: "pay-1".into(),
            failure_reason: "payment declined: insufficient funds".into(),
            ..pending_order()
        };
        let json = serde_json::to_value(OrderJson::try_from(order).unwrap()).unwrap();
        assert_eq!(json["payment_id"], "pay-1");
        assert_eq!(
            json["failure_reason"],
            "payment declined: insufficient funds"
        );
    }

    #[test]
    fn an_impossible_order_is_an_invalid_reply() {
        let unknown_status = order::Order {
            status: 99,
            ..pending_order()
        };
        assert!(OrderJson::try_from(unknown_status).is_err());
        let bad_time = order::Order {
            created_at_ms: i64::MAX,
            ..pending_order()
        };
        assert!(OrderJson::try_from(bad_time).is_err());
    }

    #[test]
    fn only_a_declined_payment_has_a_decline_reason() {
        let declined = payment::Payment {
            payment_id: "pay-1".into(),
            order_id: "order-1".into(),
            amount_cents: 2500,
            currency: "USD".into(),
            payment_method: "pm_card_declined".into(),
            status: payment::PaymentStatus::Declined.into(),
            decline_reason: "card_declined".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        let json = serde_json::to_value(PaymentJson::try_from(declined.clone()).unwrap()).unwrap();
        assert_eq!(
            json,
            json!({
                "payment_id": "pay-1",
                "order_id": "order-1",
                "status": "DECLINED",
                "decline_reason": "card_declined",
                "amount_cents": 2500,
                "currency": "USD",
            })
        );
        let succeeded = payment::Payment {
            status: payment::PaymentStatus::Succeeded.into(),
            decline_reason: String::new(),
            ..declined
        };
        let json = serde_json::to_value(PaymentJson::try_from(succeeded).unwrap()).unwrap();
        assert_eq!(json["status"], "SUCCEEDED");
        assert_eq!(json["decline_reason"], serde_json::Value::Null);
    }

    #[test]
    fn products_show_the_stock_available_and_zero_without_stock() {
        let product = |sku: &str| order::Product {
            sku: sku.into(),
            name: format!("name of {sku}"),
            unit_price_cents: 100,
            currency: "USD".into(),
        };
        let stock = vec![StockLevel {
            sku: "A".into(),
            available: 7,
            reserved: 2,
            committed: 1,
            ..Default::default()
        }];
        let json =
            serde_json::to_value(super::products(vec![product("A"), product("B")], stock)).unwrap();
        assert_eq!(
            json,
            json!({"products": [
                {"sku": "A", "name": "name of A", "unit_price_cents": 100, "currency": "USD", "available": 7},
                {"sku": "B", "name": "name of B", "unit_price_cents": 100, "currency": "USD", "available": 0},
            ]})
        );
    }
}
