//! `order.v1.OrderService` over gRPC.

pub mod convert;

use proto::order::v1 as pb;
use proto::order::v1::order_service_server::OrderService;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use std::time::Duration;

use crate::orders::Orders;
use crate::watch::{StatusWatch, MAX_WAIT};

/// Orders read at a time by ListOrders.
const LIST_PAGE_SIZE: usize = 1000;

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
        if wait_while == pb::OrderStatus::Unspecified {
            return Ok(Response::new(convert::order(self.orders.get(id).await?)));
        }
        let wait = Duration::from_millis(u64::from(request.wait_timeout_ms)).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.watch.subscribe();
        loop {
            let order = convert::order(self.orders.get(id).await?);
            if order.status() != wait_while || !changes.changed(id.0, deadline).await {
                return Ok(Response::new(order));
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
