//! The local runner stops what it started whatever stops it: SIGTERM as Ctrl-C, also when
//! nobody reads its output any more; after a SIGKILL, the next run takes over what the killed
//! one left, and `platform down` stops it; a port held by a server that is not the platform's
//! is named as such; a service that exits at start ends a fault-injection run at once.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use platform::chaos::{self, ChaosConfig};
use platform::infra::{self, kafka, process, PidFile};
use platform::services::{binary_dir, check_fresh_binaries, free_port, SERVICES};
use test_support::unique_suffix;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A state directory and ports of the test's own.
struct Setup {
    state_dir: PathBuf,
    postgres_port: u16,
    kafka_port: u16,
}

impl Setup {
    fn new() -> Setup {
        // A test of an old runner would pass or fail for code that is no longer there.
        if let Err(e) = check_fresh_binaries(&binary_dir(), &["platform"]) {
            panic!("{e:#}");
        }
        let state_dir = binary_dir().join("test-runner").join(unique_suffix());
        std::fs::create_dir_all(&state_dir).expect("state dir");
        Setup {
            state_dir,
            postgres_port: free_port().expect("port").port(),
            kafka_port: free_port().expect("port").port(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary_dir().join("platform"));
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("KAFKA_BROKERS")
            .env("PLATFORM_STATE_DIR", &self.state_dir)
            // The jars fetched once for every run of this machine.
            .env("PLATFORM_KAFKA_HOME", kafka::kafka_home())
            .env("PLATFORM_POSTGRES_PORT", self.postgres_port.to_string())
            .env("PLATFORM_KAFKA_PORT", self.kafka_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// `platform infra`, once it says it is ready; its output lines, stdout and stderr alike.
    async fn start_infra(&self) -> (Child, mpsc::UnboundedReceiver<String>, Vec<String>) {
        let mut child = self
            .command(&["infra"])
            .spawn()
            .expect("spawn platform infra");
        let (tx, mut rx) = mpsc::unbounded_channel();
        process::forward_lines(&mut child, move |line| {
            eprintln!("runner | {line}");
            let _ = tx.send(line);
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let line = tokio::time::timeout_at(deadline.into(), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("platform infra not ready within 300 s: {seen:#?}"))
                .unwrap_or_else(|| panic!("platform infra exited before it was ready: {seen:#?}"));
            let ready = line.contains("infrastructure ready");
            seen.push(line);
            if ready {
                return (child, rx, seen);
            }
        }
    }

    fn postgres_root(&self) -> PathBuf {
        infra::cluster_dir(&self.state_dir, "postgres")
    }

    /// The pids of the PostgreSQL and the broker the runner started, from their pid files.
    fn infra_pids(&self) -> (u32, u32) {
        let postgres = infra::postgres::running_pid(&self.postgres_root())
            .expect("PostgreSQL's postmaster.pid names a live server");
        let broker = kafka::left_running(&self.state_dir.join("kafka-test"))
            .expect("the broker's pid file names a live broker");
        (postgres, broker)
    }

    /// `runner` exits within a minute as a run stopped by SIGTERM does, having stopped `pids`
    /// and freed the ports.
    async fn assert_ended_by_sigterm(&self, runner: &mut Child, pids: &[u32]) {
        let status = wait_exit(runner, Duration::from_secs(60)).await;
        assert_eq!(
            status.code(),
            Some(128 + 15),
            "exit code of a run ended by SIGTERM"
        );
        self.assert_all_stopped(pids);
    }

    fn assert_all_stopped(&self, pids: &[u32]) {
        for pid in pids {
            assert!(!process::alive(*pid), "pid {pid} is still running");
        }
        for port in [self.postgres_port, self.kafka_port] {
            assert!(!process::port_taken(port), "port {port} is still taken");
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Whatever a failed assertion left running.
        for pid in [
            infra::postgres::running_pid(&self.postgres_root()),
            kafka::left_running(&self.state_dir.join("kafka-test")),
        ]
        .into_iter()
        .flatten()
        {
            process::signal(i64::from(pid), "KILL");
        }
        let _ = std::fs::remove_dir_all(self.postgres_root());
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

async fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the runner did not exit within {within:?}"))
        .expect("wait for the runner")
}

fn runner_pid(child: &Child) -> i64 {
    i64::from(child.id().expect("runner pid"))
}

#[tokio::test]
async fn sigterm_stops_postgres_and_the_broker_and_frees_their_ports() {
    let setup = Setup::new();
    let (mut runner, _lines, _) = setup.start_infra().await;
    let (postgres, broker) = setup.infra_pids();

    process::signal(runner_pid(&runner), "TERM");
    setup
        .assert_ended_by_sigterm(&mut runner, &[postgres, broker])
        .await;
}

/// `platform test | head`, or a terminal closed under `platform up`: the lines the runner
/// writes after its reader went away are lost, not a panic that leaves PostgreSQL and the
/// broker running.
#[tokio::test]
async fn a_runner_whose_output_nobody_reads_any_more_still_stops_what_it_started() {
    let setup = Setup::new();
    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut runner = setup
        .command(&["infra"])
        .stdout(writer.try_clone().expect("pipe"))
        .stderr(writer)
        .spawn()
        .expect("spawn platform infra");
    let read_until_ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(reader).lines() {
            let line = line.expect("the runner's output");
            eprintln!("runner | {line}");
            let ready = line.contains("infrastructure ready");
            seen.push(line);
            if ready {
                // The pipe's only read end is closed here.
                return;
            }
        }
        panic!("platform infra exited before it was ready: {seen:#?}");
    });
    tokio::time::timeout(Duration::from_secs(300), read_until_ready)
        .await
        .expect("platform infra ready within 300 s")
        .expect("reading the runner's output");
    let (postgres, broker) = setup.infra_pids();

    // Stopping, the runner says so: to a pipe nobody reads.
    process::signal(runner_pid(&runner), "TERM");
    setup
        .assert_ended_by_sigterm(&mut runner, &[postgres, broker])
        .await;
}

#[tokio::test]
async fn after_a_sigkill_the_next_run_takes_over_what_was_left_and_down_stops_it() {
    let setup = Setup::new();
    let (mut first, _lines, _) = setup.start_infra().await;
    let (postgres, broker) = setup.infra_pids();
    process::signal(runner_pid(&first), "KILL");
    wait_exit(&mut first, Duration::from_secs(10)).await;
    // A killed runner cannot stop anything: both are still there.
    assert!(process::alive(postgres) && process::alive(broker));

    let (mut second, _lines, seen) = setup.start_infra().await;
    let said = seen.join("\n");
    assert!(
        said.contains(&format!(
            "taking over the PostgreSQL an earlier run left running (pid {postgres}"
        )) && said.contains(&format!(
            "taking over the Kafka broker an earlier run left running (pid {broker}"
        )),
        "the second run says what it took over:\n{said}"
    );
    assert_eq!(
        setup.infra_pids(),
        (postgres, broker),
        "the same processes, reused"
    );

    // `platform down`, as a user who lost the terminal would.
    let down = setup
        .command(&["down"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .await
        .expect("platform down");
    assert!(down.success());
    setup
        .assert_ended_by_sigterm(&mut second, &[postgres, broker])
        .await;
}

#[tokio::test]
async fn a_port_held_by_another_server_is_named_with_how_to_use_it_or_move() {
    let setup = Setup::new();
    let _other = std::net::TcpListener::bind(("127.0.0.1", setup.postgres_port)).expect("bind");
    let output = setup
        .command(&["infra"])
        .output()
        .await
        .expect("platform infra");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "port {} is taken by a server that is not this platform's PostgreSQL",
            setup.postgres_port
        )) && said.contains("DATABASE_URL")
            && said.contains("PLATFORM_POSTGRES_PORT"),
        "{said}"
    );
    // Nothing was left running: no cluster, no broker.
    assert!(infra::postgres::running_pid(&setup.postgres_root()).is_none());
    assert!(!PidFile::new(setup.state_dir.join("kafka-test/broker.pid"))
        .path()
        .exists());
}

/// `platform chaos` with a service that cannot start (here a payment-svc that exits at once, as
/// one whose port is taken would): the run ends as soon as it exits, naming it and where its log
/// is, not when the wait for the gateway's readiness times out a minute later.
#[tokio::test]
async fn a_fault_injection_run_whose_service_exits_at_start_ends_at_once_naming_it() {
    let setup = Setup::new();
    let bin_dir = setup.state_dir.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    for service in SERVICES {
        let path = bin_dir.join(service);
        if service == "payment-svc" {
            std::fs::write(&path, "#!/bin/sh\necho 'cannot start' >&2\nexit 3\n").expect("script");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod");
        } else {
            std::os::unix::fs::symlink(binary_dir().join(service), &path).expect("symlink");
        }
    }
    let config = ChaosConfig {
        orders: 1,
        concurrency: 1,
        rate: None,
        kills: 0,
        restart_broker: false,
        mix: "succeed=1".parse().expect("mix"),
        payment_deadline_secs: 30,
        pause: Duration::from_secs(1)..Duration::from_secs(2),
        work_dir: setup.state_dir.join("chaos"),
        progress: false,
    };
    let error = chaos::run(&config, &bin_dir, std::future::pending())
        .await
        .expect_err("no run without payment-svc");
    let said = format!("{error:#}");
    assert!(
        said.contains("payment-svc exited while starting (exit status: 3)")
            && said.contains("the services' logs are in"),
        "{said}"
    );
}
