//! `POST /orders` and `GET /orders/{order_id}`.

use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::order::v1::{GetOrderRequest, OrderStatus};

use super::AppState;
use crate::backends::Service;
use crate::correlation::RequestContext;
use crate::error::ApiError;
use crate::json::{ApiJson, CreateOrderBody, OrderJson};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub(super) async fn create(
    State(state): State<AppState>,
    context: RequestContext,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrderBody>,
) -> Result<Response, ApiError> {
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY) {
        None => String::new(),
        Some(value) => value
            .to_str()
            .map_err(|_| {
                ApiError::BadRequest("the Idempotency-Key header must be ASCII".to_owned())
            })?
            .trim()
            .to_owned(),
    };
    let reply = state
        .backends
        .order()
        .create_order(context.grpc(body.into_proto(idempotency_key)))
        .await
        .map_err(|status| ApiError::from_grpc(Service::Order, status))?
        .into_inner();
    let order = reply.order.ok_or_else(|| {
        ApiError::invalid_reply(Service::Order, "CreateOrder replied without an order")
    })?;
    let order = OrderJson::try_from(order)
        .map_err(|problem| ApiError::invalid_reply(Service::Order, problem))?;

    let mut response = (StatusCode::CREATED, Json(&order)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/orders/{}", order.order_id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if reply.replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// `?wait_while=PENDING&timeout_ms=5000`: a long poll answering once the order's status is no
/// longer `wait_while`, or after `timeout_ms` (then with the order as it is).
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct WaitParams {
    wait_while: Option<String>,
    timeout_ms: Option<u32>,
}

pub(super) async fn get(
    State(state): State<AppState>,
    context: RequestContext,
    order_id: Result<Path<String>, PathRejection>,
    params: Result<Query<WaitParams>, QueryRejection>,
) -> Result<Json<OrderJson>, ApiError> {
    let Path(order_id) = order_id.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let order_id = uuid::Uuid::parse_str(&order_id)
        .map_err(|_| ApiError::BadRequest(format!("order id `{order_id}` is not a UUID")))?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let wait_while_status = match params.wait_while.as_deref() {
        None => OrderStatus::Unspecified,
        Some(name) => OrderStatus::from_str_name(&format!("ORDER_STATUS_{name}"))
            .filter(|s| *s != OrderStatus::Unspecified)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "wait_while must be one of PENDING, PAYMENT_INITIATED, COMPLETED, FAILED; got `{name}`"
                ))
            })? ,
    };
    // The wait ends well within the gateway's own request timeout.
    let longest = state
        .request_timeout
        .saturating_sub(Duration::from_millis(500));
    let wait_timeout_ms = params
        .timeout_ms
        .unwrap_or(u32::try_from(longest.as_millis()).unwrap_or(u32::MAX))
        .min(u32::try_from(longest.as_millis()).unwrap_or(u32::MAX));
    let order = state
        .backends
        .order()
        .get_order(context.grpc(GetOrderRequest {
            order_id: order_id.to_string(),
            wait_while_status: wait_while_status as i32,
            wait_timeout_ms,
        }))
        .await
        .map_err(|status| ApiError::from_grpc(Service::Order, status))?
        .into_inner();
    let order = OrderJson::try_from(order)
        .map_err(|problem| ApiError::invalid_reply(Service::Order, problem))?;
    Ok(Json(order))
}
