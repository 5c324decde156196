//! `sagactl`: the operators' command line. Lists and shows sagas, retries a stuck step, aborts
//! a saga, and audits the whole platform's consistency, through the orchestrator's admin API
//! and the services' own gRPC APIs.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use proto::saga::v1 as pb;
use sagactl::{audit, render, AdminClient, Failure, DEV_ADMIN_TOKEN};

#[derive(Parser)]
#[command(
    name = "sagactl",
    version,
    about = "Inspect and repair the order sagas, and audit the platform's consistency",
    after_help = "Exit status: 0 when done, 1 when the request was refused (or the audit found \
                  violations), 2 when a service could not be asked (unreachable, token refused, \
                  invalid arguments)."
)]
struct Cli {
    #[command(flatten)]
    targets: Targets,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Targets {
    /// The orchestrator's admin API (its ADMIN_ADDR).
    #[arg(
        long,
        env = "SAGA_ADMIN_URL",
        default_value = "http://127.0.0.1:50055",
        global = true
    )]
    admin_url: String,
    /// The orchestrator's ADMIN_TOKEN.
    #[arg(long, env = "SAGA_ADMIN_TOKEN", default_value = DEV_ADMIN_TOKEN,
          hide_default_value = true, hide_env_values = true, global = true)]
    admin_token: String,
    /// order-svc's gRPC API (for the audit).
    #[arg(
        long,
        env = "ORDER_SVC_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    order_url: String,
    /// inventory-svc's gRPC API (for the audit).
    #[arg(
        long,
        env = "INVENTORY_SVC_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    inventory_url: String,
    /// payment-svc's gRPC API (for the audit).
    #[arg(
        long,
        env = "PAYMENT_SVC_URL",
        default_value = "http://127.0.0.1:50053",
        global = true
    )]
    payment_url: String,
}

#[derive(Subcommand)]
enum Command {
    /// List sagas, newest first.
    List(ListArgs),
    /// Show one saga: a timeline of every transition, then where it stands.
    Show {
        /// The saga's id, which is its order's id.
        saga_id: String,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Send again the command of the step a saga waits on (its pending compensations while
    /// COMPENSATING).
    Retry {
        saga_id: String,
        /// Why, for the saga's history.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Compensate a saga now: void its payment, release its stock, fail its order.
    Abort {
        saga_id: String,
        /// Why (required): recorded in the saga's history and the order's failure reason.
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a customer's token for the gateway (`Authorization: Bearer <token>`), signed with
    /// the gateway's HS256 JWT_SECRET (its development secret when unset).
    Token(TokenArgs),
    /// Check the whole platform's consistency through the services' APIs: completed orders paid
    /// in full with their stock committed, failed orders keeping no money and holding no stock,
    /// no saga stuck, stock conserved per SKU.
    Audit {
        /// How long an unfinished saga may wait on a service (or past its payment deadline)
        /// before it counts as stuck, e.g. 5m, 90s, 1h.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        stuck_after: Duration,
        /// Print one JSON document (violations and counts) instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct TokenArgs {
    /// The customer the token is for (its `sub`).
    #[arg(long)]
    customer: String,
    /// The gateway's JWT_SECRET.
    #[arg(long, env = "JWT_SECRET", default_value = gateway::identity::DEV_JWT_SECRET,
          hide_default_value = true, hide_env_values = true)]
    jwt_secret: String,
    /// The gateway's JWT_ISSUER.
    #[arg(long, env = "JWT_ISSUER", default_value = gateway::identity::DEFAULT_ISSUER)]
    jwt_issuer: String,
    /// The gateway's JWT_AUDIENCE.
    #[arg(long, env = "JWT_AUDIENCE", default_value = gateway::identity::DEFAULT_AUDIENCE)]
    jwt_audience: String,
    /// How long the token is valid, e.g. 1h, 30m.
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    valid_for: Duration,
}

#[derive(Args)]
struct ListArgs {
    /// Only sagas in this state (repeat or separate with commas), e.g. compensating.
    #[arg(long = "state", value_delimiter = ',', value_parser = render::parse_state)]
    states: Vec<pb::SagaState>,
    /// Only sagas flagged as needing an operator.
    #[arg(long)]
    needs_operator: bool,
    /// Only unfinished sagas stuck past a deadline (see --stuck-after).
    #[arg(long)]
    stuck: bool,
    /// With --stuck: how long counts as stuck.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    stuck_after: Duration,
    /// Only the sagas of this customer.
    #[arg(long)]
    customer: Option<String>,
    /// Only the saga of this order.
    #[arg(long)]
    order: Option<String>,
    /// Only sagas started longer ago than this, e.g. 10m, 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Only sagas started more recently than this.
    #[arg(long, value_parser = humantime::parse_duration)]
    newer_than: Option<Duration>,
    /// Most sagas to show.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    limit: u32,
    /// Print JSON (an array of sagas) instead.
    #[arg(long)]
    json: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("sagactl: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    if let Command::Token(args) = &cli.command {
        return token(args);
    }
    let targets = cli.targets;
    let admin_status = |status: tonic::Status| {
        Failure::from_status("the orchestrator's admin API", &targets.admin_url, &status)
    };
    let mut admin = sagactl::admin_client(&targets.admin_url, &targets.admin_token).await?;
    match cli.command {
        Command::List(args) => {
            let sagas = list(&mut admin, &args, &admin_status).await?;
            if args.json {
                let json: Vec<_> = sagas.iter().map(render::saga_json).collect();
                println!("{}", pretty(&serde_json::Value::Array(json)));
            } else {
                print!("{}", render::saga_table(&sagas));
                let more = if sagas.len() == args.limit as usize {
                    " (the limit: there may be more, see --limit)"
                } else {
                    ""
                };
                println!(
                    "{} saga{}{more}",
                    sagas.len(),
                    if sagas.len() == 1 { "" } else { "s" }
                );
            }
        }
        Command::Show { saga_id, json } => {
            let detail = admin
                .get_saga(pb::GetSagaRequest { saga_id })
                .await
                .map_err(admin_status)?
                .into_inner();
            print_detail(&detail, json, None);
        }
        Command::Retry {
            saga_id,
            reason,
            json,
        } => {
            let detail = admin
                .retry_saga(pb::RetrySagaRequest {
                    saga_id,
                    reason: reason.unwrap_or_default(),
                    request_id: uuid::Uuid::now_v7().to_string(),
                })
                .await
                .map_err(admin_status)?
                .into_inner();
            print_detail(&detail, json, Some("step sent again"));
        }
        Command::Abort {
            saga_id,
            reason,
            json,
        } => {
            let detail = admin
                .abort_saga(pb::AbortSagaRequest {
                    saga_id,
                    reason,
                    request_id: uuid::Uuid::now_v7().to_string(),
                })
                .await
                .map_err(admin_status)?
                .into_inner();
            print_detail(&detail, json, Some("aborted"));
        }
        Command::Token(args) => return token(&args),
        Command::Audit { stuck_after, json } => {
            let mut audit_targets = audit::Targets {
                admin,
                admin_url: targets.admin_url.clone(),
                order_url: targets.order_url.clone(),
                inventory_url: targets.inventory_url.clone(),
                payment_url: targets.payment_url.clone(),
            };
            let mut violations = Vec::new();
            let summary = audit::run(&mut audit_targets, stuck_after, |v| {
                if json {
                    violations.push(v.clone());
                } else {
                    println!("{v}");
                }
            })
            .await?;
            if json {
                let report = serde_json::json!({
                    "violations": violations,
                    "checked": summary,
                });
                println!("{}", pretty(&report));
            } else {
                println!("{summary}");
            }
            return Ok(if summary.violations > 0 { 1 } else { 0 });
        }
    }
    Ok(0)
}

/// Pages through ListSagas until `--limit` sagas or the last page.
async fn list(
    admin: &mut AdminClient,
    args: &ListArgs,
    status: &impl Fn(tonic::Status) -> Failure,
) -> Result<Vec<pb::Saga>, Failure> {
    let mut sagas = Vec::new();
    let mut page_token = String::new();
    while sagas.len() < args.limit as usize {
        let page = admin
            .list_sagas(pb::ListSagasRequest {
                states: args.states.iter().map(|s| (*s).into()).collect(),
                needs_operator: args.needs_operator,
                customer_id: args.customer.clone().unwrap_or_default(),
                order_id: args.order.clone().unwrap_or_default(),
                older_than_seconds: args.older_than.map_or(0, |d| d.as_secs().max(1)),
                newer_than_seconds: args.newer_than.map_or(0, |d| d.as_secs().max(1)),
                stuck_only: args.stuck,
                stuck_after_seconds: args.stuck_after.as_secs().max(1),
                page_size: (args.limit as usize - sagas.len()).min(1000) as u32,
                page_token: page_token.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        sagas.extend(page.sagas);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(sagas)
}

/// A saga as `show`, `retry` and `abort` print it: JSON, or readable lines headed by what was
/// `done` to it, if anything.
fn print_detail(detail: &pb::SagaDetail, json: bool, done: Option<&str>) {
    if json {
        println!("{}", pretty(&render::detail_json(detail)));
    } else if let Some(done) = done {
        print!("{}", render::operated(done, detail));
    } else {
        print!("{}", render::saga_detail(detail));
    }
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// `sagactl token`: prints the token, alone on its line, for `$(sagactl token ...)`.
fn token(args: &TokenArgs) -> Result<u8, Failure> {
    let token = gateway::identity::hs256_token(
        &args.jwt_secret,
        &args.jwt_issuer,
        &args.jwt_audience,
        &args.customer,
        args.valid_for,
    )
    .map_err(|e| Failure::Error(format!("cannot make a token: {e}")))?;
    println!("{token}");
    Ok(0)
}
