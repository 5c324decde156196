//! PostgreSQL and Apache Kafka for a local platform or a test run: used as given by URL,
//! otherwise provisioned here (and stopped afterwards), with what an earlier run left running
//! in the same state directory found again rather than colliding with it.

pub mod kafka;
pub mod postgres;
pub mod process;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::Child;

pub use kafka::Broker;
pub use postgres::{cluster_dir, start as start_postgres, stop as stop_postgres};
pub use process::PidFile;

#[derive(Clone, Debug)]
pub struct Options {
    /// A PostgreSQL server to use instead of provisioning one (any database on it).
    pub database_url: Option<String>,
    /// Brokers to use instead of provisioning Apache Kafka.
    pub kafka_brokers: Option<String>,
    pub postgres_port: u16,
    pub kafka_port: u16,
    /// A test run's infrastructure: PostgreSQL with `fsync=off` (faster, and still safe when
    /// only processes crash, which is all tests do) and a broker whose data is wiped at each
    /// start (tests make topics of their own by the hundred). Otherwise fsync on, and the
    /// broker's data kept across runs.
    pub for_tests: bool,
    pub state_dir: PathBuf,
    /// Another runner alive on the same state directory (`platform up` while `platform test`
    /// runs, say): what it runs is used as it is, and left to it to stop.
    pub shared_with: Option<u32>,
}

impl Options {
    fn postgres_root(&self) -> PathBuf {
        cluster_dir(&self.state_dir, "postgres")
    }

    fn broker_dir(&self) -> PathBuf {
        self.state_dir.join(if self.for_tests {
            "kafka-test"
        } else {
            "kafka"
        })
    }
}

/// The infrastructure in use; what was started (or taken over) here is stopped by
/// [`Infra::stop`], what was merely used is left alone.
pub struct Infra {
    pub database_url: String,
    pub kafka_brokers: String,
    postgres: Option<PathBuf>,
    broker: Option<Broker>,
}

impl Infra {
    pub async fn provision(options: &Options) -> anyhow::Result<Infra> {
        std::fs::create_dir_all(&options.state_dir)
            .with_context(|| format!("creating {}", options.state_dir.display()))?;
        let (database_url, postgres) = match &options.database_url {
            Some(url) => {
                postgres::check(url)
                    .await
                    .with_context(|| format!("PostgreSQL at {url}"))?;
                (url.clone(), None)
            }
            None => {
                crate::tools::ensure_postgres_server().await?;
                let root = options.postgres_root();
                let url = format!(
                    "postgres://postgres@localhost:{}/postgres",
                    options.postgres_port
                );
                match options.shared_with {
                    Some(runner) if postgres::check(&url).await.is_ok() => {
                        say!(
                            "platform: using the PostgreSQL of the runner still running (pid {runner}) on port {}",
                            options.postgres_port
                        );
                        (url, None)
                    }
                    _ => {
                        let url =
                            postgres::provision(&root, options.postgres_port, options.for_tests)
                                .await?;
                        (url, Some(root))
                    }
                }
            }
        };
        let mut infra = Infra {
            database_url,
            kafka_brokers: String::new(),
            postgres,
            broker: None,
        };
        match &options.kafka_brokers {
            Some(brokers) => match kafka::answers(brokers) {
                Ok(()) => infra.kafka_brokers = brokers.clone(),
                Err(e) => {
                    infra.stop().await;
                    return Err(e.context(format!("Kafka broker at {brokers}")));
                }
            },
            None if options.shared_with.is_some()
                && kafka::answers(&format!("127.0.0.1:{}", options.kafka_port)).is_ok() =>
            {
                say!(
                    "platform: using the Kafka broker of the runner still running (pid {}) on port {}",
                    options.shared_with.unwrap_or_default(),
                    options.kafka_port
                );
                infra.kafka_brokers = format!("127.0.0.1:{}", options.kafka_port);
            }
            None => {
                let dir = options.broker_dir();
                if options.for_tests && kafka::left_running(&dir).is_none() {
                    // A fresh cluster per test run.
                    let _ = std::fs::remove_dir_all(&dir);
                }
                match Broker::start(&dir, options.kafka_port).await {
                    Ok(broker) => {
                        infra.kafka_brokers = broker.brokers();
                        infra.broker = Some(broker);
                    }
                    Err(e) => {
                        infra.stop().await;
                        return Err(e);
                    }
                }
            }
        }
        Ok(infra)
    }

    /// Stops what [`Infra::provision`] started or took over (nothing it merely used): the
    /// broker first, then PostgreSQL, each within a grace period.
    pub async fn stop(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.stop(Duration::from_secs(15)).await;
            say!("platform: Kafka stopped");
        }
        if let Some(root) = self.postgres.take() {
            match stop_postgres(&root, false).await {
                Ok(()) => say!("platform: PostgreSQL stopped"),
                Err(e) => {
                    say!("platform: stopping PostgreSQL: {e:#}; killing it");
                    if let Some(pid) = postgres::running_pid(&root) {
                        process::stop(pid, Duration::from_secs(5)).await;
                    }
                }
            }
        }
    }
}

/// The runners (`platform up`, `test`, `infra`) alive on `state_dir`, by their pid files in
/// `state_dir/run`; files of dead runners are removed.
pub fn runners(state_dir: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("run")) else {
        return Vec::new();
    };
    let mut alive = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("platform-") && name.ends_with(".pid")) {
            continue;
        }
        let file = PidFile::new(entry.path());
        match file.live("platform") {
            Some(pid) if pid != std::process::id() => alive.push(pid),
            Some(_) => {}
            None => file.remove(),
        }
    }
    alive
}

/// Records this runner in `state_dir/run`, for [`runners`] and `platform down`.
pub fn register_runner(state_dir: &std::path::Path) -> std::io::Result<PidFile> {
    let file = PidFile::new(
        state_dir
            .join("run")
            .join(format!("platform-{}.pid", std::process::id())),
    );
    file.write(std::process::id())?;
    Ok(file)
}

/// SIGTERM, then SIGKILL after `grace`.
pub async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        process::signal(i64::from(pid), "TERM");
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}
