//! order-svc: orders and the catalog. Prices and stores orders, publishes `OrderCreated`
//! through the outbox, and moves orders through their statuses on the saga's commands.

pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod handler;
pub mod orders;
pub mod payments;
pub mod store;
pub mod watch;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use messaging::{Consumer, Outbox, Relay};
use proto::order::v1::order_service_server::OrderServiceServer;
use runtime::shutdown::cancel_when_done;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
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

/// How long running tasks get to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct App {
    config: Config,
    pool: PgPool,
    listener: TcpListener,
    grpc_addr: SocketAddr,
    payments: PaymentMethods,
}

impl App {
    /// Connects to (and migrates) the database, creates the topics and binds the gRPC
    /// listener. payment-svc is connected to on first use.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let pool = runtime::database::connect(
            &config.database_url,
            config.database_max_connections,
            &[&messaging::MIGRATOR, &MIGRATOR],
        )
        .await?;
        config.kafka.ensure_topics().await?;
        let payments =
            PaymentMethods::connect_lazy(&config.payment_svc_url, config.payment_svc_timeout())?;
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {}", config.grpc_addr))?;
        let grpc_addr = listener.local_addr()?;
        Ok(App {
            config,
            pool,
            listener,
            grpc_addr,
            payments,
        })
    }

    /// The address the gRPC server listens on.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves gRPC, relays the outbox and consumes `order.commands` until `cancel` or until
    /// one of them fails, then gives them [`SHUTDOWN_GRACE`] to finish.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        // A failing task stops this app, not whatever else shares the caller's token.
        let cancel = cancel.child_token();
        let App {
            config,
            pool,
            listener,
            grpc_addr,
            payments,
        } = self;
        let outbox = Outbox::new(SERVICE, config.kafka.clone());
        let commands_outbox = outbox.clone();
        let relay = Relay::for_outbox(pool.clone(), &outbox)?;
        let consumer = Consumer::new(
            &config.kafka,
            SERVICE,
            &[proto::topics::ORDER_COMMANDS],
            pool.clone(),
            outbox.clone(),
        );
        let watch = watch::StatusWatch::default();
        let watch_task = watch.clone().run(pool.clone(), cancel.clone());
        let health = runtime::health::serve::<OrderServiceServer<OrderGrpc>>(
            vec![
                runtime::health::Probe::database(pool.clone()),
                config.kafka.probe()?,
            ],
            cancel.clone(),
        )
        .await;
        let service =
            OrderServiceServer::new(OrderGrpc::new(Orders::new(pool, outbox, payments), watch));
        let reflection = runtime::grpc::reflection()?;
        let reflection_v1alpha = runtime::grpc::reflection_v1alpha()?;

        let mut tasks = JoinSet::new();
        let server = tonic::transport::Server::builder()
            .layer(telemetry::grpc::ServerLayer)
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(service)
            .serve_with_incoming_shutdown(
                runtime::grpc::incoming(listener),
                cancel.clone().cancelled_owned(),
            );
        tasks.spawn(cancel_when_done(cancel.clone(), async move {
            server.await.context("gRPC server")
        }));
        let relay_cancel = cancel.clone();
        tasks.spawn(cancel_when_done(cancel.clone(), async move {
            relay.run(relay_cancel).await;
            Ok(())
        }));
        tasks.spawn(cancel_when_done(
            cancel.clone(),
            consumer.run(OrderCommands::new(commands_outbox), cancel.clone()),
        ));
        tasks.spawn(async move {
            watch_task.await;
            Ok(())
        });
        tracing::info!(%grpc_addr, "listening");

        cancel.cancelled().await;
        runtime::shutdown::drain(tasks, SHUTDOWN_GRACE).await
    }
}
