//! The `inventory.v1.InventoryService` gRPC API: stock levels for operators and reservations.

use proto::inventory::v1 as pb;
use proto::inventory::v1::inventory_service_server::InventoryService;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::convert;
use crate::domain::{Sku, MAX_AVAILABLE};
use crate::error::Error;
use crate::store;

pub use proto::inventory::v1::inventory_service_server::InventoryServiceServer;

/// Longest reason of a write-off.
const MAX_REASON_CHARS: usize = 1000;

/// Reservations read at a time by ListReservations.
const LIST_PAGE_SIZE: usize = 1000;

#[derive(Clone, Debug)]
pub struct InventoryApi {
    pool: PgPool,
}

impl InventoryApi {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn into_server(self) -> InventoryServiceServer<Self> {
        InventoryServiceServer::new(self)
    }

    async fn stock_levels(
        &self,
        request: pb::GetStockRequest,
    ) -> Result<pb::GetStockResponse, Error> {
        let mut conn = self.pool.acquire().await?;
        let levels = if request.skus.is_empty() {
            store::stock::all(&mut conn).await?
        } else {
            // Checked before they reach PostgreSQL, which refuses some (a NUL byte); no such
            // SKU can exist.
            for (i, sku) in request.skus.iter().enumerate() {
                Sku::parse(sku)
                    .map_err(|reason| Error::invalid("skus", format!("[{i}] {reason}")))?;
            }
            let mut wanted = request.skus;
            wanted.sort();
            wanted.dedup();
            let levels = store::stock::some(&mut conn, &wanted).await?;
            let unknown: Vec<&str> = wanted
                .iter()
                .filter(|sku| !levels.iter().any(|l| &l.sku == *sku))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                return Err(Error::NotFound(format!(
                    "unknown SKU: {}",
                    unknown.join(", ")
                )));
            }
            levels
        };
        Ok(pb::GetStockResponse {
            levels: levels.into_iter().map(convert::stock_level).collect(),
        })
    }

    async fn set_stock_level(&self, request: pb::SetStockRequest) -> Result<pb::StockLevel, Error> {
        let sku = convert::sku(&request.sku)?;
        if !(0..=MAX_AVAILABLE).contains(&request.available) {
            return Err(Error::invalid(
                "available",
                format!(
                    "must be between 0 and {MAX_AVAILABLE}, got {}",
                    request.available
                ),
            ));
        }
        let level = store::stock::set(&self.pool, &sku, request.available).await?;
        tracing::info!(sku = %level.sku, available = level.available, "stock set");
        Ok(convert::stock_level(level))
    }

    async fn write_off(
        &self,
        request: pb::WriteOffStockRequest,
    ) -> Result<pb::WriteOffStockResponse, Error> {
        let sku = convert::sku(&request.sku)?;
        if !(1..=MAX_AVAILABLE).contains(&request.quantity) {
            return Err(Error::invalid(
                "quantity",
                format!(
                    "must be between 1 and {MAX_AVAILABLE}, got {}",
                    request.quantity
                ),
            ));
        }
        let reason = request.reason.trim();
        if reason.is_empty() {
            return Err(Error::invalid("reason", "is required"));
        }
        runtime::text::free_text(reason, MAX_REASON_CHARS)
            .map_err(|problem| Error::invalid("reason", problem))?;
        let mut tx = self.pool.begin().await?;
        let (level, released) = match store::stock::write_off(&mut tx, &sku, request.quantity, reason).await? {
            Ok(done) => done,
            Err(store::stock::WriteOffRefused::UnknownSku) => {
                return Err(Error::NotFound(format!("unknown SKU: {}", sku.as_str())))
            }
            Err(store::stock::WriteOffRefused::NotEnough { available, reserved }) => {
                return Err(Error::invalid(
                    "quantity",
                    format!(
                        "only {} units of {} can be written off ({available} available, {reserved} reserved; committed units are sold)",
                        available + reserved,
                        sku.as_str()
                    ),
                ))
            }
        };
        tx.commit().await?;
        tracing::warn!(sku = %level.sku, quantity = request.quantity, reason, released_orders = ?released, "stock written off");
        Ok(pb::WriteOffStockResponse {
            level: Some(convert::stock_level(level)),
            released_order_ids: released.iter().map(Uuid::to_string).collect(),
        })
    }

    async fn reservation(
        &self,
        request: pb::GetReservationRequest,
    ) -> Result<pb::Reservation, Error> {
        let order_id = convert::order_id(&request.order_id)?;
        let mut conn = self.pool.acquire().await?;
        let reservation = store::reservations::find(&mut conn, order_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no reservation for order {order_id}")))?;
        Ok(convert::reservation(reservation))
    }
}

#[tonic::async_trait]
impl InventoryService for InventoryApi {
    type ListReservationsStream = runtime::grpc::ServerStream<pb::Reservation>;

    async fn list_reservations(
        &self,
        _request: Request<pb::ListReservationsRequest>,
    ) -> Result<Response<Self::ListReservationsStream>, Status> {
        Ok(Response::new(runtime::grpc::table_stream(
            crate::SERVICE,
            self.pool.clone(),
            LIST_PAGE_SIZE,
            |pool, after, limit| async move {
                let mut conn = pool.acquire().await?;
                store::reservations::list_page(&mut conn, after, limit).await
            },
            |r| (r.order_id, convert::reservation(r)),
        )))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        Ok(Response::new(
            self.stock_levels(request.into_inner()).await?,
        ))
    }

    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::StockLevel>, Status> {
        Ok(Response::new(
            self.set_stock_level(request.into_inner()).await?,
        ))
    }

    async fn write_off_stock(
        &self,
        request: Request<pb::WriteOffStockRequest>,
    ) -> Result<Response<pb::WriteOffStockResponse>, Status> {
        Ok(Response::new(self.write_off(request.into_inner()).await?))
    }

    async fn get_reservation(
        &self,
        request: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        Ok(Response::new(self.reservation(request.into_inner()).await?))
    }
}
