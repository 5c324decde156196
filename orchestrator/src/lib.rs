//! The saga orchestrator: consumes `OrderCreated` and the services' replies, runs each order's
//! saga as a pure state machine persisted in PostgreSQL, and sends commands through its outbox.

pub mod admin;
pub mod config;
pub mod engine;
pub mod handler;
pub mod saga;
pub mod saga_metrics;
pub mod store;
pub mod timers;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use messaging::{Consumer, Outbox, Relay};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Config;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const SERVICE: &str = "orchestrator";

pub struct App {
    config: Config,
    pool: PgPool,
    listener: TcpListener,
    admin_listener: TcpListener,
}

impl App {
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
            .with_context(|| format!("binding gRPC address {}", config.grpc_addr))?;
        let admin_listener = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("binding the admin gRPC address {}", config.admin_addr))?;
        Ok(App {
            config,
            pool,
            listener,
            admin_listener,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.grpc_addr)
    }

    /// The bound address of the operators' API (SagaAdmin).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or(self.config.admin_addr)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let outbox = Outbox::new(SERVICE, self.config.kafka.clone());
        let engine = engine::Engine::new(outbox.clone(), self.config.timing());
        let mut tasks = JoinSet::new();
        let probes = vec![
            runtime::health::Probe::database(self.pool.clone()),
            self.config.kafka.probe()?,
        ];

        let relay = Relay::for_outbox(self.pool.clone(), &outbox)?;
        tasks.spawn(runtime::shutdown::cancel_when_done(cancel.clone(), {
            let cancel = cancel.clone();
            async move {
                relay.run(cancel).await;
                Ok(())
            }
        }));

        let consumer = Consumer::new(
            &self.config.kafka,
            SERVICE,
            &[proto::topics::ORDER_EVENTS, proto::topics::SAGA_REPLIES],
            self.pool.clone(),
            outbox.clone(),
        );
        let handler = handler::SagaHandler::new(engine.clone());
        tasks.spawn(runtime::shutdown::cancel_when_done(
            cancel.clone(),
            consumer.run(handler, cancel.clone()),
        ));

        let addr = self.grpc_addr();
        let admin_addr = self.admin_addr();
        let (admin_token, dev_token) = self.config.admin_token();
        let admin_grpc = tonic::transport::Server::builder()
            .layer(telemetry::grpc::ServerLayer)
            .add_service(
                runtime::health::serve::<admin::AdminServer>(probes.clone(), cancel.clone()).await,
            )
            .add_service(runtime::grpc::reflection()?)
            .add_service(runtime::grpc::reflection_v1alpha()?)
            .add_service(admin::server(
                self.pool.clone(),
                engine.clone(),
                &admin_token,
            ))
            .serve_with_incoming_shutdown(
                runtime::grpc::incoming(self.admin_listener),
                cancel.clone().cancelled_owned(),
            );
        tasks.spawn(runtime::shutdown::cancel_when_done(
            cancel.clone(),
            async move { admin_grpc.await.context("admin gRPC server") },
        ));
        if dev_token {
            tracing::warn!(
                admin_token = config::DEV_ADMIN_TOKEN,
                "ADMIN_TOKEN is not set: the admin API accepts the development token; set ADMIN_TOKEN anywhere but on a developer's machine"
            );
        }

        tasks.spawn(runtime::shutdown::cancel_when_done(
            cancel.clone(),
            timers::run(
                self.pool.clone(),
                engine,
                Duration::from_millis(self.config.timer_poll_interval_ms),
                cancel.clone(),
            ),
        ));

        let grpc = tonic::transport::Server::builder()
            .layer(telemetry::grpc::ServerLayer)
            .add_service(
                runtime::health::serve::<tonic_health_marker::Orchestrator>(probes, cancel.clone())
                    .await,
            )
            .add_service(runtime::grpc::reflection()?)
            .add_service(runtime::grpc::reflection_v1alpha()?)
            .serve_with_incoming_shutdown(
                runtime::grpc::incoming(self.listener),
                cancel.clone().cancelled_owned(),
            );
        tasks.spawn(runtime::shutdown::cancel_when_done(
            cancel.clone(),
            async move { grpc.await.context("gRPC server") },
        ));
        tracing::info!(grpc_addr = %addr, %admin_addr, "listening");

        cancel.cancelled().await;
        runtime::shutdown::drain(tasks, Duration::from_secs(10)).await
    }
}

mod tonic_health_marker {
    /// The name the orchestrator reports as serving on the health service, until it has a
    /// gRPC service of its own.
    pub struct Orchestrator;
    impl tonic::server::NamedService for Orchestrator {
        const NAME: &'static str = "saga.v1.Orchestrator";
    }
}
