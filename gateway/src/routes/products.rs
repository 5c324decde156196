//! `GET /products`: the order service's catalog with the inventory's stock.

use axum::extract::State;
use axum::Json;
use proto::inventory::v1::GetStockRequest;
use proto::order::v1::ListProductsRequest;

use super::AppState;
use crate::backends::Service;
use crate::correlation::RequestContext;
use crate::error::ApiError;
use crate::json::{self, ProductsJson};

/// The catalog, each product with the stock available now. Open to anyone.
#[utoipa::path(
    get,
    path = "/products",
    tag = "catalog",
    operation_id = "listProducts",
    responses((status = 200, description = "The catalog.", body = ProductsJson))
)]
pub(super) async fn list(
    State(state): State<AppState>,
    context: RequestContext,
) -> Result<Json<ProductsJson>, ApiError> {
    let mut order = state.backends.order();
    let mut inventory = state.backends.inventory();
    // Every SKU's stock, asked at the same time as the catalog.
    let (catalog, stock) = tokio::join!(
        order.list_products(context.grpc(ListProductsRequest {})),
        inventory.get_stock(context.grpc(GetStockRequest { skus: Vec::new() })),
    );
    let catalog = catalog.map_err(|status| ApiError::from_grpc(Service::Order, status))?;
    let stock = stock.map_err(|status| ApiError::from_grpc(Service::Inventory, status))?;
    Ok(Json(json::products(
        catalog.into_inner().products,
        stock.into_inner().levels,
    )))
}
