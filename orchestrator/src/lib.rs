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

use messaging::service::ServiceExt as _;
use messaging::Outbox;
use runtime::Service;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const SERVICE: &str = "orchestrator";

pub struct App {
    config: Config,
    service: Service,
    outbox: Outbox,
    /// The operators' API listens apart from anything customers reach.
    admin_listener: TcpListener,
}

impl App {
    /// Connects to (and migrates) the database, creates the topics and binds both gRPC
    /// listeners.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let (service, outbox) = messaging::service::start(
            SERVICE,
            &config.database,
            &MIGRATOR,
            config.grpc.addr,
            &config.kafka,
        )
        .await?;
        let admin_listener = runtime::service::bind("admin gRPC", config.admin_addr).await?;
        Ok(App {
            config,
            service,
            outbox,
            admin_listener,
        })
    }

    /// The bound gRPC address (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.service.grpc_addr()
    }

    /// The bound address of the operators' API (SagaAdmin).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn pool(&self) -> &PgPool {
        self.service.pool()
    }

    /// Relays the outbox, consumes `OrderCreated` and the services' replies, fires the saga
    /// timers and serves the operators' API until `cancel` (or until one of them fails, which
    /// stops the rest).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App {
            config,
            service,
            outbox,
            admin_listener,
        } = self;
        let pool = service.pool().clone();
        let engine = engine::Engine::new(outbox.clone(), config.timing());
        let (admin_token, dev_token) = config.admin_token();
        if dev_token {
            tracing::warn!(
                admin_token = config::DEV_ADMIN_TOKEN,
                "ADMIN_TOKEN is not set: the admin API accepts the development token; set ADMIN_TOKEN anywhere but on a developer's machine"
            );
        }
        let admin = admin::server(pool.clone(), engine.clone(), &admin_token);
        let timer_poll = Duration::from_millis(config.timer_poll_interval_ms);
        service
            .health_as::<tonic_health_marker::Orchestrator>()
            .grpc_on("admin gRPC", admin_listener, admin)
            .relay(&outbox)?
            .consumer(
                &[proto::topics::ORDER_EVENTS, proto::topics::SAGA_REPLIES],
                &outbox,
                handler::SagaHandler::new(engine.clone()),
            )
            .task("saga timers", |cancel| {
                timers::run(pool, engine, timer_poll, cancel)
            })
            .run(cancel, runtime::shutdown::GRACE)
            .await
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
