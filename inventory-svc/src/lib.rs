//! inventory-svc: stock and reservations of the order saga.
//!
//! - consumes `inventory.commands` (ReserveInventory, CommitInventory, ReleaseInventory) and
//!   replies on `saga.replies`, through the outbox, in one transaction per batch;
//! - serves `inventory.v1.InventoryService` over gRPC (stock levels, SetStock, reservations);
//! - releases reservations past their time to live.

pub mod config;
pub mod convert;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod handler;
pub mod store;
pub mod sweep;

use std::net::SocketAddr;

use messaging::service::ServiceExt as _;
use messaging::Outbox;
use runtime::Service;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use handler::CommandHandler;

/// Name of the service: consumer group and `source` of the messages it sends.
pub const SERVICE: &str = "inventory-svc";

/// The service's own migrations (run after [`messaging::MIGRATOR`]).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The service, connected and bound, ready to run.
pub struct App {
    config: Config,
    service: Service,
    outbox: Outbox,
}

impl App {
    /// Connects to (and migrates) the database, creates the topics, binds the gRPC listener.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let (service, outbox) = messaging::service::start(
            SERVICE,
            &config.database,
            &MIGRATOR,
            config.grpc.addr,
            &config.kafka,
        )
        .await?;
        Ok(App {
            config,
            service,
            outbox,
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

    /// The handler of `inventory.commands` the consumer runs, for tests to call directly.
    pub fn handler(&self) -> CommandHandler {
        CommandHandler::new(self.outbox.clone(), self.config.reservation_ttl())
    }

    /// Serves gRPC, consumes commands, publishes the outbox and sweeps expired reservations
    /// until `cancel` (or until one of them fails, which stops the rest).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let handler = self.handler();
        let App {
            config,
            service,
            outbox,
        } = self;
        let pool = service.pool().clone();
        let interval = config.sweep_interval();
        service
            .grpc(grpc::InventoryApi::new(pool.clone()).into_server())
            .relay(&outbox)?
            .consumer(&[proto::topics::INVENTORY_COMMANDS], &outbox, handler)
            .task("reservation sweep", |cancel| {
                sweep::run(pool, interval, cancel)
            })
            .run(cancel, runtime::shutdown::GRACE)
            .await
    }
}
