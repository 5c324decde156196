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

/// Worker threads of a service unless told otherwise ([`ThreadsArgs`]).
pub const DEFAULT_WORKER_THREADS: u16 = 1;

/// The threads a service's tasks run on.
#[derive(clap::Args, Clone, Debug)]
pub struct ThreadsArgs {
    /// Threads that run the service's tasks. One by default: a service mostly waits on
    /// PostgreSQL, Kafka and its peers, and where it shares the machine's cores with them,
    /// more threads cost more in waking each other than they add (README, "Figures"). Raise it
    /// for a replica that has cores of its own.
    #[arg(long = "worker-threads", env = "WORKER_THREADS", value_name = "COUNT",
          default_value_t = DEFAULT_WORKER_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,
}

impl Default for ThreadsArgs {
    fn default() -> Self {
        ThreadsArgs {
            worker_threads: DEFAULT_WORKER_THREADS,
        }
    }
}

impl ThreadsArgs {
    /// A Tokio runtime with this many worker threads, its I/O and timers enabled.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.worker_threads.into())
            .enable_all()
            .build()
    }
}

/// Prints the settings every service has, with the database password masked.
pub fn log(database: &DatabaseArgs, grpc: &GrpcArgs, threads: &ThreadsArgs) {
    tracing::info!(
        database_url = %crate::redact_url(&database.url),
        database_max_connections = database.max_connections,
        grpc_addr = %grpc.addr,
        worker_threads = threads.worker_threads,
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
        #[command(flatten)]
        threads: ThreadsArgs,
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

    #[test]
    fn a_service_runs_on_one_worker_thread_unless_told_otherwise() {
        let config = Config::try_parse_from(["test-svc"]).expect("defaults");
        let runtime = config.threads.runtime().expect("a runtime");
        assert_eq!(runtime.metrics().num_workers(), 1);

        let config = Config::try_parse_from(["test-svc", "--worker-threads", "3"]).expect("3");
        let runtime = config.threads.runtime().expect("a runtime");
        assert_eq!(runtime.metrics().num_workers(), 3);

        let refused = Config::try_parse_from(["test-svc", "--worker-threads", "0"]).unwrap_err();
        assert!(
            refused.to_string().contains("--worker-threads"),
            "{refused}"
        );
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("[env: WORKER_THREADS=]"), "{help}");
    }
}
