//! Settings, from the command line or the environment, with defaults that run locally.

use std::net::SocketAddr;
use std::time::Duration;

/// inventory-svc: stock and reservations of the order saga.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "inventory-svc", version, about)]
pub struct Config {
    /// PostgreSQL database of this service (created and migrated at start).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/inventory"
    )]
    pub database_url: String,

    /// Size of the database connection pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_max_connections: u32,

    /// Address of the gRPC server (port 0: any free port).
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50052")]
    pub grpc_addr: SocketAddr,

    /// How long a reservation holds stock before the sweep releases it.
    #[arg(long, env = "RESERVATION_TTL_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub reservation_ttl_secs: u64,

    /// How often the sweep looks for expired reservations.
    #[arg(long, env = "RESERVATION_SWEEP_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub reservation_sweep_interval_ms: u64,

    #[command(flatten)]
    pub kafka: messaging::KafkaArgs,
}

impl Config {
    /// The database settings, as the service skeleton takes them.
    pub fn database(&self) -> runtime::config::DatabaseArgs {
        runtime::config::DatabaseArgs {
            url: self.database_url.clone(),
            max_connections: self.database_max_connections,
        }
    }

    pub fn reservation_ttl(&self) -> Duration {
        Duration::from_secs(self.reservation_ttl_secs)
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.reservation_sweep_interval_ms)
    }

    /// Logs the settings, with the database password masked.
    pub fn log(&self) {
        tracing::info!(
            database_url = %runtime::redact_url(&self.database_url),
            database_max_connections = self.database_max_connections,
            grpc_addr = %self.grpc_addr,
            reservation_ttl_secs = self.reservation_ttl_secs,
            reservation_sweep_interval_ms = self.reservation_sweep_interval_ms,
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

    use super::Config;

    #[test]
    fn defaults_run_locally() {
        let config = Config::parse_from(["inventory-svc"]);
        assert_eq!(config.grpc_addr.port(), 50052);
        assert!(config.database_url.ends_with("/inventory"));
        assert_eq!(config.reservation_ttl_secs, 900);
        assert_eq!(config.reservation_sweep_interval_ms, 1000);
        assert_eq!(config.database_max_connections, 8);
    }

    #[test]
    fn a_zero_ttl_is_refused() {
        assert!(Config::try_parse_from(["inventory-svc", "--reservation-ttl-secs", "0"]).is_err());
    }
}
