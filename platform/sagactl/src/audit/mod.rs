//! The platform's consistency audit, through the services' own APIs:
//!
//! - every `COMPLETED` order has one succeeded payment of exactly its total, and a committed
//!   reservation of exactly its lines;
//! - every `FAILED` order has no money kept (its payment, if any, declined, voided or refunded)
//!   and no stock held (its reservation, if any, released);
//! - no saga is stuck past its deadline;
//! - stock is conserved per SKU: `received = available + reserved + committed + written_off`.
//!
//! Orders, payments and reservations are streamed by each service in order id order and
//! matched as they come (a merge join), so the audit holds a few pages in memory whatever the
//! number of orders. Orders still in flight are not judged: their saga is, by the stuck check.

mod merge_join;
mod rules;

use std::time::Duration;

use proto::inventory::v1 as inventory;
use proto::order::v1 as order;
use proto::payment::v1 as payment;
use proto::saga::v1 as saga;

use crate::{now_ms, AdminClient, Failure};
use merge_join::Sorted;
pub use rules::{check_order, check_stock, stuck, Summary, Violation};

/// Where the audit asks.
pub struct Targets {
    pub admin: AdminClient,
    pub admin_url: String,
    pub order_url: String,
    pub inventory_url: String,
    pub payment_url: String,
}

fn stream_error<'a>(service: &'a str, url: &'a str) -> impl Fn(tonic::Status) -> Failure + 'a {
    move |status| Failure::from_status(service, url, &status)
}

/// Runs every check; `found` is told each violation as soon as it is found.
pub async fn run(
    targets: &mut Targets,
    stuck_after: Duration,
    mut found: impl FnMut(&Violation),
) -> Result<Summary, Failure> {
    let mut summary = Summary::default();
    let mut report = |v: Violation, summary: &mut Summary| {
        summary.violations += 1;
        found(&v);
    };

    let order_channel = crate::connect("order-svc", &targets.order_url).await?;
    let payment_channel = crate::connect("payment-svc", &targets.payment_url).await?;
    let inventory_channel = crate::connect("inventory-svc", &targets.inventory_url).await?;
    let mut orders_client = order::order_service_client::OrderServiceClient::new(order_channel)
        .max_decoding_message_size(16 << 20);
    let mut payments_client =
        payment::payment_service_client::PaymentServiceClient::new(payment_channel);
    let mut inventory_client =
        inventory::inventory_service_client::InventoryServiceClient::new(inventory_channel);

    let (orders, payments, reservations) = tokio::try_join!(
        async {
            orders_client
                .list_orders(order::ListOrdersRequest::default())
                .await
                .map_err(stream_error("order-svc", &targets.order_url))
        },
        async {
            payments_client
                .list_payments(payment::ListPaymentsRequest::default())
                .await
                .map_err(stream_error("payment-svc", &targets.payment_url))
        },
        async {
            inventory_client
                .list_reservations(inventory::ListReservationsRequest::default())
                .await
                .map_err(stream_error("inventory-svc", &targets.inventory_url))
        },
    )?;
    let mut orders = Sorted::open(
        ("orders", "order-svc", &targets.order_url),
        orders.into_inner(),
        |o: &order::Order| &o.order_id,
    )
    .await?;
    let mut payments = Sorted::open(
        ("payments", "payment-svc", &targets.payment_url),
        payments.into_inner(),
        |p: &payment::Payment| &p.order_id,
    )
    .await?;
    let mut reservations = Sorted::open(
        ("reservations", "inventory-svc", &targets.inventory_url),
        reservations.into_inner(),
        |r: &inventory::Reservation| &r.order_id,
    )
    .await?;
    while let Some((id, order)) = orders.next().await? {
        let payment = payments.take(id).await?;
        let reservation = reservations.take(id).await?;
        for v in check_order(&order, payment.as_ref(), reservation.as_ref()) {
            report(v, &mut summary);
        }
    }
    payments.drain().await?;
    reservations.drain().await?;
    summary.orders = orders.count;
    summary.payments = payments.count;
    summary.reservations = reservations.count;

    let levels = inventory_client
        .get_stock(inventory::GetStockRequest::default())
        .await
        .map_err(stream_error("inventory-svc", &targets.inventory_url))?
        .into_inner()
        .levels;
    summary.skus = levels.len() as u64;
    for level in &levels {
        if let Some(v) = check_stock(level) {
            report(v, &mut summary);
        }
    }

    let mut page_token = String::new();
    loop {
        let page = targets
            .admin
            .list_sagas(saga::ListSagasRequest {
                stuck_only: true,
                stuck_after_seconds: stuck_after.as_secs().max(1),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .map_err(stream_error("the orchestrator", &targets.admin_url))?
            .into_inner();
        for saga in &page.sagas {
            summary.unfinished_sagas_stuck += 1;
            report(stuck(saga, now_ms()), &mut summary);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(summary)
}
