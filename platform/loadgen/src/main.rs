//! `loadgen`: places orders through the REST API at a fixed concurrency or rate, with a mix of
//! outcomes, and reports sagas per second and latency percentiles.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use loadgen::{LoadConfig, Mix};

#[derive(Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load the order saga platform through its REST API and report sagas/s and latency"
)]
struct Args {
    /// The gateway's URL.
    #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:3000")]
    gateway: String,
    /// The gateway's HS256 JWT_SECRET: the load's customers' tokens are signed with it.
    #[arg(long, env = "JWT_SECRET", default_value = gateway::identity::DEV_JWT_SECRET,
          hide_default_value = true, hide_env_values = true)]
    jwt_secret: String,
    /// The inventory service's gRPC URL, to restock before the run.
    #[arg(
        long,
        env = "INVENTORY_SVC_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    inventory_url: String,
    /// Orders to place.
    #[arg(long, short = 'n', default_value_t = 1000)]
    orders: u64,
    /// Orders in flight at once.
    #[arg(long, short = 'c', default_value_t = 16)]
    concurrency: usize,
    /// Start this many orders per second instead (still at most --concurrency in flight).
    #[arg(long)]
    rate: Option<f64>,
    /// Outcomes asked for, by weight: succeed, decline, out-of-stock, deadline (the last needs
    /// the platform's PAYMENT_DEADLINE_SECS below --timeout).
    #[arg(long, default_value = "succeed=100")]
    mix: Mix,
    /// Longest one order may take to reach its final state, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Do not set the stock before the run.
    #[arg(long)]
    no_restock: bool,
    /// Retry transient errors (5xx, refused connections) as a careful client would.
    #[arg(long)]
    retry: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also report CPU time per saga of each process of the platform (the services, Kafka and
    /// PostgreSQL), read from /proc: only when they run on this machine.
    #[arg(long)]
    cpu: bool,
    /// Also report the mean time of each stage of one Kafka crossing (outbox wait, publish,
    /// delivery, handler transaction) over the run, from the services' `/metrics` at their
    /// default addresses.
    #[arg(long)]
    stages: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !args.no_restock {
        if let Err(e) = loadgen::restock(&args.inventory_url).await {
            eprintln!("loadgen: {e:#} (use --no-restock to skip)");
            return ExitCode::from(2);
        }
    }
    let config = LoadConfig {
        gateway: args.gateway,
        orders: args.orders,
        concurrency: args.concurrency,
        rate: args.rate,
        mix: args.mix,
        order_timeout: Duration::from_secs(args.timeout),
        retry_transient: args.retry,
        progress: !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        jwt_secret: args.jwt_secret,
    };
    let cpu_before = if args.cpu {
        match loadgen::cpu::Sample::take() {
            Some(sample) => Some(sample),
            None => {
                eprintln!("loadgen: --cpu needs /proc (Linux)");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let http = reqwest::Client::new();
    let stages_before = if args.stages {
        match loadgen::stages::Sample::take(&http).await {
            Ok(sample) => Some(sample),
            Err(e) => {
                eprintln!("loadgen: --stages: {e:#}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let mut report = match loadgen::run(&config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let (Some(before), Some(after)) = (cpu_before, loadgen::cpu::Sample::take()) {
        report.cpu_ms_per_saga = Some(before.per_saga(&after, report.finished));
        report.kafka_jit_ms_per_saga = before.kafka_jit_per_saga(&after, report.finished);
    }
    if let Some(before) = stages_before {
        match loadgen::stages::Sample::take(&http).await {
            Ok(after) => report.crossing = Some(before.crossing(&after)),
            Err(e) => eprintln!("loadgen: --stages: {e:#}"),
        }
    }
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("loadgen: {e}"),
        }
    } else {
        report.print();
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
