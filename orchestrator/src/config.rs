use std::net::SocketAddr;
use std::time::Duration;

use messaging::KafkaArgs;
use runtime::config::{DatabaseArgs, GrpcArgs, ThreadsArgs};

/// The saga orchestrator. Every setting can also be given by the environment variable shown.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "orchestrator",
    version,
    about,
    mut_arg("database_url", |a| a.default_value("postgres://postgres@localhost:5432/orchestrator")),
    // Health and reflection only: the orchestrator's own API is the operators' (ADMIN_ADDR).
    mut_arg("grpc_addr", |a| a.default_value("127.0.0.1:50054"))
)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub grpc: GrpcArgs,

    #[command(flatten)]
    pub threads: ThreadsArgs,

    /// Address of the operators' gRPC API (SagaAdmin, with health and reflection), apart from
    /// anything customers reach (0 as port picks a free one).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:50055")]
    pub admin_addr: SocketAddr,

    /// Token operators present as `authorization: Bearer <token>` on the admin API. When not
    /// set, the development token `dev-admin-token` is accepted and a warning says so.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Time a client has to verify the payment after placing the order; past it the payment is
    /// voided and the stock released.
    #[arg(long, env = "PAYMENT_DEADLINE_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400 * 7))]
    pub payment_deadline_secs: u64,

    /// Time a service has to answer a saga step before the step's command is sent again
    /// (doubling at every attempt, up to 10 minutes).
    #[arg(long, env = "STEP_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub step_timeout_secs: u64,

    /// Attempts of one step after which its saga is flagged as needing an operator; it keeps
    /// retrying.
    #[arg(long, env = "STEP_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub step_max_attempts: u32,

    /// How often due timers are looked for.
    #[arg(long, env = "TIMER_POLL_INTERVAL_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub timer_poll_interval_ms: u64,

    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// The admin token accepted when `ADMIN_TOKEN` is not set: for development only.
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";

impl Config {
    /// The admin token, and whether it is the development default.
    pub fn admin_token(&self) -> (String, bool) {
        match self.admin_token.as_deref().map(str::trim) {
            Some(token) if !token.is_empty() => (token.to_owned(), false),
            _ => (DEV_ADMIN_TOKEN.to_owned(), true),
        }
    }

    pub fn timing(&self) -> crate::engine::Timing {
        crate::engine::Timing {
            payment_deadline: Duration::from_secs(self.payment_deadline_secs),
            step_timeout: Duration::from_secs(self.step_timeout_secs),
            step_max_attempts: self.step_max_attempts,
        }
    }

    /// Logs the settings, with the database password masked.
    pub fn log(&self) {
        runtime::config::log(&self.database, &self.grpc, &self.threads);
        tracing::info!(
            admin_addr = %self.admin_addr,
            admin_token = if self.admin_token().1 { "development default" } else { "***" },
            payment_deadline_secs = self.payment_deadline_secs,
            step_timeout_secs = self.step_timeout_secs,
            step_max_attempts = self.step_max_attempts,
            timer_poll_interval_ms = self.timer_poll_interval_ms,
            kafka = ?self.kafka,
            "configuration"
        );
    }
}
