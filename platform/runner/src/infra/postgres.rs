//! The local PostgreSQL cluster: made with `initdb` on first use, started and stopped with
//! `pg_ctl`, run as the `postgres` user when the runner is root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use sqlx::Connection as _;
use tokio::process::Command;

use super::process;

pub async fn check(url: &str) -> anyhow::Result<()> {
    let connect = sqlx::PgConnection::connect(url);
    let mut conn = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .context("no answer within 5 s")??;
    sqlx::query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}

/// Where the local cluster in `root` makes its Unix socket (`-k`).
fn socket_dir(root: &Path) -> PathBuf {
    root.join("run")
}

/// The URL of the local cluster in `root`, through its Unix socket ([`socket_dir`]): on one
/// machine a statement's round trip costs the kernel less than over loopback TCP (which the
/// cluster also listens on, at `localhost:port`, for other clients).
pub fn local_url(root: &Path, port: u16) -> String {
    let mut url = url::Url::parse(&format!("postgres://postgres@localhost:{port}/postgres"))
        .expect("a constant URL");
    url.query_pairs_mut()
        .append_pair("host", &socket_dir(root).to_string_lossy());
    url.into()
}

/// The pid in the cluster's `postmaster.pid` when that server is alive.
pub fn running_pid(root: &Path) -> Option<u32> {
    process::PidFile::new(root.join("data").join("postmaster.pid")).live("postgres")
}

/// The local cluster in `root` on `port`: one an earlier run left running there is taken over
/// when it answers and stopped otherwise (said in one line); a port held by any other server
/// is an error saying how to use it or move ours.
pub async fn provision(root: &Path, port: u16, fast: bool) -> anyhow::Result<String> {
    let url = local_url(root, port);
    if let Some(pid) = running_pid(root) {
        if check(&url).await.is_ok() {
            say!(
                "platform: taking over the PostgreSQL an earlier run left running (pid {pid}, {})",
                root.display()
            );
            return Ok(url);
        }
        say!(
            "platform: stopping the PostgreSQL an earlier run left running (pid {pid}), which \
             does not answer on port {port}"
        );
        if stop(root, false).await.is_err() {
            process::stop(pid, Duration::from_secs(10)).await;
        }
    }
    if process::port_taken(port) {
        bail!(
            "port {port} is taken by a server that is not this platform's PostgreSQL (whose \
             cluster is {}): to use a PostgreSQL already running there, give its URL in \
             DATABASE_URL (e.g. postgres://postgres@localhost:{port}/postgres); to run the local \
             one elsewhere, set PLATFORM_POSTGRES_PORT",
            root.display()
        );
    }
    start(root, port, fast).await
}

pub(crate) fn running_as_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// PostgreSQL's server programs: on PATH, or the newest under /usr/lib/postgresql.
pub(crate) fn pg_bin(program: &str) -> anyhow::Result<PathBuf> {
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

/// Starts a PostgreSQL cluster kept in `root` (made with initdb on first use) on `port`, and
/// returns its URL. `fast`: `fsync=off`, safe when only processes crash.
pub async fn start(root: &Path, port: u16, fast: bool) -> anyhow::Result<String> {
    let url = local_url(root, port);
    let data = root.join("data");
    let run = socket_dir(root);
    fs::create_dir_all(&run)?;
    if running_as_root() {
        chown_to_postgres(root).await?;
    }
    if !data.join("PG_VERSION").exists() {
        say!(
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
    // Statement counts for the benchmarks (README, "Figures") and for tests of how many
    // round trips an operation takes, as production clusters commonly have them; it costs a
    // few microseconds per statement.
    settings.push_str(" -c shared_preload_libraries=pg_stat_statements");
    if fast {
        settings.push_str(" -c fsync=off -c full_page_writes=off");
    }
    say!("platform: starting PostgreSQL on port {port}");
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
            "PostgreSQL did not start ({status}); see {}",
            root.join("postgres.log").display()
        );
    }
    check(&url)
        .await
        .context("PostgreSQL started but refuses connections")?;
    Ok(url)
}

/// Stops the cluster in `root`: `immediate` is a crash (no checkpoint; WAL replay at the next
/// start), otherwise a clean fast shutdown.
pub async fn stop(root: &Path, immediate: bool) -> anyhow::Result<()> {
    let postmaster = running_pid(root);
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
    // pg_ctl returns once the pid file is gone; the postmaster exits a moment later, and
    // its port is free only then.
    if let Some(pid) = postmaster {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while process::alive(pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// `parent/name` for a PostgreSQL cluster, or a directory of its own under
/// `/var/tmp/saga-platform` (named after `parent`, so that a later run finds the same) when we
/// are root and the `postgres` user, who owns the cluster, cannot reach `parent`.
pub fn cluster_dir(parent: &Path, name: &str) -> PathBuf {
    // The parent must exist for the check to mean anything.
    let _ = fs::create_dir_all(parent);
    if !running_as_root() || reachable_by_postgres(parent) {
        parent.join(name)
    } else {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        parent
            .canonicalize()
            .unwrap_or(parent.to_path_buf())
            .hash(&mut hasher);
        PathBuf::from("/var/tmp/saga-platform")
            .join(format!("{:016x}", hasher.finish()))
            .join(name)
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

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use super::*;

    #[test]
    fn the_services_reach_the_local_cluster_through_its_socket() {
        let url = local_url(Path::new("/state dir/postgres"), 5433);
        let options = sqlx::postgres::PgConnectOptions::from_str(&url).expect("sqlx reads it");
        assert_eq!(
            options.get_socket(),
            Some(&PathBuf::from("/state dir/postgres/run"))
        );
        assert_eq!(options.get_port(), 5433);
        assert_eq!(options.get_username(), "postgres");
        assert_eq!(
            test_support::with_database(&url, "orders"),
            "postgres://postgres@localhost:5433/orders?host=%2Fstate+dir%2Fpostgres%2Frun"
        );
    }
}
