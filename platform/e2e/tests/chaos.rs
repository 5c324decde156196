//! Crash safety under load, at a small scale: processes killed with SIGKILL while orders flow,
//! a second orchestrator for part of the run, the broker and PostgreSQL restarted once each;
//! then every order has ended as its mix asked, and the audit finds nothing.

use std::time::Duration;

use platform::chaos::{self, ChaosConfig};

#[tokio::test]
async fn no_order_is_lost_or_left_half_done_when_processes_are_killed_under_load() {
    let bin_dir = platform::services::binary_dir();
    let config = ChaosConfig {
        // About a minute of load: long enough for every fault to happen under it.
        orders: 240,
        concurrency: 64,
        rate: Some(4.0),
        kills: 5,
        restart_broker: true,
        mix: "succeed=70,decline=10,out-of-stock=10,deadline=10"
            .parse()
            .expect("mix"),
        // Generous: a client that verifies at once must make it through the outages.
        payment_deadline_secs: 30,
        // A killed consumer's partitions move after its session timeout (6 s), so faults
        // come about that far apart.
        pause: Duration::from_secs(3)..Duration::from_secs(6),
        work_dir: bin_dir
            .join("test-chaos")
            .join(test_support::unique_suffix()),
        progress: false,
    };
    let report = chaos::run(&config, &bin_dir, std::future::pending())
        .await
        .expect("the chaos run");
    report.print();
    let unfinished = config.orders - report.load.finished;
    assert!(
        report.ok(),
        "{} orders ended otherwise than asked, {} could not be followed ({unfinished} unfinished), {} audit violations; \
         see the lines above (order ids) and the logs in {}",
        report.load.unexpected.len(),
        report.load.errors.len(),
        report.violations.len(),
        report.log_dir.display()
    );
    assert_eq!(report.load.finished, config.orders);
    assert!(
        report
            .actions
            .iter()
            .filter(|a| a.contains("kill -9"))
            .count()
            >= 5,
        "{:?}",
        report.actions
    );
}
