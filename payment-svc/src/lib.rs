//! payment-svc: a payment per order, in its own database. It records the payment the saga asks
//! for (`ChargePayment`), lets the client verify it over gRPC with a pluggable provider, and
//! voids or refunds it when the saga compensates. Every outcome goes to the orchestrator on
//! `saga.replies` through the transactional outbox.

pub mod config;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod handler;
pub mod payment;
pub mod provider;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use messaging::service::ServiceExt as _;
use messaging::Outbox;
use proto::payment::v1::payment_service_server::PaymentServiceServer;
use runtime::Service;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

use crate::grpc::PaymentGrpc;
use crate::handler::PaymentCommands;
use crate::provider::PaymentProvider;

/// The service's name: its consumer group and the source of its messages.
pub const SERVICE: &str = "payment-svc";

/// This service's migrations (versions from 100), run after [`messaging::MIGRATOR`].
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub struct App {
    config: Config,
    service: Service,
    /// One outbox for the handler, the gRPC service and the relay, so that their commits wake
    /// the relay in memory.
    outbox: Outbox,
    provider: Arc<dyn PaymentProvider>,
}

impl App {
    /// Connects to and migrates the database, creates the topics and binds the gRPC listener.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let (service, outbox) = messaging::service::start(
            SERVICE,
            &config.database,
            &MIGRATOR,
            config.grpc.addr,
            &config.kafka,
        )
        .await?;
        let provider = config.payment_provider.build();
        Ok(App {
            config,
            service,
            outbox,
            provider,
        })
    }

    /// Replaces the configured payment provider.
    pub fn with_provider(mut self, provider: Arc<dyn PaymentProvider>) -> Self {
        self.provider = provider;
        self
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

    /// The outbox this service's messages go through.
    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
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
        let handler = self.handler();
        let App {
            config,
            service,
            outbox,
            provider,
        } = self;
        let api = PaymentGrpc::new(
            service.pool().clone(),
            outbox.clone(),
            provider,
            config.provider_timeout(),
        );
        service
            .grpc(PaymentServiceServer::new(api))
            .relay(&outbox)?
            .consumer(&[proto::topics::PAYMENT_COMMANDS], &outbox, handler)
            .run(cancel, runtime::shutdown::GRACE)
            .await
    }
}
