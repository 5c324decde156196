//! Settings, from the command line or the environment, with defaults that run locally.

use std::net::SocketAddr;
use std::time::Duration;

use messaging::KafkaArgs;

#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "order-svc",
    about = "Orders and the catalog of the order saga platform"
)]
pub struct Config {
    /// PostgreSQL database of this service (created at start if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/orders"
    )]
    pub database_url: String,

    /// Most connections in the database pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_max_connections: u32,

    /// Address of the gRPC server (`order.v1.OrderService`); port 0 picks a free one.
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

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

    #[command(flatten)]
    pub kafka: KafkaArgs,
}

impl Config {
    /// The database settings, as the service skeleton takes them.
    pub fn database(&self) -> runtime::config::DatabaseArgs {
        runtime::config::DatabaseArgs {
            url: self.database_url.clone(),
            max_connections: self.database_max_connections,
        }
    }

    pub fn payment_svc_timeout(&self) -> Duration {
        Duration::from_millis(self.payment_svc_timeout_ms)
    }

    /// Prints the settings, with the database password masked.
    pub fn log(&self) {
        tracing::info!(
            database_url = %runtime::redact_url(&self.database_url),
            database_max_connections = self.database_max_connections,
            grpc_addr = %self.grpc_addr,
            payment_svc_url = %runtime::redact_url(&self.payment_svc_url),
            payment_svc_timeout_ms = self.payment_svc_timeout_ms,
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
