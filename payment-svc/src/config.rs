//! Settings, from the command line or the environment, with defaults that run locally.

use std::sync::Arc;
use std::time::Duration;

use runtime::config::{DatabaseArgs, GrpcArgs, ThreadsArgs};

use crate::provider::{PaymentProvider, Simulator};

#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "payment-svc",
    about = "Payments of the order saga platform",
    mut_arg("database_url", |a| a.default_value("postgres://postgres@localhost:5432/payments")),
    mut_arg("grpc_addr", |a| a.default_value("127.0.0.1:50053"))
)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub grpc: GrpcArgs,

    #[command(flatten)]
    pub threads: ThreadsArgs,

    /// Who decides payments.
    #[arg(long, env = "PAYMENT_PROVIDER", value_enum, default_value_t = ProviderKind::Simulator)]
    pub payment_provider: ProviderKind,

    /// How long to wait for the payment provider's answer, in milliseconds; a verification
    /// that gets none answers DEADLINE_EXCEEDED, and retried, settles the same attempt.
    #[arg(long, env = "PAYMENT_PROVIDER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub payment_provider_timeout_ms: u64,

    #[command(flatten)]
    pub kafka: messaging::KafkaArgs,
}

/// The payment providers this build knows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    /// Decides by the payment method token, as providers' test cards do.
    Simulator,
}

impl ProviderKind {
    pub fn build(self) -> Arc<dyn PaymentProvider> {
        match self {
            Self::Simulator => Arc::new(Simulator),
        }
    }
}

impl Config {
    pub fn provider_timeout(&self) -> Duration {
        Duration::from_millis(self.payment_provider_timeout_ms)
    }

    /// Prints the settings, with the database password masked.
    pub fn log(&self) {
        runtime::config::log(&self.database, &self.grpc, &self.threads);
        tracing::info!(
            payment_provider = ?self.payment_provider,
            payment_provider_timeout_ms = self.payment_provider_timeout_ms,
            kafka = ?self.kafka,
            "configuration"
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_run_locally() {
        let config = Config::try_parse_from(["payment-svc"]).unwrap();
        assert_eq!(
            config.database.url,
            "postgres://postgres@localhost:5432/payments"
        );
        assert_eq!(config.grpc.addr, "127.0.0.1:50053".parse().unwrap());
        assert_eq!(config.database.max_connections, 8);
        assert_eq!(config.payment_provider, ProviderKind::Simulator);
        assert_eq!(config.provider_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn unknown_provider_is_refused_at_start() {
        let error = Config::try_parse_from(["payment-svc", "--payment-provider", "stripe"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("simulator"), "{error}");
    }
}
