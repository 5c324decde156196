//! Settings every service has, flattened into each one's command line. Each service gives
//! its own defaults with clap's `mut_arg`, so that `--help` shows them:
//!
//! ```text
//! #[derive(clap::Parser)]
//! #[command(
//!     mut_arg("database_url", |a| a.default_value("postgres://postgres@localhost:5432/orders")),
//!     mut_arg("grpc_addr", |a| a.default_value("127.0.0.1:50051")),
//! )]
//! struct Config {
//!     #[command(flatten)]
//!     database: runtime::config::DatabaseArgs,
//!     #[command(flatten)]
//!     grpc: runtime::config::GrpcArgs,
//! }
//! ```

use std::net::SocketAddr;

/// The service's own PostgreSQL database.
#[derive(clap::Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL database of this service (created if missing, and migrated, at start).
    // No default here: each service gives its own, which `mut_arg` cannot do for a required
    // argument.
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "DATABASE_URL",
        value_name = "URL",
        required = false
    )]
    pub url: String,

    /// Most connections in the database pool.
    #[arg(id = "database_max_connections", long = "database-max-connections",
          env = "DATABASE_MAX_CONNECTIONS", value_name = "COUNT", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_connections: u32,
}

/// Where the service's gRPC server listens.
#[derive(clap::Args, Clone, Debug)]
pub struct GrpcArgs {
    /// Address of the gRPC server (port 0: any free port).
    // Each service gives its own default, as for the database URL.
    #[arg(
        id = "grpc_addr",
        long = "grpc-addr",
        env = "GRPC_ADDR",
        value_name = "ADDRESS",
        required = false
    )]
    pub addr: SocketAddr,
}

/// Prints the settings every service has, with the database password masked.
pub fn log(database: &DatabaseArgs, grpc: &GrpcArgs) {
    tracing::info!(
        database_url = %crate::redact_url(&database.url),
        database_max_connections = database.max_connections,
        grpc_addr = %grpc.addr,
        "configuration"
    );
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    #[derive(Parser, Debug)]
    #[command(
        name = "test-svc",
        mut_arg("database_url", |a| a.default_value("postgres://postgres@localhost:5432/test")),
        mut_arg("grpc_addr", |a| a.default_value("127.0.0.1:50099"))
    )]
    struct Config {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        grpc: GrpcArgs,
    }

    #[test]
    fn each_service_gives_its_own_defaults_and_help_shows_them() {
        let config = Config::try_parse_from(["test-svc"]).expect("defaults");
        assert_eq!(
            config.database.url,
            "postgres://postgres@localhost:5432/test"
        );
        assert_eq!(config.database.max_connections, 8);
        assert_eq!(config.grpc.addr, "127.0.0.1:50099".parse().unwrap());
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("[default: 127.0.0.1:50099]"), "{help}");
        assert!(help.contains("[env: DATABASE_URL="), "{help}");
        assert!(Config::try_parse_from(["test-svc", "--database-max-connections", "0"]).is_err());
    }
}
