//! order-svc: orders and the catalog. Prices and stores orders, publishes `OrderCreated`
//! through the outbox, and moves orders through their statuses on the saga's commands.

pub mod config;
pub mod convert;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod handler;
pub mod orders;
pub mod payments;
pub mod store;
pub mod watch;

use std::net::SocketAddr;

use messaging::service::ServiceExt as _;
use messaging::Outbox;
use proto::order::v1::order_service_server::OrderServiceServer;
use runtime::Service;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

use crate::grpc::OrderGrpc;
use crate::handler::OrderCommands;
use crate::orders::Orders;
use crate::payments::PaymentMethods;

/// The name of this service: its consumer group and the source of its messages.
pub const SERVICE: &str = "order-svc";

/// This service's own migrations (versions from 100), run after [`messaging::MIGRATOR`].
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub struct App {
    config: Config,
    service: Service,
    outbox: Outbox,
    payments: PaymentMethods,
}

impl App {
    /// Connects to (and migrates) the database, creates the topics and binds the gRPC
    /// listener. payment-svc is connected to on first use.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let (service, outbox) = messaging::service::start(
            SERVICE,
            &config.database,
            &MIGRATOR,
            config.grpc.addr,
            &config.kafka,
        )
        .await?;
        let payments = PaymentMethods::connect_lazy(
            &config.payment_svc_url,
            config.payment_svc_timeout(),
            config.payment_method_cache(),
        )?;
        Ok(App {
            config,
            service,
            outbox,
            payments,
        })
    }

    /// The bound gRPC address (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.service.grpc_addr()
    }

    pub fn pool(&self) -> &PgPool {
        self.service.pool()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves gRPC, relays the outbox, consumes `order.commands` and wakes the requests that
    /// wait for a status until `cancel` or until one of them fails, then gives them
    /// [`runtime::shutdown::GRACE`] to finish.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App {
            config: _,
            service,
            outbox,
            payments,
        } = self;
        let pool = service.pool().clone();
        let watch = watch::StatusWatch::default();
        let orders = Orders::new(
            pool.clone(),
            outbox.clone(),
            payments,
            watch.recent().clone(),
        );
        service
            .grpc(OrderServiceServer::new(OrderGrpc::new(
                orders,
                watch.clone(),
            )))
            .relay(&outbox)?
            .consumer(
                &[proto::topics::ORDER_COMMANDS],
                &outbox,
                OrderCommands::new(outbox.clone()),
            )
            .task("order status watch", |cancel| watch.run(pool, cancel))
            .run(cancel, runtime::shutdown::GRACE)
            .await
    }
}
