//! What the runner installs on a fresh machine before it needs it: PostgreSQL's server
//! programs (Debian's `postgresql`), and for a test run the checkers the tests call
//! (`docker-compose` and `kcat` from Debian, the Python tools of
//! `platform/e2e/test-tools/requirements.txt` from PyPI). Each is installed only when missing.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use tokio::process::Command;

use crate::infra::postgres;

/// The Python tools the tests call, pinned.
pub fn requirements_file() -> PathBuf {
    crate::workspace_root().join("platform/e2e/test-tools/requirements.txt")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Installs Debian `packages` with one `apt-get update` first; as root only (otherwise the
/// error says what to install).
async fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let list = packages.join(" ");
    if !postgres::running_as_root() || !on_path("apt-get") {
        bail!("missing: {list}; install them (Debian: sudo apt-get install {list})");
    }
    say!("platform: installing {list} (apt-get, once)");
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .await
        .context("running apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed ({update})");
    }
    let install = Command::new("apt-get")
        .args(["install", "-yq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .await
        .context("running apt-get install")?;
    if !install.success() {
        bail!("apt-get install {list} failed ({install})");
    }
    Ok(())
}

/// PostgreSQL's server programs (`initdb`, `pg_ctl`), for a locally provisioned cluster.
pub async fn ensure_postgres_server() -> anyhow::Result<()> {
    if postgres::pg_bin("initdb").is_ok() {
        return Ok(());
    }
    apt_install(&["postgresql"]).await
}

/// Everything the test suite calls beyond PostgreSQL and Kafka. Returns the directory the
/// Python tools' commands are installed in, for the tests' PATH.
pub async fn ensure_test_tools() -> anyhow::Result<Option<PathBuf>> {
    let mut missing = Vec::new();
    for (program, package) in [("docker-compose", "docker-compose"), ("kcat", "kcat")] {
        if !on_path(program) {
            missing.push(package);
        }
    }
    apt_install(&missing).await?;

    let requirements = requirements_file();
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status()
        .await
        .context("running python3 -m pip (the test suite needs Python 3 with pip)")?;
    if !status.success() {
        bail!(
            "pip install -r {} failed ({status})",
            requirements.display()
        );
    }
    // pyenv finds newly installed commands only after a rehash.
    let _ = Command::new("pyenv").arg("rehash").status().await;
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .await?;
    let scripts = String::from_utf8_lossy(&scripts.stdout).trim().to_owned();
    Ok((!scripts.is_empty()).then(|| PathBuf::from(scripts)))
}
