//! Settings, from the command line or the environment, with defaults that run locally.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::provider::{PaymentProvider, Simulator};

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "payment-svc", about = "Payments of the order saga platform")]
pub struct Config {
    /// PostgreSQL database of this service (created and migrated at start).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/payments"
    )]
    pub database_url: String,

    /// Size of the connection pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub database_max_connections: u32,

    /// Address of the gRPC server (port 0 picks a free port).
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50053")]
    pub grpc_addr: SocketAddr,

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
    /// The database settings, as the service skeleton takes them.
    pub fn database(&self) -> runtime::config::DatabaseArgs {
        runtime::config::DatabaseArgs {
            url: self.database_url.clone(),
            max_connections: self.database_max_connections,
        }
    }

    pub fn provider_timeout(&self) -> Duration {
        Duration::from_millis(self.payment_provider_timeout_ms)
    }

    /// Prints the settings, with the database password masked.
    pub fn log(&self) {
        tracing::info!(
            database_url = %runtime::redact_url(&self.database_url),
            database_max_connections = self.database_max_connections,
            grpc_addr = %self.grpc_addr,
            payment_provider = ?self.payment_provider,
            payment_provider_timeout_ms = self.payment_provider_timeout_ms,
            kafka_brokers = %self.kafka.brokers,
            kafka_topic_prefix = %self.kafka.topic_prefix,
            kafka_partitions = self.kafka.partitions,
            kafka_fetch_wait_max_ms = self.kafka.fetch_wait_max_ms,
            kafka_linger_ms = self.kafka.linger_ms,
            consumer_batch_max = self.kafka.batch_max,
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
            config.database_url,
            "postgres://postgres@localhost:5432/payments"
        );
        assert_eq!(config.grpc_addr, "127.0.0.1:50053".parse().unwrap());
        assert_eq!(config.database_max_connections, 8);
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
