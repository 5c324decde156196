//! `platform`: runs the whole platform locally, or every test against real infrastructure.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use platform::infra::{self, Infra};
use platform::services::{self, Addresses, PlatformConfig};
use tokio::io::{AsyncBufReadExt as _, BufReader};

#[derive(Parser)]
#[command(
    name = "platform",
    version,
    about = "Run the order saga platform locally, or all of its tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start PostgreSQL, the broker and the five services; the gateway listens until Ctrl-C.
    Up(UpArgs),
    /// Start PostgreSQL and the broker (for running tests by hand) until Ctrl-C.
    Infra(InfraArgs),
    /// Start PostgreSQL and the broker, build, and run every test of the workspace; arguments
    /// after `--` go to `cargo test`.
    Test(TestArgs),
    /// Fault injection under load: the platform on a PostgreSQL and a broker of its own, the
    /// load generator running, services killed with SIGKILL at random moments, a second
    /// orchestrator for a while, the broker and PostgreSQL restarted; then the audit.
    Chaos(ChaosArgs),
}

#[derive(Args)]
struct ChaosArgs {
    /// Orders to place.
    #[arg(long, short = 'n', default_value_t = 5000)]
    orders: u64,
    /// Orders in flight at once.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Orders started per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Services killed with SIGKILL during the run.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Do not kill and restart the broker during the run.
    #[arg(long)]
    no_broker_restart: bool,
    /// Outcomes asked for, by weight.
    #[arg(
        long,
        default_value = "succeed=70,decline=10,out-of-stock=10,deadline=10"
    )]
    mix: platform::load::Mix,
    /// The platform's payment deadline during the run.
    #[arg(long, default_value_t = 20)]
    payment_deadline_secs: u64,
    /// Skip `cargo build` of the services.
    #[arg(long)]
    no_build: bool,
}

#[derive(Args, Clone)]
struct InfraArgs {
    /// PostgreSQL server to use (any database on it); provisioned locally when not given.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Kafka brokers to use; a local tansu broker is started when not given.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Port of the local PostgreSQL.
    #[arg(long, env = "PLATFORM_POSTGRES_PORT", default_value_t = 5432)]
    postgres_port: u16,
    /// Port of the local broker.
    #[arg(long, env = "PLATFORM_KAFKA_PORT", default_value_t = 9092)]
    kafka_port: u16,
    /// Where the local cluster, the broker's storage and the logs are kept.
    #[arg(long, env = "PLATFORM_STATE_DIR", default_value_os_t = platform::state_dir())]
    state_dir: PathBuf,
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    infra: InfraArgs,
    /// Address of the REST gateway.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:3000")]
    http_addr: std::net::SocketAddr,
    /// Skip `cargo build` of the services (use the binaries already built).
    #[arg(long)]
    no_build: bool,
}

#[derive(Args)]
struct TestArgs {
    #[command(flatten)]
    infra: InfraArgs,
    /// Arguments for `cargo test`, e.g. `-- -p orchestrator`.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

impl InfraArgs {
    /// `durable`: the broker keeps its messages on disk and PostgreSQL runs with fsync (`up`);
    /// otherwise the broker keeps them in memory and PostgreSQL runs with `fsync=off` (tests).
    fn options(&self, durable: bool) -> infra::Options {
        infra::Options {
            database_url: self.database_url.clone(),
            kafka_brokers: self.kafka_brokers.clone(),
            postgres_port: self.postgres_port,
            kafka_port: self.kafka_port,
            durable_broker: durable,
            fast_postgres: !durable,
            state_dir: self.state_dir.clone(),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up(args) => up(args).await,
        Cmd::Infra(args) => infra_only(args).await,
        Cmd::Test(args) => test(args).await,
        Cmd::Chaos(args) => chaos(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("platform: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The cargo that runs us (set by `cargo run`), or the one on PATH.
fn cargo() -> tokio::process::Command {
    tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `--release` when this binary was built in release, so the services are built alike.
fn profile_args() -> Vec<&'static str> {
    if services::binary_dir().ends_with("release") {
        vec!["--release"]
    } else {
        vec![]
    }
}

async fn infra_only(args: InfraArgs) -> anyhow::Result<ExitCode> {
    let infra = Infra::provision(&args.options(false)).await?;
    println!("TEST_DATABASE_URL={}", infra.database_url);
    println!("TEST_KAFKA_BROKERS={}", infra.kafka_brokers);
    eprintln!("platform: infrastructure ready; Ctrl-C stops it");
    let _ = tokio::signal::ctrl_c().await;
    infra.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let infra = Infra::provision(&args.infra.options(false)).await?;
    let result = run_tests(&infra, &args.cargo_test_args).await;
    infra.stop().await;
    eprintln!("platform: test run took {:.0?}", started.elapsed());
    result
}

async fn run_tests(infra: &Infra, extra: &[String]) -> anyhow::Result<ExitCode> {
    drop_test_databases(&infra.database_url).await?;
    let status = cargo()
        .args(["build", "--workspace", "--bins"])
        .status()
        .await
        .context("running cargo build")?;
    if !status.success() {
        return Ok(ExitCode::FAILURE);
    }
    let mut test = cargo();
    // The services' own settings in our environment are for `platform` itself, not for the
    // services the tests configure.
    for variable in SERVICE_SETTINGS {
        test.env_remove(variable);
    }
    let status = test
        .args(["test", "--workspace"])
        .args(extra)
        .env(platform::testing::DATABASE_ENV, &infra.database_url)
        .env(platform::testing::KAFKA_ENV, &infra.kafka_brokers)
        .status()
        .await
        .context("running cargo test")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

const SERVICE_SETTINGS: &[&str] = &[
    "DATABASE_URL",
    "KAFKA_BROKERS",
    "KAFKA_TOPIC_PREFIX",
    "GRPC_ADDR",
    "HTTP_ADDR",
    "ORDER_SVC_URL",
    "INVENTORY_SVC_URL",
    "PAYMENT_SVC_URL",
    "ADMIN_ADDR",
    "ADMIN_TOKEN",
];

/// Databases left by earlier test runs.
async fn drop_test_databases(server_url: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(server_url).await?;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
            .bind(format!("{}%", platform::testing::TEST_DATABASE_PREFIX))
            .fetch_all(&mut conn)
            .await?;
    for name in names {
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}

async fn build_services() -> anyhow::Result<bool> {
    let mut build = cargo();
    build.args(["build", "--bins"]).args(profile_args());
    for service in services::SERVICES {
        build.args(["-p", service]);
    }
    Ok(build
        .status()
        .await
        .context("running cargo build")?
        .success())
}

async fn chaos(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    if !args.no_build && !build_services().await? {
        return Ok(ExitCode::FAILURE);
    }
    let config = platform::chaos::ChaosConfig {
        orders: args.orders,
        concurrency: args.concurrency,
        rate: Some(args.rate),
        kills: args.kills,
        restart_broker: !args.no_broker_restart,
        mix: args.mix,
        payment_deadline_secs: args.payment_deadline_secs,
        pause: std::time::Duration::from_secs(4)..std::time::Duration::from_secs(8),
        work_dir: platform::state_dir().join("chaos"),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let report = platform::chaos::run(&config, &services::binary_dir()).await?;
    report.print();
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    if !args.no_build {
        let mut build = cargo();
        build.args(["build", "--bins"]).args(profile_args());
        for service in services::SERVICES {
            build.args(["-p", service]);
        }
        if !build
            .status()
            .await
            .context("running cargo build")?
            .success()
        {
            return Ok(ExitCode::FAILURE);
        }
    }
    let infra = Infra::provision(&args.infra.options(true)).await?;
    let result = run_services(&infra, args.http_addr).await;
    infra.stop().await;
    result
}

async fn run_services(infra: &Infra, http_addr: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    let config = PlatformConfig {
        database_server_url: infra.database_url.clone(),
        database_prefix: String::new(),
        kafka_brokers: infra.kafka_brokers.clone(),
        topic_prefix: String::new(),
        addresses: Addresses {
            gateway: http_addr,
            ..Addresses::default()
        },
        extra_env: vec![],
    };
    let bin_dir = services::binary_dir();
    let mut children = Vec::new();
    for service in services::SERVICES {
        let mut child = services::spawn(
            &bin_dir,
            service,
            &config.env(service),
            Stdio::piped(),
            Stdio::piped(),
        )?;
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    println!("{service:>13} | {line}");
                }
            });
        }
        children.push((service, child));
    }
    if let Err(e) =
        services::wait_ready(&format!("http://{http_addr}"), Duration::from_secs(120)).await
    {
        eprintln!("platform: {e:#}");
    }
    eprintln!(
        "\nplatform: ready. Gateway on http://localhost:{}  (Ctrl-C stops everything)\n",
        http_addr.port()
    );

    let exited = async {
        loop {
            for (service, child) in children.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return (*service, status);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let code = tokio::select! {
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        (service, status) = exited => {
            eprintln!("platform: {service} exited ({status}); stopping the platform");
            ExitCode::FAILURE
        }
    };
    // Stop in reverse order: the gateway first, the services it calls last.
    for (_, child) in children.iter_mut().rev() {
        infra::terminate(child, Duration::from_secs(10)).await;
    }
    Ok(code)
}
