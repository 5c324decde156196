//! The skeleton of every service, written once: started (database connected and migrated,
//! gRPC listener bound), then configured with what differs (its gRPC services, background
//! tasks; the messaging crate adds the relay and consumers), then run until cancelled and
//! drained.
//!
//! ```text
//! Service::start(SERVICE, &config.database, &migrators, config.grpc.addr).await?
//!     .grpc(OrderServiceServer::new(api))
//!     .relay(&outbox)?
//!     .consumer(&[topics::ORDER_COMMANDS], &outbox, handler)
//!     .task("status watch", |cancel| watch.run(pool, cancel))
//!     .run(cancel, SHUTDOWN_GRACE)
//!     .await
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http::Request;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;

use crate::config::DatabaseArgs;
use crate::health::Probe;
use crate::shutdown::cancel_when_done;

type Task = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// What a background task returns: nothing, or whether it failed.
pub trait TaskOutcome: Send + 'static {
    fn into_result(self) -> anyhow::Result<()>;
}

impl TaskOutcome for () {
    fn into_result(self) -> anyhow::Result<()> {
        Ok(())
    }
}

impl TaskOutcome for anyhow::Result<()> {
    fn into_result(self) -> anyhow::Result<()> {
        self
    }
}

/// A gRPC service a tonic server can offer (what tonic's `add_service` asks of one).
pub trait GrpcService:
    tower::Service<
        Request<Body>,
        Error = Infallible,
        Response: axum::response::IntoResponse,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: tower::Service<
            Request<Body>,
            Error = Infallible,
            Response: axum::response::IntoResponse,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// One gRPC server: its listener, the services it offers, and the name its health reports.
struct GrpcServer {
    /// What the server is, for errors and logs ("gRPC", "admin gRPC").
    what: &'static str,
    listener: TcpListener,
    health: Option<&'static str>,
    routes: RoutesBuilder,
}

/// A service, connected and bound, collecting what it runs. Every gRPC server it runs offers
/// the standard health service (driven by the probes: its database, and what else is
/// [`probe`](Self::probe)d), server reflection in both versions, and the telemetry layer.
pub struct Service {
    name: &'static str,
    pool: PgPool,
    /// Cancelled when the caller's token is, or when any task ends: a failing part stops this
    /// service, not whatever else shares the caller's token.
    cancel: CancellationToken,
    probes: Vec<Probe>,
    servers: Vec<GrpcServer>,
    tasks: Vec<(&'static str, Task)>,
}

impl Service {
    /// Connects to the service's database (creating it if missing) and runs `migrators` in
    /// order, then binds the gRPC listener at `grpc_addr` (port 0: any free port).
    pub async fn start(
        name: &'static str,
        database: &DatabaseArgs,
        migrators: &[&Migrator],
        grpc_addr: SocketAddr,
    ) -> anyhow::Result<Service> {
        let pool =
            crate::database::connect(&database.url, database.max_connections, migrators).await?;
        let listener = bind("gRPC", grpc_addr).await?;
        Ok(Service {
            name,
            probes: vec![Probe::database(pool.clone())],
            pool,
            cancel: CancellationToken::new(),
            servers: vec![GrpcServer {
                what: "gRPC",
                listener,
                health: None,
                routes: RoutesBuilder::default(),
            }],
            tasks: Vec::new(),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The bound address of the gRPC server (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.servers[0]
            .listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// A dependency the service cannot serve without, besides its database: its health is
    /// `NOT_SERVING` while it does not answer.
    pub fn probe(mut self, probe: Probe) -> Self {
        self.probes.push(probe);
        self
    }

    /// Offers `service` on the gRPC server; its health is reported under `S`'s name (the first
    /// one's, when several).
    pub fn grpc<S: GrpcService>(mut self, service: S) -> Self {
        let server = &mut self.servers[0];
        server.health.get_or_insert(S::NAME);
        server.routes.add_service(service);
        self
    }

    /// Reports the gRPC server's health under `N`'s name: for a server with no service of
    /// its own yet.
    pub fn health_as<N: NamedService>(mut self) -> Self {
        self.servers[0].health = Some(N::NAME);
        self
    }

    /// Offers `service` on a server of its own, on `listener` (bound with [`bind`]), apart from
    /// the main one (an operators' API, say), with its own health and reflection.
    pub fn grpc_on<S: GrpcService>(
        mut self,
        what: &'static str,
        listener: TcpListener,
        service: S,
    ) -> Self {
        let mut routes = RoutesBuilder::default();
        routes.add_service(service);
        self.servers.push(GrpcServer {
            what,
            listener,
            health: Some(S::NAME),
            routes,
        });
        self
    }

    /// Runs `task` in the background until the service stops: `make` receives the token it
    /// must stop on. When it ends (failed or not), the whole service stops; its error is
    /// reported under `name`.
    pub fn task<F, Fut>(mut self, name: &'static str, make: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutcome,
    {
        let task = make(self.cancel.clone());
        self.tasks.push((
            name,
            Box::pin(async move { task.await.into_result().context(name) }),
        ));
        self
    }

    /// Serves and runs every task until `cancel` (or until one of them ends, which stops the
    /// rest), then gives them `grace` to finish; what is still running then is aborted.
    pub async fn run(self, cancel: CancellationToken, grace: Duration) -> anyhow::Result<()> {
        let Service {
            name,
            pool: _,
            cancel: own,
            probes,
            servers,
            tasks: background,
        } = self;
        let mut tasks = JoinSet::new();
        let mut addresses = Vec::new();
        for server in servers {
            let GrpcServer {
                what,
                listener,
                health,
                mut routes,
            } = server;
            let addr = listener.local_addr()?;
            let health = health.unwrap_or(name);
            routes
                .add_service(crate::health::serve_named(health, probes.clone(), own.clone()).await)
                .add_service(crate::grpc::reflection()?)
                .add_service(crate::grpc::reflection_v1alpha()?);
            let shutdown = own.clone().cancelled_owned();
            let serve = tonic::transport::Server::builder()
                .layer(telemetry::grpc::ServerLayer)
                .add_routes(routes.routes())
                .serve_with_incoming_shutdown(crate::grpc::incoming(listener), shutdown);
            tasks.spawn(cancel_when_done(own.clone(), async move {
                serve
                    .await
                    .with_context(|| format!("{what} server on {addr}"))
            }));
            addresses.push(format!("{what} {addr}"));
        }
        for (_, task) in background {
            tasks.spawn(cancel_when_done(own.clone(), task));
        }
        tracing::info!(service = name, listening = ?addresses, "running");

        tokio::select! {
            _ = cancel.cancelled() => own.cancel(),
            _ = own.cancelled() => {}
        }
        crate::shutdown::drain(tasks, grace).await
    }
}

/// Binds `addr` for a gRPC server (`what` says which, in the error).
pub async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))
}

/// What every service's `main` does: parses its settings `C` from the command line and the
/// environment, starts a runtime with the worker threads they say (`threads`), sets up
/// `telemetry` in it, prints the settings with `log`, then `run`s them until SIGINT or
/// SIGTERM; telemetry is flushed whatever the outcome.
pub fn main<C, F, Fut>(
    telemetry: fn() -> telemetry::Telemetry,
    threads: fn(&C) -> &crate::config::ThreadsArgs,
    log: fn(&C),
    run: F,
) -> anyhow::Result<()>
where
    C: clap::Parser,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = C::parse();
    let runtime = threads(&config)
        .runtime()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let telemetry = telemetry();
        log(&config);
        let result = run(config, crate::shutdown::on_signal()).await;
        telemetry.shutdown().await;
        result
    })
}
