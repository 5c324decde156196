//! The local Apache Kafka broker: one KRaft node that is its own controller, its jars resolved
//! from Maven Central once (by `platform/runner/kafka/pom.xml`), its data and its log on disk.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use tokio::process::{Child, Command};

use super::process::{self, PidFile};

/// The broker's version; the pom names the same.
pub const KAFKA_VERSION: &str = "4.1.1";
const POM: &str = include_str!("../../kafka/pom.xml");
const LOG4J: &str = include_str!("../../kafka/log4j2.properties");

/// The broker's main class; also how its process is recognised.
const MAIN_CLASS: &str = "kafka.Kafka";
const PID_FILE: &str = "broker.pid";
const PROPERTIES: &str = "server.properties";
const CONTROLLER_PORT_FILE: &str = "controller.port";
/// The JVM's own output (before log4j is set up, and crashes); the broker logs to
/// `broker.log`, a rolling file of bounded size.
const JVM_OUT: &str = "broker.out";

/// Where the broker's jars are kept, shared by every broker of this machine's runs:
/// `PLATFORM_KAFKA_HOME`, or `kafka-<version>` in the platform's state directory.
pub fn kafka_home() -> PathBuf {
    std::env::var_os("PLATFORM_KAFKA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::state_dir().join(format!("kafka-{KAFKA_VERSION}")))
}

/// Whether the broker at `brokers` answers a metadata request (it lists at least one broker).
pub fn answers(brokers: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("log_level", "0")
        .create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(3))?;
    anyhow::ensure!(!metadata.brokers().is_empty(), "no broker in its metadata");
    Ok(())
}

/// The major version of `java -version`, which prints e.g. `openjdk version "17.0.15"`.
fn java_major(version_output: &str) -> Option<u32> {
    let quoted = version_output.split('"').nth(1)?;
    let mut parts = quoted.split(['.', '-', '+']);
    match parts.next()?.parse().ok()? {
        // Java 8 and older said "1.8.0".
        1 => parts.next()?.parse().ok(),
        major => Some(major),
    }
}

fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("java"))
}

async fn check_java() -> anyhow::Result<()> {
    const HOW: &str = "the local Kafka broker needs Java 17 or newer (`java` on PATH, or \
                       JAVA_HOME; Debian: apt-get install openjdk-17-jre-headless), or give \
                       your own broker in KAFKA_BROKERS";
    let output = Command::new(java())
        .arg("-version")
        .output()
        .await
        .with_context(|| format!("`java` not found: {HOW}"))?;
    let text = String::from_utf8_lossy(&output.stderr);
    match java_major(&text) {
        Some(major) if major >= 17 => Ok(()),
        Some(major) => bail!("`java` is version {major}: {HOW}"),
        None => bail!("`java -version` said {text:?}: {HOW}"),
    }
}

/// The broker's jars, resolved once from Maven Central with `mvn dependency:copy-dependencies`
/// into [`kafka_home`] and reused after that.
pub async fn kafka_libs() -> anyhow::Result<PathBuf> {
    let home = kafka_home();
    let libs = home.join("libs");
    if libs.join(".complete").exists() {
        return Ok(libs);
    }
    check_java().await?;
    fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    // A directory of this run's own, renamed into place once whole, so that two runs
    // resolving at once, or one interrupted, never leave a partial `libs`.
    let partial = home.join(format!("libs.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    let pom = home.join("pom.xml");
    fs::write(&pom, POM)?;
    say!(
        "platform: fetching Apache Kafka {KAFKA_VERSION} from Maven Central into {} (once)",
        libs.display()
    );
    let status = Command::new("mvn")
        .args(["-B", "-q", "-f"])
        .arg(&pom)
        .arg("dependency:copy-dependencies")
        .arg(format!("-DoutputDirectory={}", partial.display()))
        .arg("-DincludeScope=runtime")
        .status()
        .await
        .context(
            "`mvn` not found: the local Kafka broker's jars are fetched with Maven (Debian: \
             apt-get install maven), or give your own broker in KAFKA_BROKERS",
        )?;
    if !status.success() {
        bail!(
            "`mvn dependency:copy-dependencies -f {}` failed ({status})",
            pom.display()
        );
    }
    fs::write(partial.join(".complete"), KAFKA_VERSION)?;
    match fs::rename(&partial, &libs) {
        Ok(()) => {}
        // Another run got there first: theirs is as good.
        Err(_) if libs.join(".complete").exists() => {
            let _ = fs::remove_dir_all(&partial);
        }
        Err(e) => return Err(e).with_context(|| format!("moving the jars to {}", libs.display())),
    }
    Ok(libs)
}

/// Runs one of Kafka's own command-line tools (a class of the `kafka-tools` jar, e.g.
/// `org.apache.kafka.tools.consumer.group.ConsumerGroupCommand`, which `kafka-consumer-groups.sh`
/// runs) with `args`, and returns its output.
pub async fn run_tool(class: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let libs = kafka_libs().await?;
    Command::new(java())
        .args(["-Xmx256m", "-XX:TieredStopAtLevel=1", "-Dlog4j2.level=warn"])
        .arg("-cp")
        .arg(libs.join("*"))
        .arg(class)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {class}"))
}

/// `kafka-consumer-groups.sh`'s class.
pub const CONSUMER_GROUPS_TOOL: &str = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand";

/// A broker started by [`Broker::start`], or one an earlier run left behind and this one took
/// over.
pub struct Broker {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    pid: u32,
}

impl Broker {
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Starts a broker on 127.0.0.1:`port` with its data, configuration and log in `dir`
    /// (formatted on first use, kept across restarts), and waits until it answers.
    ///
    /// A broker an earlier run left running from `dir` is taken over when it answers on `port`,
    /// and stopped otherwise; either way it is said in one line.
    pub async fn start(dir: &Path, port: u16) -> anyhow::Result<Broker> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let properties = dir.join(PROPERTIES);
        let pid_file = PidFile::new(dir.join(PID_FILE));
        if let Some(pid) = pid_file.live(&properties.display().to_string()) {
            let brokers = format!("127.0.0.1:{port}");
            if answers(&brokers).is_ok() {
                say!(
                    "platform: taking over the Kafka broker an earlier run left running (pid {pid}, {})",
                    dir.display()
                );
                return Ok(Broker {
                    dir,
                    port,
                    child: None,
                    pid,
                });
            }
            say!(
                "platform: stopping the Kafka broker an earlier run left running (pid {pid}), \
                 which does not answer on port {port}"
            );
            process::stop(pid, Duration::from_secs(10)).await;
        }
        pid_file.remove();
        if process::port_taken(port) {
            bail!(
                "port {port} is taken by a process that is not this platform's broker: to use a \
                 Kafka broker already running there, give KAFKA_BROKERS=127.0.0.1:{port}; to \
                 run the local one elsewhere, set PLATFORM_KAFKA_PORT"
            );
        }
        let libs = kafka_libs().await?;
        let controller_port = controller_port(&dir)?;
        let data = dir.join("data");
        fs::write(&properties, server_properties(port, controller_port, &data))?;
        fs::write(dir.join("log4j2.properties"), LOG4J)?;
        if !data.join("meta.properties").exists() {
            format_storage(&libs, &dir, &properties).await?;
        }
        say!("platform: starting Apache Kafka {KAFKA_VERSION} on port {port}");
        let started = Instant::now();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(JVM_OUT))?;
        let mut command = Command::new(java());
        command
            .args(jvm_options(&dir))
            .arg("-cp")
            .arg(libs.join("*"))
            .arg(MAIN_CLASS)
            .arg(&properties)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        // The broker would read the services' OpenTelemetry settings as its own.
        for (key, _) in std::env::vars() {
            if key.starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .context("starting the Kafka broker (java)")?;
        let pid = child.id().context("the broker's pid")?;
        pid_file.write(pid)?;
        let brokers = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if answers(&brokers).is_ok() {
                say!(
                    "platform: Kafka ready on port {port} in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(Broker {
                    dir,
                    port,
                    child: Some(child),
                    pid,
                });
            }
            if let Some(status) = child.try_wait()? {
                pid_file.remove();
                bail!(
                    "the Kafka broker exited ({status}); see {} and {}",
                    dir.join("broker.log").display(),
                    dir.join(JVM_OUT).display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the Kafka broker was not ready within 90 s; see {}",
                    dir.join("broker.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A clean stop (SIGTERM: the broker closes its logs), SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        match self.child.take() {
            Some(mut child) => super::terminate(&mut child, grace).await,
            None => {
                process::stop(self.pid, grace).await;
            }
        }
        PidFile::new(self.dir.join(PID_FILE)).remove();
    }

    /// `kill -9`: nothing acknowledged is lost, the next start recovers its logs.
    pub async fn kill(mut self) {
        match self.child.take() {
            Some(mut child) => {
                let _ = child.kill().await;
            }
            None => {
                process::signal(i64::from(self.pid), "KILL");
            }
        }
        PidFile::new(self.dir.join(PID_FILE)).remove();
    }
}

/// The pid of a broker left running from `dir` (by a runner that was killed).
pub fn left_running(dir: &Path) -> Option<u32> {
    let dir = dir.canonicalize().ok()?;
    PidFile::new(dir.join(PID_FILE)).live(&dir.join(PROPERTIES).display().to_string())
}

/// Stops a broker left running from `dir` (by a runner that was killed); true if there was one.
pub async fn stop_leftover(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let pid_file = PidFile::new(dir.join(PID_FILE));
    let found = pid_file.live(&dir.join(PROPERTIES).display().to_string());
    if let Some(pid) = found {
        process::stop(pid, Duration::from_secs(10)).await;
    }
    pid_file.remove();
    found.is_some()
}

/// The controller's port of the broker in `dir`: chosen once, when its storage is formatted,
/// because the controller's address is recorded in the metadata log with `--standalone`.
fn controller_port(dir: &Path) -> anyhow::Result<u16> {
    let file = dir.join(CONTROLLER_PORT_FILE);
    if let Some(port) = fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return Ok(port);
    }
    let port = crate::services::free_port()?.port();
    fs::write(&file, port.to_string())?;
    Ok(port)
}

/// One combined broker and controller for a laptop and for fast tests.
fn server_properties(port: u16, controller_port: u16, data: &Path) -> String {
    format!(
        "# Written by the platform runner at every start (platform/runner/src/infra/kafka.rs).
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}
log.dirs={data}
# The platform creates its topics with KAFKA_PARTITIONS partitions; the same here for any
# topic created on first use.
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
# One node: the internal topics have one replica, and few partitions.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# A group's first member gets its partitions at once, and a consumer may ask for a session
# timeout of a second or two, so that a killed consumer's partitions move quickly.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
# Two cores: few threads.
num.network.threads=2
num.io.threads=4
background.threads=4
num.recovery.threads.per.data.dir=1
log.segment.bytes=67108864
log.retention.hours=168
",
        data = data.display()
    )
}

fn jvm_options(dir: &Path) -> Vec<String> {
    vec![
        "-Xms256m".into(),
        "-Xmx512m".into(),
        "-XX:+UseG1GC".into(),
        "-XX:MaxGCPauseMillis=20".into(),
        "-XX:+ExplicitGCInvokesConcurrent".into(),
        "-Djava.awt.headless=true".into(),
        format!("-Dkafka.logs.dir={}", dir.display()),
        format!(
            "-Dlog4j2.configurationFile={}",
            dir.join("log4j2.properties").display()
        ),
    ]
}

/// A cluster id: 16 random bytes in URL-safe base64 without padding, as `StorageTool
/// random-uuid` prints, and like Kafka's own `Uuid.randomUuid` never starting with `-`, which
/// the tool's command line would take for an option (one id in 64 would fail the format).
fn cluster_id() -> String {
    loop {
        let id = URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

/// `StorageTool format --standalone`: a log directory must be formatted before the first
/// start, with a cluster id and this node as the only voter.
async fn format_storage(libs: &Path, dir: &Path, properties: &Path) -> anyhow::Result<()> {
    let cluster_id = cluster_id();
    let output = Command::new(java())
        .args(jvm_options(dir))
        .arg("-cp")
        .arg(libs.join("*"))
        .args(["kafka.tools.StorageTool", "format", "--standalone", "-t"])
        .arg(&cluster_id)
        .arg("-c")
        .arg(properties)
        .output()
        .await
        .context("running kafka.tools.StorageTool")?;
    if !output.status.success() {
        bail!(
            "formatting the broker's storage failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_never_look_like_an_option() {
        for _ in 0..10_000 {
            let id = cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
        }
    }

    #[test]
    fn reads_the_java_major_version() {
        assert_eq!(
            java_major("openjdk version \"17.0.15\" 2025-04-15"),
            Some(17)
        );
        assert_eq!(java_major("openjdk version \"25\" 2025-09-16"), Some(25));
        assert_eq!(java_major("java version \"1.8.0_381\""), Some(8));
        assert_eq!(java_major("no java here"), None);
    }
}
