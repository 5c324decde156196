//! `order.v1.OrderService` over gRPC.

pub mod convert;

use proto::order::v1 as pb;
use proto::order::v1::order_service_server::OrderService;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::orders::Orders;

pub struct OrderGrpc {
    orders: Orders,
}

impl OrderGrpc {
    pub fn new(orders: Orders) -> Self {
        Self { orders }
    }
}

#[tonic::async_trait]
impl OrderService for OrderGrpc {
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let context = convert::message_context(request.metadata());
        let span = tracing::info_span!("create_order", correlation_id = %context.correlation_id);
        async {
            let order_request = convert::order_request(request.into_inner())?;
            let placed = self.orders.place(order_request, &context).await?;
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
        let id = convert::order_id(&request.get_ref().order_id)?;
        let order = self.orders.get(id).await?;
        Ok(Response::new(convert::order(order)))
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
