//! Fault injection under load: the whole platform on a PostgreSQL and a broker of its own,
//! the load generator running, and processes killed with SIGKILL at random moments; then
//! every order must have ended as its mix asked and the audit must be clean.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::seq::SliceRandom as _;
use rand::Rng as _;
use tokio::process::Child;

use crate::infra;
use crate::services::{self, Addresses, PlatformConfig};
use loadgen::{LoadConfig, Mix, Report};

#[derive(Clone, Debug)]
pub struct ChaosConfig {
    pub orders: u64,
    pub concurrency: usize,
    /// Orders started per second (so that the load lasts through every fault), if set.
    pub rate: Option<f64>,
    /// SIGKILLs of services (each service in turn, the orchestrator more often).
    pub kills: usize,
    /// Kill and restart the broker once during the run.
    pub restart_broker: bool,
    pub mix: Mix,
    /// The platform's payment deadline: long enough for a client to verify through the
    /// outages, short enough for `deadline` orders to end within the run.
    pub payment_deadline_secs: u64,
    /// Pause between two faults.
    pub pause: std::ops::Range<Duration>,
    /// Where the cluster, the broker's storage and the logs go (made anew).
    pub work_dir: PathBuf,
    pub progress: bool,
}

#[derive(Debug)]
pub struct ChaosReport {
    pub load: Report,
    /// What was done, with the time since the start.
    pub actions: Vec<String>,
    pub violations: Vec<String>,
    pub audit_summary: String,
    pub log_dir: PathBuf,
}

impl ChaosReport {
    pub fn ok(&self) -> bool {
        self.load.ok() && self.violations.is_empty()
    }

    pub fn print(&self) {
        for action in &self.actions {
            out!("  {action}");
        }
        self.load.print();
        for v in &self.violations {
            out!("  {v}");
        }
        out!("{}", self.audit_summary);
        out!("logs: {}", self.log_dir.display());
    }
}

/// A fault, planned before the run.
#[derive(Clone, Debug)]
enum Fault {
    Kill(&'static str),
    ReplicaStart,
    ReplicaStop,
    RestartBroker,
    RestartPostgres,
}

fn plan(kills: usize, restart_broker: bool) -> Vec<Fault> {
    let mut rng = rand::rng();
    // Each service in turn, then the orchestrator again and again.
    let order = [
        "payment-svc",
        "inventory-svc",
        "order-svc",
        "gateway",
        "orchestrator",
        "orchestrator",
    ];
    let mut faults: Vec<Fault> = (0..kills)
        .map(|i| Fault::Kill(order[i % order.len()]))
        .collect();
    faults.shuffle(&mut rng);
    // A second orchestrator for part of the run, and one restart each of the broker and
    // PostgreSQL, at random places.
    let len = faults.len();
    let start = rng.random_range(0..=len / 2);
    faults.insert(start, Fault::ReplicaStart);
    let stop = rng.random_range(start + 1..=faults.len());
    faults.insert(stop, Fault::ReplicaStop);
    if restart_broker {
        let at = rng.random_range(0..=faults.len());
        faults.insert(at, Fault::RestartBroker);
    }
    let at = rng.random_range(0..=faults.len());
    faults.insert(at, Fault::RestartPostgres);
    faults
}

struct Fleet {
    config: PlatformConfig,
    bin_dir: PathBuf,
    log_dir: PathBuf,
    /// The pid file of each process, so that a run after a killed one stops what it left.
    run_dir: PathBuf,
    children: BTreeMap<&'static str, Child>,
    replica: Option<Child>,
}

impl Fleet {
    fn spawn(
        &self,
        service: &'static str,
        env: &[(String, String)],
        log_name: &str,
    ) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{log_name}.log")))?;
        let child = services::spawn(
            &self.bin_dir,
            service,
            env,
            Stdio::from(log.try_clone()?),
            Stdio::from(log),
        )?;
        if let Some(pid) = child.id() {
            infra::PidFile::new(self.run_dir.join(format!("{log_name}.pid"))).write(pid)?;
        }
        Ok(child)
    }

    fn start(&mut self, service: &'static str) -> anyhow::Result<()> {
        let child = self.spawn(service, &self.config.env(service), service)?;
        self.children.insert(service, child);
        Ok(())
    }

    async fn kill(&mut self, service: &str) {
        if let Some(mut child) = self.children.remove(service) {
            let _ = child.kill().await;
        }
    }

    /// A second orchestrator: same database and group, its own ports.
    fn start_replica(&mut self) -> anyhow::Result<()> {
        let mut env = self.config.env("orchestrator");
        for (key, value) in env.iter_mut() {
            if key.ends_with("_ADDR") {
                *value = "127.0.0.1:0".to_owned();
            }
            if key == "KAFKA_GROUP_INSTANCE_ID" {
                *value = "orchestrator-replica".to_owned();
            }
        }
        self.replica = Some(self.spawn("orchestrator", &env, "orchestrator-replica")?);
        Ok(())
    }

    async fn stop_all(&mut self) {
        if let Some(mut replica) = self.replica.take() {
            let _ = replica.kill().await;
        }
        for (_, mut child) in std::mem::take(&mut self.children) {
            let _ = child.kill().await;
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(services::free_port()?.port())
}

/// Stops what a fault-injection run in `work_dir` left running (its runner was killed),
/// saying so.
async fn stop_leftovers(work_dir: &Path, pg_root: &Path) {
    if let Ok(entries) = std::fs::read_dir(work_dir.join("run")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(process) = name.strip_suffix(".pid") else {
                continue;
            };
            let service = process.trim_end_matches("-replica");
            if let Some(pid) = infra::PidFile::new(entry.path()).live(service) {
                say!("chaos: stopping the {process} an earlier run left running (pid {pid})");
                infra::process::stop(pid, Duration::from_secs(5)).await;
            }
        }
    }
    if infra::kafka::stop_leftover(&work_dir.join("broker")).await {
        say!("chaos: stopped the Kafka broker an earlier run left running");
    }
    if let Some(pid) = infra::postgres::running_pid(pg_root) {
        say!("chaos: stopping the PostgreSQL an earlier run left running (pid {pid})");
        if infra::stop_postgres(pg_root, true).await.is_err() {
            infra::process::stop(pid, Duration::from_secs(5)).await;
        }
    }
}

/// Runs load with faults injected, then audits, unless `stopped` completes first; everything
/// started is stopped either way. The services' binaries are taken from `bin_dir`.
pub async fn run(
    config: &ChaosConfig,
    bin_dir: &Path,
    stopped: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ChaosReport> {
    services::check_fresh(bin_dir)?;
    let pg_root = infra::cluster_dir(&config.work_dir, "postgres");
    stop_leftovers(&config.work_dir, &pg_root).await;
    let _ = std::fs::remove_dir_all(&config.work_dir);
    let _ = std::fs::remove_dir_all(&pg_root);
    let log_dir = config.work_dir.join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let broker_dir = config.work_dir.join("broker");
    let pg_port = free_port()?;
    let kafka_port = free_port()?;
    let database_url = infra::start_postgres(&pg_root, pg_port, true).await?;
    let mut broker = match infra::Broker::start(&broker_dir, kafka_port).await {
        Ok(broker) => Some(broker),
        Err(e) => {
            let _ = infra::stop_postgres(&pg_root, false).await;
            return Err(e);
        }
    };

    let deadline = config.payment_deadline_secs.to_string();
    let platform = PlatformConfig {
        database_server_url: database_url,
        database_prefix: String::new(),
        kafka_brokers: format!("127.0.0.1:{kafka_port}"),
        topic_prefix: String::new(),
        addresses: Addresses::free()?,
        extra_env: [
            ("PAYMENT_DEADLINE_SECS", deadline.as_str()),
            // Steps unanswered for a few seconds are sent again (a safety net; the outbox and
            // the inbox already lose nothing).
            ("STEP_TIMEOUT_SECS", "5"),
            ("RUST_LOG", "info,sqlx=warn"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect(),
    };
    let gateway = format!("http://{}", platform.addresses.gateway);
    let inventory_url = format!("http://{}", platform.addresses.inventory);
    let mut fleet = Fleet {
        config: platform.clone(),
        bin_dir: bin_dir.to_path_buf(),
        log_dir: log_dir.clone(),
        run_dir: config.work_dir.join("run"),
        children: BTreeMap::new(),
        replica: None,
    };
    let body = async {
        for service in services::SERVICES {
            fleet.start(service)?;
        }
        // A service that exits at start (a port taken, a bad setting) ends the wait at once,
        // named, rather than after the whole timeout.
        let mut starting: Vec<(&'static str, Child)> =
            std::mem::take(&mut fleet.children).into_iter().collect();
        let ready =
            services::wait_ready_while_running(&gateway, Duration::from_secs(60), &mut starting)
                .await;
        fleet.children = starting.into_iter().collect();
        ready.with_context(|| format!("the services' logs are in {}", log_dir.display()))?;
        loadgen::restock(&inventory_url).await?;

        let load_config = LoadConfig {
            gateway: gateway.clone(),
            orders: config.orders,
            concurrency: config.concurrency,
            rate: config.rate,
            mix: config.mix.clone(),
            order_timeout: Duration::from_secs(config.payment_deadline_secs * 4 + 120),
            retry_transient: true,
            progress: config.progress,
            // The platform's gateway runs without JWT_SECRET: its development secret.
            jwt_secret: gateway::identity::DEV_JWT_SECRET.to_owned(),
        };
        let started = Instant::now();
        let load = tokio::spawn(async move { loadgen::run(&load_config).await });
        let mut actions = Vec::new();
        let mut faults = plan(config.kills, config.restart_broker).into_iter();
        while !load.is_finished() {
            let pause = rand::rng().random_range(config.pause.clone());
            tokio::time::sleep(pause).await;
            let Some(fault) = faults.next() else { break };
            let at = started.elapsed().as_secs_f64();
            match fault {
                Fault::Kill(service) => {
                    fleet.kill(service).await;
                    let down = Duration::from_millis(rand::rng().random_range(100..1500));
                    tokio::time::sleep(down).await;
                    fleet.start(service)?;
                    actions.push(format!(
                        "{at:6.1} s  kill -9 {service}, restarted after {down:?}"
                    ));
                }
                Fault::ReplicaStart => {
                    fleet.start_replica()?;
                    actions.push(format!("{at:6.1} s  second orchestrator started"));
                }
                Fault::ReplicaStop => {
                    if let Some(mut replica) = fleet.replica.take() {
                        let _ = replica.kill().await;
                    }
                    actions.push(format!("{at:6.1} s  kill -9 the second orchestrator"));
                }
                Fault::RestartBroker => {
                    if let Some(running) = broker.take() {
                        running.kill().await;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    broker = Some(infra::Broker::start(&broker_dir, kafka_port).await?);
                    actions.push(format!("{at:6.1} s  kill -9 the broker, restarted"));
                }
                Fault::RestartPostgres => {
                    infra::stop_postgres(&pg_root, true).await?;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    infra::start_postgres(&pg_root, pg_port, true).await?;
                    actions.push(format!(
                        "{at:6.1} s  PostgreSQL crashed (immediate stop), restarted"
                    ));
                }
            }
            if let Some(action) = actions.last() {
                say!("chaos: {action}");
            }
        }
        if let Some(mut replica) = fleet.replica.take() {
            let _ = replica.kill().await;
        }
        let left: Vec<String> = faults.map(|f| format!("{f:?}")).collect();
        if !left.is_empty() {
            actions.push(format!(
                "the load ended before these faults: {}",
                left.join(", ")
            ));
        }
        let report = load.await.context("load task")??;

        // Audit through the services' own APIs.
        let admin_url = format!("http://{}", platform.addresses.admin);
        let mut targets = sagactl::audit::Targets {
            admin: sagactl::admin_client(&admin_url, sagactl::DEV_ADMIN_TOKEN)
                .await
                .map_err(|f| anyhow::anyhow!("{f}"))?,
            admin_url,
            order_url: format!("http://{}", platform.addresses.order),
            inventory_url: inventory_url.clone(),
            payment_url: format!("http://{}", platform.addresses.payment),
        };
        let mut violations = Vec::new();
        let summary = sagactl::audit::run(&mut targets, Duration::from_secs(60), |v| {
            violations.push(v.to_string())
        })
        .await
        .map_err(|f| anyhow::anyhow!("audit: {f}"))?;
        anyhow::Ok(ChaosReport {
            load: report,
            actions,
            violations,
            audit_summary: summary.to_string(),
            log_dir: log_dir.clone(),
        })
    };
    let result = tokio::select! {
        result = body => result,
        () = stopped => Err(anyhow::anyhow!("stopped by a signal")),
    };
    fleet.stop_all().await;
    if let Some(broker) = broker {
        broker.stop(Duration::from_secs(10)).await;
    }
    let _ = infra::stop_postgres(&pg_root, false).await;
    let _ = std::fs::remove_dir_all(&pg_root);
    result
}
