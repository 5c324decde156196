//! The five service binaries and how to start them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// Every service binary of the workspace, in start-up order.
pub const SERVICES: [&str; 5] = telemetry::services::NAMES;

/// Addresses the services listen on.
#[derive(Clone, Debug)]
pub struct Addresses {
    pub order: SocketAddr,
    pub inventory: SocketAddr,
    pub payment: SocketAddr,
    pub orchestrator: SocketAddr,
    /// The orchestrator's operators' API (SagaAdmin).
    pub admin: SocketAddr,
    pub gateway: SocketAddr,
    /// Where each service serves Prometheus `/metrics` (`METRICS_ADDR`), in [`SERVICES`] order.
    pub metrics: [SocketAddr; 5],
}

impl Default for Addresses {
    /// The services' own defaults.
    fn default() -> Self {
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            order: local(50051),
            inventory: local(50052),
            payment: local(50053),
            orchestrator: local(50054),
            admin: local(50055),
            gateway: local(3000),
            metrics: SERVICES.map(telemetry::prometheus::default_addr),
        }
    }
}

impl Addresses {
    /// Free ports on 127.0.0.1, for tests running several platforms at once.
    pub fn free() -> std::io::Result<Self> {
        Ok(Self {
            order: free_port()?,
            inventory: free_port()?,
            payment: free_port()?,
            orchestrator: free_port()?,
            admin: free_port()?,
            gateway: free_port()?,
            metrics: [
                free_port()?,
                free_port()?,
                free_port()?,
                free_port()?,
                free_port()?,
            ],
        })
    }

    /// Where `service` serves `/metrics`.
    pub fn metrics_of(&self, service: &str) -> Option<SocketAddr> {
        SERVICES
            .iter()
            .position(|s| *s == service)
            .map(|i| self.metrics[i])
    }
}

/// What every service of one platform shares.
#[derive(Clone, Debug)]
pub struct PlatformConfig {
    /// URL of the PostgreSQL server (any database): each service gets its own database on it.
    pub database_server_url: String,
    /// Prefix of the services' database names (`""` locally, unique per test).
    pub database_prefix: String,
    pub kafka_brokers: String,
    pub topic_prefix: String,
    pub addresses: Addresses,
    /// Extra environment for every service (`RUST_LOG`, `PAYMENT_DEADLINE_SECS`...).
    pub extra_env: Vec<(String, String)>,
}

impl PlatformConfig {
    /// The database URL of `service`.
    pub fn database_url(&self, database: &str) -> String {
        test_support::with_database(
            &self.database_server_url,
            &format!("{}{database}", self.database_prefix),
        )
    }

    /// The environment of one service binary.
    pub fn env(&self, service: &str) -> Vec<(String, String)> {
        let a = &self.addresses;
        let url = |addr: SocketAddr| format!("http://{addr}");
        let mut env: Vec<(String, String)> = vec![
            ("KAFKA_BROKERS".into(), self.kafka_brokers.clone()),
            ("KAFKA_TOPIC_PREFIX".into(), self.topic_prefix.clone()),
            // One replica of each service: restarted, it takes its partitions back at once.
            ("KAFKA_GROUP_INSTANCE_ID".into(), service.to_owned()),
        ];
        let own: Vec<(&str, String)> = match service {
            "order-svc" => vec![
                ("DATABASE_URL", self.database_url("orders")),
                ("GRPC_ADDR", a.order.to_string()),
                ("PAYMENT_SVC_URL", url(a.payment)),
            ],
            "inventory-svc" => vec![
                ("DATABASE_URL", self.database_url("inventory")),
                ("GRPC_ADDR", a.inventory.to_string()),
            ],
            "payment-svc" => vec![
                ("DATABASE_URL", self.database_url("payments")),
                ("GRPC_ADDR", a.payment.to_string()),
            ],
            "orchestrator" => vec![
                ("DATABASE_URL", self.database_url("orchestrator")),
                ("GRPC_ADDR", a.orchestrator.to_string()),
                ("ADMIN_ADDR", a.admin.to_string()),
            ],
            "gateway" => vec![
                ("HTTP_ADDR", a.gateway.to_string()),
                ("ORDER_SVC_URL", url(a.order)),
                ("INVENTORY_SVC_URL", url(a.inventory)),
                ("PAYMENT_SVC_URL", url(a.payment)),
            ],
            _ => vec![],
        };
        env.extend(own.into_iter().map(|(k, v)| (k.to_owned(), v)));
        if let Some(metrics) = a.metrics_of(service) {
            env.push(("METRICS_ADDR".into(), metrics.to_string()));
        }
        env.extend(self.extra_env.iter().cloned());
        env
    }
}

/// The directory holding the service binaries built alongside `current_exe` (the platform
/// binary, or a test binary in `deps/`).
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// The workspace's crates each binary is built from (its own first), as directories of the
/// workspace.
fn crates_of(service: &str) -> &'static [&'static str] {
    match service {
        "gateway" => &["gateway", "proto", "runtime", "telemetry"],
        "order-svc" => &["order-svc", "proto", "messaging", "runtime", "telemetry"],
        "inventory-svc" => &[
            "inventory-svc",
            "proto",
            "messaging",
            "runtime",
            "telemetry",
        ],
        "payment-svc" => &["payment-svc", "proto", "messaging", "runtime", "telemetry"],
        "orchestrator" => &["orchestrator", "proto", "messaging", "runtime", "telemetry"],
        // The tools the end-to-end tests run, besides the services.
        "sagactl" => &[
            "platform/sagactl",
            "gateway",
            "proto",
            "runtime",
            "telemetry",
        ],
        "platform" => &[
            "platform/runner",
            "platform/loadgen",
            "platform/sagactl",
            "platform/test-support",
            "gateway",
            "proto",
            "runtime",
            "telemetry",
        ],
        _ => &[],
    }
}

/// The checkout these binaries were built from, when it is still there.
fn workspace_dir() -> Option<PathBuf> {
    Some(crate::workspace_root()).filter(|dir| dir.join("Cargo.toml").exists())
}

/// The newest file of what cargo builds a crate from: its sources, manifest, build script,
/// migrations and protobuf files (not its tests).
fn newest_input(crate_dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    fn walk(path: &Path, newest: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(modified) = meta.modified() {
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                *newest = Some((modified, path.to_path_buf()));
            }
        }
    }
    let mut newest = None;
    for input in ["src", "Cargo.toml", "build.rs", "migrations", "proto"] {
        walk(&crate_dir.join(input), &mut newest);
    }
    newest
}

/// Why the binary of `service` in `bin_dir` is older than a source it is built from in the
/// checkout at `workspace` (it would run old code), or `None` when it is not.
pub fn stale_binary(workspace: &Path, bin_dir: &Path, service: &str) -> Option<String> {
    let binary = bin_dir.join(service);
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok()?;
    let (changed, source) = crates_of(service)
        .iter()
        .filter_map(|name| newest_input(&workspace.join(name)))
        .max_by_key(|(modified, _)| *modified)?;
    (changed > built).then(|| {
        format!(
            "{} is older than {}: it would run the code from before that change",
            binary.display(),
            source.display()
        )
    })
}

/// Refuses service binaries older than their sources in this checkout, with what to do.
pub fn check_fresh(bin_dir: &Path) -> anyhow::Result<()> {
    check_fresh_binaries(bin_dir, &SERVICES)
}

/// Refuses the binaries `names` in `bin_dir` older than their sources in this checkout, with
/// what to do: the services, and the tools (`sagactl`, `platform`) the end-to-end tests run,
/// which cargo does not build for another package's tests.
pub fn check_fresh_binaries(bin_dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    let Some(workspace) = workspace_dir() else {
        return Ok(());
    };
    let stale: Vec<String> = names
        .iter()
        .filter_map(|name| stale_binary(&workspace, bin_dir, name))
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{}.\nBuild them first: `cargo build --workspace --bins` (`cargo run -p platform -- test` does)",
        stale.join(";\n")
    )
}

/// Starts one service binary from `bin_dir` with `env`, its output to `stdout`/`stderr`.
pub fn spawn(
    bin_dir: &Path,
    service: &str,
    env: &[(String, String)],
    stdout: Stdio,
    stderr: Stdio,
) -> anyhow::Result<Child> {
    let path = bin_dir.join(service);
    if !path.exists() {
        anyhow::bail!(
            "{} is missing: build the services first with `cargo build --workspace --bins` \
             (`cargo run -p platform -- test` does)",
            path.display()
        );
    }
    let mut command = Command::new(&path);
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    Ok(command.spawn()?)
}

/// A free port on 127.0.0.1, below Linux's ephemeral range (32768 and up by default). A port
/// the kernel hands out for `bind(0)` can be taken by an outgoing connection before the
/// service binds it; ports below the range are only ever taken by listeners.
pub fn free_port() -> std::io::Result<SocketAddr> {
    use std::collections::HashSet;
    use std::sync::Mutex;
    // Never hand the same port out twice in one process, even once its probe is closed.
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let start = (std::process::id() as u64 * 7919 + given.len() as u64 * 104_729) % 12_000;
    for i in 0..12_000u64 {
        let port = 20_000 + ((start + i * 7) % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            given.insert(port);
            return listener.local_addr();
        }
    }
    // Everything below the ephemeral range is taken: let the kernel choose.
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Waits until the gateway at `gateway` (e.g. `http://127.0.0.1:3000`) answers `/readyz`,
/// which it does once every service behind it answers its health check. Past `timeout`, the
/// error says what the gateway last answered (each service's state), or why it did not.
pub async fn wait_ready(gateway: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while std::time::Instant::now() < deadline {
        match http.get(format!("{gateway}/readyz")).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                last = format!("the gateway's /readyz answered {status}: {body}");
            }
            Err(e) => last = format!("the gateway at {gateway} does not answer: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    anyhow::bail!("the services did not become ready within {timeout:?}; {last}")
}

/// [`wait_ready`], unless one of `children` (a service and its process) exits first: then
/// the error names it and how it exited, at once rather than when the wait times out (a
/// service that cannot bind its port exits at start, and the gateway would never be ready).
pub async fn wait_ready_while_running(
    gateway: &str,
    timeout: std::time::Duration,
    children: &mut [(&'static str, Child)],
) -> anyhow::Result<()> {
    tokio::select! {
        ready = wait_ready(gateway, timeout) => ready,
        (service, status) = first_exit(children) => {
            anyhow::bail!("{service} exited while starting ({status})")
        }
    }
}

/// The first of `children` to exit, and how (checked every 200 ms).
pub async fn first_exit(
    children: &mut [(&'static str, Child)],
) -> (&'static str, std::process::ExitStatus) {
    loop {
        for (service, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return (*service, status);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[tokio::test]
    async fn a_service_that_exits_while_starting_ends_the_wait_at_once_naming_it() {
        let gateway = format!("http://{}", free_port().expect("a free port"));
        let spawn = |script: &str| {
            Command::new("sh")
                .args(["-c", script])
                .kill_on_drop(true)
                .spawn()
                .expect("sh")
        };
        let mut children = [
            ("order-svc", spawn("sleep 30")),
            ("inventory-svc", spawn("sleep 0.3; exit 3")),
        ];
        let started = std::time::Instant::now();
        let error = wait_ready_while_running(&gateway, Duration::from_secs(60), &mut children)
            .await
            .expect_err("not ready");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let said = format!("{error:#}");
        assert!(
            said.contains("inventory-svc exited while starting"),
            "{said}"
        );
        assert!(said.contains("exit status: 3"), "{said}");
    }

    fn touch(path: &Path, at: SystemTime) {
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("dir");
        let file = std::fs::File::create(path).expect("file");
        file.set_modified(at).expect("mtime");
    }

    #[test]
    fn a_binary_older_than_a_source_of_its_crates_is_stale_and_others_are_not() {
        let root = std::env::temp_dir().join(format!("stale-{}", uuid::Uuid::now_v7()));
        let (workspace, bin) = (root.join("ws"), root.join("bin"));
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
        touch(&workspace.join("order-svc/src/lib.rs"), t(10));
        touch(&workspace.join("messaging/migrations/0001.sql"), t(10));
        touch(&workspace.join("gateway/src/lib.rs"), t(10));
        touch(&bin.join("order-svc"), t(20));
        touch(&bin.join("gateway"), t(20));
        assert_eq!(stale_binary(&workspace, &bin, "order-svc"), None);

        // A migration of a crate order-svc is built from changes; the gateway is not built
        // from it; a test file is no input of the binary.
        touch(&workspace.join("messaging/migrations/0002.sql"), t(30));
        touch(&workspace.join("gateway/tests/api.rs"), t(30));
        let stale = stale_binary(&workspace, &bin, "order-svc").expect("stale");
        assert!(stale.contains("0002.sql"), "{stale}");
        assert_eq!(stale_binary(&workspace, &bin, "gateway"), None);

        // Rebuilt: fresh again.
        touch(&bin.join("order-svc"), t(40));
        assert_eq!(stale_binary(&workspace, &bin, "order-svc"), None);
        // A binary that is not there is for `spawn` to report.
        assert_eq!(stale_binary(&workspace, &bin, "payment-svc"), None);

        // The tools' crates are nested in platform/: sagactl is built from platform/sagactl.
        touch(&bin.join("sagactl"), t(50));
        touch(&workspace.join("platform/sagactl/src/main.rs"), t(60));
        let stale = stale_binary(&workspace, &bin, "sagactl").expect("stale");
        assert!(stale.contains("platform/sagactl/src/main.rs"), "{stale}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn each_binary_is_checked_against_crates_of_this_workspace() {
        let workspace = workspace_dir().expect("the checkout this test is built from");
        for binary in SERVICES.iter().chain(&["sagactl", "platform"]) {
            let crates = crates_of(binary);
            assert!(!crates.is_empty(), "{binary}: no crates");
            // Its own crate first.
            let manifest = workspace.join(crates[0]).join("Cargo.toml");
            let manifest = std::fs::read_to_string(&manifest).expect("its manifest");
            assert!(
                manifest.contains(&format!("name = \"{binary}\"")),
                "{binary}: {} is not its crate",
                crates[0]
            );
            for dir in crates {
                assert!(
                    workspace.join(dir).join("Cargo.toml").is_file(),
                    "{binary}: {dir} is not a crate of {}",
                    workspace.display()
                );
            }
        }
    }
}
