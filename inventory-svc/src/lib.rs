//! inventory-svc: stock and reservations of the order saga.
//!
//! - consumes `inventory.commands` (ReserveInventory, CommitInventory, ReleaseInventory) and
//!   replies on `saga.replies`, through the outbox, in one transaction per batch;
//! - serves `inventory.v1.InventoryService` over gRPC (stock levels, SetStock, reservations);
//! - releases reservations past their time to live.

pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod handler;
pub mod store;
pub mod sweep;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use messaging::{Consumer, Outbox, Relay};
use runtime::shutdown::cancel_when_done;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use handler::CommandHandler;

/// Name of the service: consumer group and `source` of the messages it sends.
pub const SERVICE: &str = "inventory-svc";

/// How long running tasks may take to finish once shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The service's own migrations (run after [`messaging::MIGRATOR`]).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The service, connected and bound, ready to run.
pub struct App {
    config: Config,
    pool: PgPool,
    listener: TcpListener,
    outbox: Outbox,
}

impl App {
    /// Connects to (and migrates) the database, creates the topics, binds the gRPC listener.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let pool = runtime::database::connect(
            &config.database_url,
            config.database_max_connections,
            &[&messaging::MIGRATOR, &MIGRATOR],
        )
        .await?;
        config.kafka.ensure_topics().await?;
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {}", config.grpc_addr))?;
        let outbox = Outbox::new(SERVICE, config.kafka.clone());
        Ok(App {
            config,
            pool,
            listener,
            outbox,
        })
    }

    /// The bound gRPC address (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.grpc_addr)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
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
        let addr = self.grpc_addr();
        let handler = self.handler();
        let App {
            config,
            pool,
            listener,
            outbox,
        } = self;
        let mut tasks = JoinSet::new();

        let api = grpc::InventoryApi::new(pool.clone()).into_server();
        let health = runtime::health::serve::<grpc::InventoryServiceServer<grpc::InventoryApi>>(
            vec![
                runtime::health::Probe::database(pool.clone()),
                config.kafka.probe()?,
            ],
            cancel.clone(),
        )
        .await;
        let reflection = runtime::grpc::reflection()?;
        let reflection_v1alpha = runtime::grpc::reflection_v1alpha()?;
        let shutdown = cancel.clone().cancelled_owned();
        tasks.spawn(cancel_when_done(cancel.clone(), async move {
            tonic::transport::Server::builder()
                .layer(telemetry::grpc::ServerLayer)
                .add_service(health)
                .add_service(reflection)
                .add_service(reflection_v1alpha)
                .add_service(api)
                .serve_with_incoming_shutdown(runtime::grpc::incoming(listener), shutdown)
                .await
                .context("gRPC server")
        }));

        let relay = Relay::for_outbox(pool.clone(), &outbox)?;
        let relay_cancel = cancel.clone();
        tasks.spawn(cancel_when_done(cancel.clone(), async move {
            relay.run(relay_cancel).await;
            Ok(())
        }));

        let consumer = Consumer::new(
            &config.kafka,
            SERVICE,
            &[proto::topics::INVENTORY_COMMANDS],
            pool.clone(),
            outbox,
        );
        tasks.spawn(cancel_when_done(
            cancel.clone(),
            consumer.run(handler, cancel.clone()),
        ));

        let sweep_cancel = cancel.clone();
        let interval = config.sweep_interval();
        tasks.spawn(cancel_when_done(cancel.clone(), async move {
            sweep::run(pool, interval, sweep_cancel).await;
            Ok(())
        }));

        tracing::info!(%addr, "listening");
        cancel.cancelled().await;
        runtime::shutdown::drain(tasks, SHUTDOWN_GRACE).await
    }
}
