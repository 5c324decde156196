//! Settings, from the command line or the environment, with defaults that run locally.

use std::time::Duration;

use runtime::config::{DatabaseArgs, GrpcArgs, ThreadsArgs};

/// inventory-svc: stock and reservations of the order saga.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "inventory-svc",
    version,
    about,
    mut_arg("database_url", |a| a.default_value("postgres://postgres@localhost:5432/inventory")),
    mut_arg("grpc_addr", |a| a.default_value("127.0.0.1:50052"))
)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub grpc: GrpcArgs,

    #[command(flatten)]
    pub threads: ThreadsArgs,

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
    pub fn reservation_ttl(&self) -> Duration {
        Duration::from_secs(self.reservation_ttl_secs)
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.reservation_sweep_interval_ms)
    }

    /// Logs the settings, with the database password masked.
    pub fn log(&self) {
        runtime::config::log(&self.database, &self.grpc, &self.threads);
        tracing::info!(
            reservation_ttl_secs = self.reservation_ttl_secs,
            reservation_sweep_interval_ms = self.reservation_sweep_interval_ms,
            kafka = ?self.kafka,
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
        assert_eq!(config.grpc.addr.port(), 50052);
        assert!(config.database.url.ends_with("/inventory"));
        assert_eq!(config.reservation_ttl_secs, 900);
        assert_eq!(config.reservation_sweep_interval_ms, 1000);
        assert_eq!(config.database.max_connections, 8);
    }

    #[test]
    fn a_zero_ttl_is_refused() {
        assert!(Config::try_parse_from(["inventory-svc", "--reservation-ttl-secs", "0"]).is_err());
    }
}
