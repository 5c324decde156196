//! `POST /orders` and `GET /orders/{order_id}`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::order::v1::GetOrderRequest;

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

pub(super) async fn get(
    State(state): State<AppState>,
    context: RequestContext,
    order_id: Result<Path<String>, PathRejection>,
) -> Result<Json<OrderJson>, ApiError> {
    let Path(order_id) = order_id.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let order_id = uuid::Uuid::parse_str(&order_id)
        .map_err(|_| ApiError::BadRequest(format!("order id `{order_id}` is not a UUID")))?;
    let order = state
        .backends
        .order()
        .get_order(context.grpc(GetOrderRequest {
            order_id: order_id.to_string(),
        }))
        .await
        .map_err(|status| ApiError::from_grpc(Service::Order, status))?
        .into_inner();
    let order = OrderJson::try_from(order)
        .map_err(|problem| ApiError::invalid_reply(Service::Order, problem))?;
    Ok(Json(order))
}
