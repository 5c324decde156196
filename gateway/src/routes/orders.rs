//! `POST /orders`, `GET /orders` and `GET /orders/{order_id}`: a customer's own orders only.

use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::order::v1::{GetOrderRequest, ListCustomerOrdersRequest, OrderStatus};

use super::AppState;
use crate::backends::Service;
use crate::correlation::RequestContext;
use crate::error::{ApiError, ErrorDocument};
use crate::identity::CustomerId;
use crate::json::{ApiJson, CreateOrderBody, OrderJson, OrdersPageJson};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest long poll a client may ask for (order-svc's limit).
const MAX_WAIT_MS: u32 = 30_000;
/// Orders in a page of `GET /orders` when the client does not say, and at most.
const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

/// Place an order for the token's customer.
///
/// The order service prices the items from its catalog and stores the order as `PENDING`; the
/// saga then reserves the stock and initiates the payment (poll the order to follow it).
#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    operation_id = "createOrder",
    security(("customer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, max_length = 255,
         description = "Makes a retried request return the order the first one placed (then \
                        with `Idempotent-Replayed: true`); the same key with another body is a 409."),
    ),
    request_body = CreateOrderBody,
    responses(
        (status = 201, description = "Placed (or replayed for its Idempotency-Key).", body = OrderJson,
         headers(
             ("Location" = String, description = "`/orders/{order_id}`"),
             ("Idempotent-Replayed" = Option<String>, description = "`true` when the Idempotency-Key matched an order placed earlier"),
         )),
        (status = 400, description = "Malformed JSON or header.", body = ErrorDocument),
        (status = 403, description = "`customer_id` is not the token's customer.", body = ErrorDocument),
        (status = 409, description = "The Idempotency-Key was used for a different request.", body = ErrorDocument),
        (status = 413, description = "The body is larger than 64 KiB.", body = ErrorDocument),
        (status = 415, description = "The body is not `application/json`.", body = ErrorDocument),
        (status = 422, description = "Invalid fields, an unknown SKU, or a payment method the provider refuses.", body = ErrorDocument),
        (status = 429, description = "Too many requests; try again later.", body = ErrorDocument),
    )
)]
pub(super) async fn create(
    State(state): State<AppState>,
    customer: CustomerId,
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
    if body.customer_id.as_ref().is_some_and(|c| *c != customer.0) {
        return Err(ApiError::Forbidden(
            "customer_id is not the customer of the token; leave it out".to_owned(),
        ));
    }
    let reply = state
        .backends
        .order()
        .create_order(context.grpc(body.into_proto(customer.0, idempotency_key)))
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

/// A status to wait on (any but `UNSPECIFIED`).
#[derive(utoipa::ToSchema)]
#[schema(as = WaitStatus)]
#[allow(dead_code, non_camel_case_types, clippy::upper_case_acronyms)] // the schema of `wait_while` only
enum WaitStatus {
    PENDING,
    PAYMENT_INITIATED,
    COMPLETED,
    FAILED,
}

/// `?wait_while=PENDING&timeout_ms=5000`: a long poll answering once the order's status is no
/// longer `wait_while`, or after `timeout_ms` (then with the order as it is).
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct WaitParams {
    /// Answer once the order's status is no longer this one (or after `timeout_ms`).
    #[param(value_type = Option<WaitStatus>, inline)]
    wait_while: Option<String>,
    /// How long to wait at most, in milliseconds (also bounded by the gateway's request
    /// timeout); without `wait_while` it is ignored.
    #[param(minimum = 0, maximum = 30000)]
    timeout_ms: Option<u32>,
}

/// One of the customer's orders, optionally once its status has moved on (a long poll).
#[utoipa::path(
    get,
    path = "/orders/{order_id}",
    tag = "orders",
    operation_id = "getOrder",
    security(("customer" = [])),
    params(
        ("order_id" = String, Path, format = Uuid, description = "The order's id."),
        WaitParams,
    ),
    responses(
        (status = 200, description = "The order.", body = OrderJson),
        (status = 400, description = "The id is not a UUID, or the query is invalid.", body = ErrorDocument),
        (status = 404, description = "No such order of this customer (another customer's order is not found either).", body = ErrorDocument),
    )
)]
pub(super) async fn get(
    State(state): State<AppState>,
    customer: CustomerId,
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
            })?,
    };
    if params.timeout_ms.is_some_and(|ms| ms > MAX_WAIT_MS) {
        return Err(ApiError::BadRequest(format!(
            "timeout_ms must be at most {MAX_WAIT_MS}"
        )));
    }
    // The wait ends well within the gateway's own request timeout.
    let longest = state
        .request_timeout
        .saturating_sub(Duration::from_millis(500));
    let longest = u32::try_from(longest.as_millis()).unwrap_or(u32::MAX);
    let wait_timeout_ms = params.timeout_ms.unwrap_or(longest).min(longest);
    let order = state
        .backends
        .order()
        .get_order(context.grpc(GetOrderRequest {
            order_id: order_id.to_string(),
            wait_while_status: wait_while_status as i32,
            wait_timeout_ms,
            customer_id: customer.0,
        }))
        .await
        .map_err(|status| ApiError::from_grpc(Service::Order, status))?
        .into_inner();
    let order = OrderJson::try_from(order)
        .map_err(|problem| ApiError::invalid_reply(Service::Order, problem))?;
    Ok(Json(order))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct PageParams {
    /// Orders in the page: 1 to 100, 20 when not given.
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// The previous page's `next_cursor`, as it was given.
    #[param(pattern = r"^(0|[1-9][0-9]{0,15})_[0-9a-f]{32}$")]
    cursor: Option<String>,
}

/// The customer's own orders, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/orders",
    tag = "orders",
    operation_id = "listOrders",
    security(("customer" = [])),
    params(PageParams),
    responses(
        (status = 200, description = "A page of orders; `next_cursor` leads to the next.", body = OrdersPageJson),
        (status = 400, description = "The query is invalid (an empty cursor included).", body = ErrorDocument),
        (status = 422, description = "The cursor is not one this API gave.", body = ErrorDocument),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    customer: CustomerId,
    context: RequestContext,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<OrdersPageJson>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE}, got {limit}"
        )));
    }
    if params.cursor.as_deref() == Some("") {
        return Err(ApiError::BadRequest(
            "cursor must be a next_cursor this API gave; leave it out for the first page"
                .to_owned(),
        ));
    }
    let reply = state
        .backends
        .order()
        .list_customer_orders(context.grpc(ListCustomerOrdersRequest {
            customer_id: customer.0,
            page_size: limit,
            page_token: params.cursor.unwrap_or_default(),
        }))
        .await
        .map_err(|status| ApiError::from_grpc(Service::Order, status))?
        .into_inner();
    let orders = reply
        .orders
        .into_iter()
        .map(OrderJson::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|problem| ApiError::invalid_reply(Service::Order, problem))?;
    Ok(Json(OrdersPageJson {
        orders,
        next_cursor: Some(reply.next_page_token).filter(|t| !t.is_empty()),
    }))
}
