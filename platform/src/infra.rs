//! PostgreSQL and the Kafka-API broker for a local platform or a test run: reused when
//! already running (or given by URL), otherwise provisioned here and stopped afterwards.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use sqlx::Connection as _;
use tokio::process::{Child, Command};

/// The broker version the platform is tested with, and how to install it.
pub const TANSU_INSTALL: &[&str] = &[
    "install",
    "--locked",
    "tansu",
    "--version",
    "0.6.0",
    "--features",
    "dynostore,libsql",
];

#[derive(Clone, Debug)]
pub struct Options {
    /// A PostgreSQL server to use instead of provisioning one (any database on it).
    pub database_url: Option<String>,
    /// Brokers to use instead of provisioning tansu.
    pub kafka_brokers: Option<String>,
    pub postgres_port: u16,
    pub kafka_port: u16,
    /// Keep the broker's messages on disk (`sqlite://`), surviving a restart of the broker;
    /// in memory otherwise, which is lighter but empty after each start.
    pub durable_broker: bool,
    /// Run PostgreSQL with `fsync=off`: faster, and still safe when only processes crash,
    /// which is all tests do; not for data you want to keep across a machine crash.
    pub fast_postgres: bool,
    pub state_dir: PathBuf,
}

/// The infrastructure in use; what was started here is stopped by [`Infra::stop`].
pub struct Infra {
    pub database_url: String,
    pub kafka_brokers: String,
    postgres: Option<PathBuf>,
    broker: Option<Child>,
}

impl Infra {
    pub async fn provision(options: &Options) -> anyhow::Result<Infra> {
        fs::create_dir_all(&options.state_dir)
            .with_context(|| format!("creating {}", options.state_dir.display()))?;
        let (database_url, postgres) = match &options.database_url {
            Some(url) => {
                check_postgres(url)
                    .await
                    .with_context(|| format!("PostgreSQL at {url}"))?;
                (url.clone(), None)
            }
            None => provision_postgres(options).await?,
        };
        let (kafka_brokers, broker) = match &options.kafka_brokers {
            Some(brokers) => {
                check_broker(brokers).with_context(|| format!("Kafka broker at {brokers}"))?;
                (brokers.clone(), None)
            }
            None => provision_broker(options).await?,
        };
        Ok(Infra {
            database_url,
            kafka_brokers,
            postgres,
            broker,
        })
    }

    /// Stops what [`Infra::provision`] started (nothing it merely reused).
    pub async fn stop(mut self) {
        if let Some(mut broker) = self.broker.take() {
            terminate(&mut broker, Duration::from_secs(5)).await;
            eprintln!("platform: broker stopped");
        }
        if let Some(root) = self.postgres.take() {
            match stop_postgres(&root, false).await {
                Ok(()) => eprintln!("platform: PostgreSQL stopped"),
                Err(e) => eprintln!("platform: stopping PostgreSQL: {e:#}"),
            }
        }
    }
}

/// `server_url` with its database replaced by `database`.
pub fn with_database(server_url: &str, database: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server_url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

async fn check_postgres(url: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}

fn check_broker(brokers: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("log_level", "0")
        .create()?;
    consumer.fetch_metadata(None, Duration::from_secs(3))?;
    Ok(())
}

fn running_as_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// PostgreSQL's server programs: on PATH, or the newest under /usr/lib/postgresql.
fn pg_bin(program: &str) -> anyhow::Result<PathBuf> {
    if let Ok(paths) = std::env::var("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(program);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .iter()
        .rev()
        .map(|v| v.join("bin").join(program))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{program} not found: install the PostgreSQL server (Debian: apt-get install postgresql)")
        })
}

/// A PostgreSQL server program, run as the `postgres` user when we are root (initdb and
/// postgres refuse to run as root).
fn pg_command(program: &str) -> anyhow::Result<Command> {
    let path = pg_bin(program)?;
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        Ok(command)
    } else {
        Ok(Command::new(path))
    }
}

async fn provision_postgres(options: &Options) -> anyhow::Result<(String, Option<PathBuf>)> {
    let port = options.postgres_port;
    let url = format!("postgres://postgres@localhost:{port}/postgres");
    if check_postgres(&url).await.is_ok() {
        eprintln!("platform: using the PostgreSQL already running on port {port}");
        return Ok((url, None));
    }
    let root = postgres_dir(options)?;
    let url = start_postgres(&root, port, options.fast_postgres).await?;
    Ok((url, Some(root)))
}

/// Starts a PostgreSQL cluster kept in `root` (made with initdb on first use) on `port`, and
/// returns its URL. `fast`: `fsync=off`, safe when only processes crash.
pub async fn start_postgres(root: &Path, port: u16, fast: bool) -> anyhow::Result<String> {
    let url = format!("postgres://postgres@localhost:{port}/postgres");
    let data = root.join("data");
    let run = root.join("run");
    fs::create_dir_all(&run)?;
    if running_as_root() {
        chown_to_postgres(root).await?;
    }
    if !data.join("PG_VERSION").exists() {
        eprintln!(
            "platform: creating a PostgreSQL cluster in {}",
            data.display()
        );
        let status = pg_command("initdb")?
            .arg("-D")
            .arg(&data)
            .args([
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-instructions",
            ])
            .stdout(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("initdb failed ({status})");
        }
    }
    let mut settings = format!(
        "-p {port} -k {} -c listen_addresses=localhost -c max_connections=500 -c shared_buffers=256MB",
        run.display()
    );
    if fast {
        settings.push_str(" -c fsync=off -c full_page_writes=off");
    }
    eprintln!("platform: starting PostgreSQL on port {port}");
    let status = pg_command("pg_ctl")?
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(root.join("postgres.log"))
        .args(["-w", "-t", "60", "-o", &settings, "start"])
        .stdout(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!(
            "PostgreSQL did not start ({status}); see {}. If port {port} is taken by another \
             server, give its URL in DATABASE_URL",
            root.join("postgres.log").display()
        );
    }
    check_postgres(&url)
        .await
        .context("PostgreSQL started but refuses connections")?;
    Ok(url)
}

/// Stops the cluster in `root`: `immediate` is a crash (no checkpoint; WAL replay at the next
/// start), otherwise a clean fast shutdown.
pub async fn stop_postgres(root: &Path, immediate: bool) -> anyhow::Result<()> {
    let status = pg_command("pg_ctl")?
        .arg("-D")
        .arg(root.join("data"))
        .args([
            "-m",
            if immediate { "immediate" } else { "fast" },
            "-w",
            "stop",
        ])
        .stdout(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("pg_ctl stop failed ({status})");
    }
    Ok(())
}

/// The cluster's directory. When running as root the cluster belongs to `postgres`, which
/// must be able to reach it; a state directory it cannot reach falls back to /var/tmp.
fn postgres_dir(options: &Options) -> anyhow::Result<PathBuf> {
    Ok(cluster_dir(&options.state_dir, "postgres"))
}

/// `parent/name` for a PostgreSQL cluster, or `/var/tmp/saga-platform/name` when we are root
/// and the `postgres` user, who owns the cluster, cannot reach `parent`.
pub fn cluster_dir(parent: &Path, name: &str) -> PathBuf {
    // The parent must exist for the check to mean anything.
    let _ = fs::create_dir_all(parent);
    if !running_as_root() || reachable_by_postgres(parent) {
        parent.join(name)
    } else {
        PathBuf::from("/var/tmp/saga-platform").join(name)
    }
}

fn reachable_by_postgres(dir: &Path) -> bool {
    std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

async fn chown_to_postgres(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .await?;
    if !status.success() {
        bail!("chown of {} to postgres failed", dir.display());
    }
    Ok(())
}

/// The tansu binary: on PATH, in cargo's bin directory, or installed now.
async fn tansu_binary() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    eprintln!(
        "platform: the tansu broker is not installed; installing it now (about 8 minutes): cargo {}",
        TANSU_INSTALL.join(" ")
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo).args(TANSU_INSTALL).status().await?;
    if !status.success() {
        bail!("installing tansu failed ({status})");
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("tansu was installed but is not on PATH nor in ~/.cargo/bin")
}

async fn provision_broker(options: &Options) -> anyhow::Result<(String, Option<Child>)> {
    let port = options.kafka_port;
    let brokers = format!("127.0.0.1:{port}");
    if check_broker(&brokers).is_ok() {
        eprintln!("platform: using the Kafka broker already running on port {port}");
        return Ok((brokers, None));
    }
    let dir = options.state_dir.join("tansu");
    let child = start_broker(&dir, port, options.durable_broker).await?;
    Ok((brokers, Some(child)))
}

/// The broker's store in its directory, when durable.
const BROKER_STORE: &str = "tansu.db";

/// Starts a tansu broker on 127.0.0.1:`port` with its log in `dir`, and waits until it answers.
///
/// `durable`: messages are stored in `dir` (`sqlite://`), which survives a `kill -9` of the
/// broker and keeps them across restarts, with the index tansu 0.6 lacks added (see
/// [`index_broker_store`]). Otherwise in memory (`memory://`): empty after each start, and
/// lighter on CPU (measured here: an idle platform keeps tansu at about a quarter of a core
/// in memory against a full core on `sqlite://`, whose every fetch re-plans its SQL), though
/// tansu's memory store lists every stored batch of a partition on each fetch, so it slows
/// as messages accumulate; fine for a test run.
pub async fn start_broker(dir: &Path, port: u16, durable: bool) -> anyhow::Result<Child> {
    let brokers = format!("127.0.0.1:{port}");
    let tansu = tansu_binary().await?;
    fs::create_dir_all(dir)?;
    let storage = if durable {
        format!("sqlite://{BROKER_STORE}")
    } else {
        "memory://tansu/".to_owned()
    };
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("broker.log"))?;
    eprintln!("platform: starting the tansu broker on port {port} ({storage})");
    let listener = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new(&tansu);
    command
        .args([
            "broker",
            "--listener-url",
            &listener,
            "--advertised-listener-url",
            &listener,
        ])
        .args(["--storage-engine", &storage])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    // The broker would export its own traces to whatever collector the services use.
    for (key, _) in std::env::vars() {
        if key.starts_with("OTEL_") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", tansu.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Ready when it answers and, if durable, its store has its tables and the index.
        if check_broker(&brokers).is_ok()
            && (!durable || index_broker_store(&dir.join(BROKER_STORE)).await?)
        {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the broker exited ({status}); see {}",
                dir.join("broker.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the broker was not ready within 30 s; see {}",
                dir.join("broker.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Adds the index tansu 0.6's store lacks: it reads a fetched record's headers with a join on
/// `header (topition, offset_id)`, which has no index, so every record fetched scanned every
/// header stored, and a broker used CPU in proportion to all the messages it ever kept (a
/// full core after a few thousand sagas). Idempotent. Returns false while tansu has not made
/// its tables yet.
async fn index_broker_store(store: &Path) -> anyhow::Result<bool> {
    let path = store.to_owned();
    tokio::task::spawn_blocking(move || -> rusqlite::Result<bool> {
        let db = rusqlite::Connection::open(&path)?;
        db.busy_timeout(Duration::from_secs(10))?;
        let tables: i64 = db.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'header'",
            [],
            |row| row.get(0),
        )?;
        if tables == 0 {
            return Ok(false);
        }
        db.execute(
            "CREATE INDEX IF NOT EXISTS header_record ON header (topition, offset_id)",
            [],
        )?;
        Ok(true)
    })
    .await?
    .with_context(|| format!("indexing the broker's store {}", store.display()))
}

/// SIGTERM, then SIGKILL after `grace`.
pub async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://postgres@localhost:5432/postgres", "orders"),
            "postgres://postgres@localhost:5432/orders"
        );
        assert_eq!(
            with_database("postgres://u:p@db:5432?sslmode=disable", "orders"),
            "postgres://u:p@db:5432/orders?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h/x?sslmode=disable", "y"),
            "postgres://u@h/y?sslmode=disable"
        );
    }
}
