//! `order.v1.OrderService` over gRPC.

use proto::order::v1 as pb;
use proto::order::v1::order_service_server::OrderService;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use std::time::Duration;

use crate::convert;
use crate::error::Error;
use crate::orders::Orders;
use crate::watch::{Changed, StatusWatch, MAX_WAIT};

/// Orders read at a time by ListOrders.
const LIST_PAGE_SIZE: usize = 1000;
/// ListCustomerOrders' page size when the request gives none, and its largest.
const CUSTOMER_PAGE_SIZE: u32 = 20;
const MAX_CUSTOMER_PAGE_SIZE: u32 = 100;

pub struct OrderGrpc {
    orders: Orders,
    watch: StatusWatch,
}

impl OrderGrpc {
    pub fn new(orders: Orders, watch: StatusWatch) -> Self {
        Self { orders, watch }
    }
}

#[tonic::async_trait]
impl OrderService for OrderGrpc {
    type ListOrdersStream = runtime::grpc::ServerStream<pb::Order>;

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<Self::ListOrdersStream>, Status> {
        let statuses = convert::status_filter(&request.get_ref().statuses)?;
        let orders = self.orders.clone();
        Ok(Response::new(runtime::grpc::keyset_stream(
            LIST_PAGE_SIZE,
            move |after| {
                let orders = orders.clone();
                let statuses = statuses.clone();
                async move {
                    let page = orders.list_page(after, &statuses, LIST_PAGE_SIZE).await?;
                    Ok(page
                        .into_iter()
                        .map(|o| (o.id, convert::order(o)))
                        .collect())
                }
            },
        )))
    }

    async fn list_customer_orders(
        &self,
        request: Request<pb::ListCustomerOrdersRequest>,
    ) -> Result<Response<pb::ListCustomerOrdersResponse>, Status> {
        let request = request.into_inner();
        if request.customer_id.is_empty() {
            return Err(Status::invalid_argument("customer_id is required"));
        }
        let page_size = match request.page_size {
            0 => CUSTOMER_PAGE_SIZE,
            n if n <= MAX_CUSTOMER_PAGE_SIZE => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "page_size must be 1 to {MAX_CUSTOMER_PAGE_SIZE}, got {n}"
                )))
            }
        } as usize;
        let before = match request.page_token.as_str() {
            "" => None,
            token => Some(convert::page_token(token)?),
        };
        // One more than a page, to know whether another page follows.
        let mut orders = self
            .orders
            .list_for_customer(&request.customer_id, before, page_size + 1)
            .await?;
        let next_page_token = if orders.len() > page_size {
            orders.truncate(page_size);
            orders
                .last()
                .map(|o| convert::next_page_token(o.created_at, o.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListCustomerOrdersResponse {
            orders: orders.into_iter().map(convert::order).collect(),
            next_page_token,
        }))
    }

    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let context = convert::message_context(request.metadata());
        let span = tracing::info_span!(
            "order.create",
            correlation_id = %context.correlation_id,
            order_id = tracing::field::Empty,
        );
        async {
            let order_request = convert::order_request(request.into_inner())?;
            let placed = self.orders.place(order_request, &context).await?;
            tracing::Span::current().record("order_id", tracing::field::display(placed.order.id));
            let mut response = Response::new(pb::CreateOrderResponse {
                order: Some(convert::order(placed.order)),
                replayed: placed.replayed,
            });
            if let Ok(value) = MetadataValue::try_from(context.correlation_id.as_str()) {
                response
                    .metadata_mut()
                    .insert(convert::CORRELATION_ID, value);
            }
            Ok(response)
        }
        .instrument(span)
        .await
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let request = request.into_inner();
        let id = convert::order_id(&request.order_id)?;
        let wait_while = pb::OrderStatus::try_from(request.wait_while_status)
            .map_err(|_| Status::invalid_argument("invalid wait_while_status"))?;
        let waits = wait_while != pb::OrderStatus::Unspecified;
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(request.wait_timeout_ms)).min(MAX_WAIT);
        // Subscribed before the first read, so that a change between the read and the wait
        // is not missed. A change's notification carries what changed, so the order is read
        // again only when one does not (see `watch`).
        let mut changes = waits.then(|| self.watch.subscribe(id.0));
        // A long poll on an order placed here lately starts from it as kept, not read.
        let kept = waits.then(|| self.watch.recent().get(id.0)).flatten();
        let mut order = match kept {
            Some(order) => order,
            None => self.orders.get(id).await?,
        };
        if !request.customer_id.is_empty() && order.customer_id != request.customer_id {
            // Word for word the answer for an order that does not exist.
            return Err(Error::NotFound(format!("order {id} not found")).into());
        }
        loop {
            let answer = convert::order(order.clone());
            let Some(changes) = changes.as_mut().filter(|_| answer.status() == wait_while) else {
                return Ok(Response::new(answer));
            };
            match changes.changed(deadline).await {
                Changed::TimedOut => return Ok(Response::new(answer)),
                Changed::To(change) => {
                    change.apply(&mut order);
                }
                Changed::Unknown => order = self.orders.get(id).await?,
            }
        }
    }

    async fn list_products(
        &self,
        _request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let products = self.orders.products().await?;
        Ok(Response::new(pb::ListProductsResponse {
            products: products.into_iter().map(convert::product).collect(),
        }))
    }
}
