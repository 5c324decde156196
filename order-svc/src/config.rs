//! Settings, from the command line or the environment, with defaults that run locally.

use std::time::Duration;

use messaging::KafkaArgs;
use runtime::config::{DatabaseArgs, GrpcArgs, ThreadsArgs};

#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "order-svc",
    about = "Orders and the catalog of the order saga platform",
    mut_arg("database_url", |a| a.default_value("postgres://postgres@localhost:5432/orders")),
    mut_arg("grpc_addr", |a| a.default_value("127.0.0.1:50051"))
)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub grpc: GrpcArgs,

    #[command(flatten)]
    pub threads: ThreadsArgs,

    /// payment-svc's gRPC endpoint, which checks payment methods.
    #[arg(
        long,
        env = "PAYMENT_SVC_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub payment_svc_url: String,

    /// Longest wait for payment-svc, connecting included, in milliseconds.
    #[arg(long, env = "PAYMENT_SVC_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub payment_svc_timeout_ms: u64,

    /// How long a payment method payment-svc accepted is taken as accepted without asking
    /// again, in seconds; 0 asks for every order. A refusal is never remembered.
    #[arg(long, env = "PAYMENT_METHOD_CACHE_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub payment_method_cache_secs: u64,

    #[command(flatten)]
    pub kafka: KafkaArgs,
}

impl Config {
    pub fn payment_svc_timeout(&self) -> Duration {
        Duration::from_millis(self.payment_svc_timeout_ms)
    }

    pub fn payment_method_cache(&self) -> Duration {
        Duration::from_secs(self.payment_method_cache_secs)
    }

    /// Prints the settings, with the database password masked.
    pub fn log(&self) {
        runtime::config::log(&self.database, &self.grpc, &self.threads);
        tracing::info!(
            payment_svc_url = %runtime::redact_url(&self.payment_svc_url),
            payment_svc_timeout_ms = self.payment_svc_timeout_ms,
            payment_method_cache_secs = self.payment_method_cache_secs,
            kafka = ?self.kafka,
            "configuration"
        );
    }
}
