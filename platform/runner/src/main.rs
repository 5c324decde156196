//! `platform`: runs the whole platform locally, or every test against real infrastructure.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use platform::infra::{self, Infra};
use platform::services::{self, Addresses, PlatformConfig};
use platform::{out, say};

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
    /// Start PostgreSQL, Kafka and the five services; the gateway listens until Ctrl-C (or
    /// SIGTERM, SIGHUP).
    Up(UpArgs),
    /// Start PostgreSQL and Kafka (for running tests by hand) until Ctrl-C (or SIGTERM, SIGHUP).
    Infra(InfraArgs),
    /// Start PostgreSQL and the broker, build, and run every test of the workspace; arguments
    /// after `--` go to `cargo test`.
    Test(TestArgs),
    /// Fault injection under load: the platform on a PostgreSQL and a broker of its own, the
    /// load generator running, services killed with SIGKILL at random moments, a second
    /// orchestrator for a while, the broker and PostgreSQL restarted; then the audit.
    Chaos(ChaosArgs),
    /// Stop whatever the state directory says is still running: runners, services, Kafka and
    /// PostgreSQL left by a run whose terminal was lost or that was killed.
    Down(DownArgs),
}

#[derive(Args)]
struct DownArgs {
    /// Where the local cluster, the broker's storage and the logs are kept.
    #[arg(long, env = "PLATFORM_STATE_DIR", default_value_os_t = platform::state_dir())]
    state_dir: PathBuf,
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
    mix: loadgen::Mix,
    /// The platform's payment deadline during the run: above the longest outage the faults
    /// make (a Kafka broker restarting takes 10 to 20 s on a loaded 2-core machine, and the
    /// consumer groups form again after it), or orders caught in it fail by their deadline.
    #[arg(long, default_value_t = 40)]
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
    /// Kafka brokers to use; a local Apache Kafka is started when not given.
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
    /// `for_tests`: PostgreSQL with `fsync=off` and a broker wiped at each start (`test`,
    /// `infra`); otherwise fsync on and the broker's data kept (`up`).
    fn options(&self, for_tests: bool) -> infra::Options {
        infra::Options {
            database_url: self.database_url.clone(),
            kafka_brokers: self.kafka_brokers.clone(),
            postgres_port: self.postgres_port,
            kafka_port: self.kafka_port,
            for_tests,
            state_dir: self.state_dir.clone(),
            shared_with: infra::runners(&self.state_dir).first().copied(),
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
        Cmd::Down(args) => down(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            say!("platform: error: {e:#}");
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

/// Provisions the infrastructure unless a stop signal comes first (then `Err(signal)`).
async fn provision_or_stop(
    options: &infra::Options,
    stop: &mut signals::Stop,
) -> anyhow::Result<Result<Infra, signals::Signal>> {
    tokio::select! {
        infra = Infra::provision(options) => infra.map(Ok),
        signal = stop.next() => Ok(Err(signal)),
    }
}

async fn infra_only(args: InfraArgs) -> anyhow::Result<ExitCode> {
    let mut stop = signals::Stop::new()?;
    let _runner = infra::register_runner(&args.state_dir)?;
    let infra = match provision_or_stop(&args.options(true), &mut stop).await? {
        Ok(infra) => infra,
        Err(signal) => return Ok(signal.exit_code()),
    };
    out!("TEST_DATABASE_URL={}", infra.database_url);
    out!("TEST_KAFKA_BROKERS={}", infra.kafka_brokers);
    say!("platform: infrastructure ready; Ctrl-C (or SIGTERM) stops it");
    let signal = stop.next().await;
    say!("platform: {signal}: stopping");
    infra.stop().await;
    Ok(signal.exit_code())
}

async fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut stop = signals::Stop::new()?;
    let _runner = infra::register_runner(&args.infra.state_dir)?;
    let scripts = tokio::select! {
        tools = platform::tools::ensure_test_tools() => tools?,
        signal = stop.next() => return Ok(signal.exit_code()),
    };
    let infra = match provision_or_stop(&args.infra.options(true), &mut stop).await? {
        Ok(infra) => infra,
        Err(signal) => return Ok(signal.exit_code()),
    };
    let result = run_tests(&infra, &args.cargo_test_args, scripts, &mut stop).await;
    infra.stop().await;
    say!("platform: test run took {:.0?}", started.elapsed());
    result
}

/// Runs `cargo` in a process group of its own, so that a stop signal reaches it and every
/// test binary and service under it; `Err(signal)` when stopped.
async fn run_cargo(
    mut command: tokio::process::Command,
    stop: &mut signals::Stop,
) -> anyhow::Result<Result<bool, signals::Signal>> {
    command.process_group(0);
    let mut child = command.spawn().context("running cargo")?;
    tokio::select! {
        status = child.wait() => Ok(Ok(status?.success())),
        signal = stop.next() => {
            say!("platform: {signal}: stopping the tests");
            if let Some(pid) = child.id() {
                infra::process::signal(-i64::from(pid), "TERM");
                if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                    infra::process::signal(-i64::from(pid), "KILL");
                }
            }
            let _ = child.wait().await;
            Ok(Err(signal))
        }
    }
}

async fn run_tests(
    infra: &Infra,
    extra: &[String],
    scripts: Option<PathBuf>,
    stop: &mut signals::Stop,
) -> anyhow::Result<ExitCode> {
    drop_test_databases(&infra.database_url).await?;
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    match run_cargo(build, stop).await? {
        Ok(true) => {}
        Ok(false) => return Ok(ExitCode::FAILURE),
        Err(signal) => return Ok(signal.exit_code()),
    }
    let mut test = cargo();
    if let Some(scripts) = scripts {
        // The Python checkers just installed (pip's scripts directory) come first.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(scripts).chain(std::env::split_paths(&path));
        test.env("PATH", std::env::join_paths(paths)?);
    }
    // The services' own settings in our environment are for `platform` itself, not for the
    // services the tests configure.
    for variable in SERVICE_SETTINGS {
        test.env_remove(variable);
    }
    test.args(["test", "--workspace"])
        .args(extra)
        .env(test_support::DATABASE_ENV, &infra.database_url)
        .env(test_support::KAFKA_ENV, &infra.kafka_brokers);
    Ok(match run_cargo(test, stop).await? {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(signal) => signal.exit_code(),
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
            .bind(format!("{}%", test_support::TEST_DATABASE_PREFIX))
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
    let mut stop = signals::Stop::new()?;
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
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel();
    let stopped = async move {
        let signal = stop.next().await;
        say!("platform: {signal}: stopping the fault injection");
        let _ = signal_tx.send(signal);
    };
    let report = platform::chaos::run(&config, &services::binary_dir(), stopped).await;
    if let Ok(signal) = signal_rx.await {
        return Ok(signal.exit_code());
    }
    let report = report?;
    report.print();
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let mut stop = signals::Stop::new()?;
    let _runner = infra::register_runner(&args.infra.state_dir)?;
    if !args.no_build {
        let mut build = cargo();
        build.args(["build", "--bins"]).args(profile_args());
        for service in services::SERVICES {
            build.args(["-p", service]);
        }
        match run_cargo(build, &mut stop).await? {
            Ok(true) => {}
            Ok(false) => return Ok(ExitCode::FAILURE),
            Err(signal) => return Ok(signal.exit_code()),
        }
    } else if let Err(stale) = services::check_fresh(&services::binary_dir()) {
        say!("platform: warning (--no-build): {stale:#}");
    }
    let run_dir = args.infra.state_dir.join("run");
    stop_services_left(&run_dir).await;
    let infra = match provision_or_stop(&args.infra.options(false), &mut stop).await? {
        Ok(infra) => infra,
        Err(signal) => return Ok(signal.exit_code()),
    };
    let result = run_services(&infra, args.http_addr, &run_dir, &mut stop).await;
    infra.stop().await;
    result
}

/// The pid file of a service started by `up`.
fn service_pid_file(run_dir: &std::path::Path, service: &str) -> infra::PidFile {
    infra::PidFile::new(run_dir.join(format!("{service}.pid")))
}

/// Stops the services an earlier `up` left running (its runner was killed), saying so.
async fn stop_services_left(run_dir: &std::path::Path) -> usize {
    let mut stopped = 0;
    for service in services::SERVICES {
        let file = service_pid_file(run_dir, service);
        if let Some(pid) = file.live(service) {
            say!("platform: stopping the {service} an earlier run left running (pid {pid})");
            infra::process::stop(pid, Duration::from_secs(10)).await;
            stopped += 1;
        }
        file.remove();
    }
    stopped
}

async fn run_services(
    infra: &Infra,
    http_addr: std::net::SocketAddr,
    run_dir: &std::path::Path,
    stop: &mut signals::Stop,
) -> anyhow::Result<ExitCode> {
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
    let started = async {
        for service in services::SERVICES {
            let mut child = services::spawn(
                &bin_dir,
                service,
                &config.env(service),
                Stdio::piped(),
                Stdio::piped(),
            )?;
            if let Some(pid) = child.id() {
                service_pid_file(run_dir, service).write(pid)?;
            }
            infra::process::forward_lines(&mut child, move |line| {
                out!("{service:>13} | {line}");
            });
            children.push((service, child));
        }
        let gateway = format!("http://{http_addr}");
        services::wait_ready_while_running(&gateway, Duration::from_secs(120), &mut children).await
    };
    let code = tokio::select! {
        ready = started => match ready {
            Ok(()) => {
                say!(
                    "\nplatform: ready. Gateway on http://localhost:{}  (Ctrl-C stops everything)\n",
                    http_addr.port()
                );
                watch(&mut children, stop).await
            }
            Err(e) => {
                say!("platform: {e:#}; stopping the platform");
                ExitCode::FAILURE
            }
        },
        signal = stop.next() => {
            say!("platform: {signal}: stopping");
            signal.exit_code()
        }
    };
    // Stop in reverse order: the gateway first, the services it calls last.
    for (service, child) in children.iter_mut().rev() {
        infra::terminate(child, Duration::from_secs(10)).await;
        service_pid_file(run_dir, service).remove();
    }
    Ok(code)
}

/// Until a stop signal or the exit of a service.
async fn watch(
    children: &mut [(&'static str, tokio::process::Child)],
    stop: &mut signals::Stop,
) -> ExitCode {
    tokio::select! {
        signal = stop.next() => {
            say!("platform: {signal}: stopping");
            signal.exit_code()
        }
        (service, status) = services::first_exit(children) => {
            say!("platform: {service} exited ({status}); stopping the platform");
            ExitCode::FAILURE
        }
    }
}

async fn down(args: DownArgs) -> anyhow::Result<ExitCode> {
    let state_dir = &args.state_dir;
    let mut stopped = 0;
    // Runners first: each stops what it started, as on Ctrl-C.
    for pid in infra::runners(state_dir) {
        say!("platform: stopping the runner pid {pid}");
        if infra::process::stop(pid, Duration::from_secs(60)).await {
            say!("platform: the runner pid {pid} had to be killed");
        }
        stopped += 1;
    }
    stopped += stop_services_left(&state_dir.join("run")).await;
    for dir in ["kafka", "kafka-test"] {
        if infra::kafka::stop_leftover(&state_dir.join(dir)).await {
            say!(
                "platform: stopped the Kafka broker of {}",
                state_dir.join(dir).display()
            );
            stopped += 1;
        }
    }
    let root = infra::cluster_dir(state_dir, "postgres");
    if let Some(pid) = infra::postgres::running_pid(&root) {
        say!(
            "platform: stopping PostgreSQL (pid {pid}, {})",
            root.display()
        );
        if infra::stop_postgres(&root, false).await.is_err() {
            infra::process::stop(pid, Duration::from_secs(10)).await;
        }
        stopped += 1;
    }
    if stopped == 0 {
        say!("platform: nothing of {} is running", state_dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

mod signals {
    //! The signals that stop a runner: Ctrl-C (SIGINT), SIGTERM (`kill`, `timeout`, CI, a
    //! supervisor, an IDE's stop button) and SIGHUP (the terminal closed), all alike.

    use std::process::ExitCode;

    use tokio::signal::unix::{signal, Signal as UnixSignal, SignalKind};

    #[derive(Clone, Copy, Debug)]
    pub enum Signal {
        Interrupt,
        Terminate,
        Hangup,
    }

    impl Signal {
        /// 128 + the signal's number, as shells report a process ended by it.
        pub fn exit_code(self) -> ExitCode {
            ExitCode::from(match self {
                Signal::Hangup => 128 + 1,
                Signal::Interrupt => 128 + 2,
                Signal::Terminate => 128 + 15,
            })
        }
    }

    impl std::fmt::Display for Signal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(match self {
                Signal::Interrupt => "interrupted (SIGINT)",
                Signal::Terminate => "terminated (SIGTERM)",
                Signal::Hangup => "hung up (SIGHUP)",
            })
        }
    }

    /// Listens from its creation on, so a signal that comes during start-up is not missed.
    pub struct Stop {
        interrupt: UnixSignal,
        terminate: UnixSignal,
        hangup: UnixSignal,
    }

    impl Stop {
        pub fn new() -> std::io::Result<Stop> {
            Ok(Stop {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
                hangup: signal(SignalKind::hangup())?,
            })
        }

        pub async fn next(&mut self) -> Signal {
            tokio::select! {
                _ = self.interrupt.recv() => Signal::Interrupt,
                _ = self.terminate.recv() => Signal::Terminate,
                _ = self.hangup.recv() => Signal::Hangup,
            }
        }
    }
}
