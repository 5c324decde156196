//! payment-svc: a payment per order, in its own database. It records the payment the saga asks
//! for (`ChargePayment`), lets the client verify it over gRPC with a pluggable provider, and
//! voids or refunds it when the saga compensates. Every outcome goes to the orchestrator on
//! `saga.replies` through the transactional outbox.

pub mod config;
pub mod error;
pub mod grpc;
pub mod handler;
pub mod payment;
pub mod provider;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use messaging::{Consumer, Outbox, Relay};
use proto::payment::v1::payment_service_server::PaymentServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

use crate::grpc::PaymentGrpc;
use crate::handler::PaymentCommands;
use crate::provider::PaymentProvider;

/// The service's name: its consumer group and the source of its messages.
pub const SERVICE: &str = "payment-svc";

/// How long running work may take to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// This service's migrations (versions from 100), run after [`messaging::MIGRATOR`].
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub struct App {
    config: Config,
    pool: PgPool,
    listener: TcpListener,
    provider: Arc<dyn PaymentProvider>,
}

impl App {
    /// Connects to and migrates the database, creates the topics and binds the gRPC listener.
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
        let provider = config.payment_provider.build();
        Ok(App {
            config,
            pool,
            listener,
            provider,
        })
    }

    /// Replaces the configured payment provider.
    pub fn with_provider(mut self, provider: Arc<dyn PaymentProvider>) -> Self {
        self.provider = provider;
        self
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        // The bound address, which differs from the configured one for port 0.
        self.listener.local_addr().unwrap_or(self.config.grpc_addr)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The outbox this service's messages go through.
    pub fn outbox(&self) -> Outbox {
        Outbox::new(SERVICE, self.config.kafka.clone())
    }

    /// The handler of `payment.commands`, as the consumer runs it.
    pub fn handler(&self) -> PaymentCommands {
        PaymentCommands::new(
            self.outbox(),
            self.provider.clone(),
            self.config.provider_timeout(),
        )
    }

    /// Serves gRPC, publishes the outbox and consumes the saga's commands until `cancel` (or
    /// until one of them fails, which stops the rest).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let addr = self.grpc_addr();
        // One outbox for the handler, the gRPC service and the relay, so that their commits
        // wake the relay in memory.
        let outbox = self.outbox();
        let handler = PaymentCommands::new(
            outbox.clone(),
            self.provider.clone(),
            self.config.provider_timeout(),
        );
        let App {
            config,
            pool,
            listener,
            provider,
        } = self;

        let health = runtime::health::serve::<PaymentServiceServer<PaymentGrpc>>(
            vec![
                runtime::health::Probe::database(pool.clone()),
                config.kafka.probe()?,
            ],
            cancel.clone(),
        )
        .await;
        let service = PaymentServiceServer::new(PaymentGrpc::new(
            pool.clone(),
            outbox.clone(),
            provider,
            config.provider_timeout(),
        ));
        let server = tonic::transport::Server::builder()
            .layer(telemetry::grpc::ServerLayer)
            .add_service(health)
            .add_service(runtime::grpc::reflection()?)
            .add_service(runtime::grpc::reflection_v1alpha()?)
            .add_service(service);
        let relay = Relay::for_outbox(pool.clone(), &outbox)?;
        let consumer = Consumer::new(
            &config.kafka,
            SERVICE,
            &[proto::topics::PAYMENT_COMMANDS],
            pool,
            outbox,
        );

        let mut tasks = JoinSet::new();
        let shutdown = cancel.clone();
        tasks.spawn(runtime::shutdown::cancel_when_done(
            cancel.clone(),
            async move {
                server
                    .serve_with_incoming_shutdown(
                        runtime::grpc::incoming(listener),
                        shutdown.cancelled_owned(),
                    )
                    .await
                    .context("gRPC server")
            },
        ));
        let shutdown = cancel.clone();
        tasks.spawn(runtime::shutdown::cancel_when_done(
            cancel.clone(),
            async move {
                relay.run(shutdown).await;
                Ok(())
            },
        ));
        let shutdown = cancel.clone();
        tasks.spawn(runtime::shutdown::cancel_when_done(
            cancel.clone(),
            async move {
                consumer
                    .run(handler, shutdown)
                    .await
                    .context("payment.commands consumer")
            },
        ));
        tracing::info!(%addr, "listening");

        cancel.cancelled().await;
        runtime::shutdown::drain(tasks, SHUTDOWN_GRACE).await
    }
}
