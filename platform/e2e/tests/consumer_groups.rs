//! The services' replicas split their topics' partitions through the broker's own consumer
//! groups, which Kafka's tools (`kafka-consumer-groups.sh`, `kcat`) see; a replica killed with
//! `kill -9` has its partitions taken over by the other, and every saga still ends once.

use std::time::{Duration, Instant};

use e2e::TestPlatform;
use futures::future::join_all;
use platform::infra::kafka;

/// The members of `group` and how many partitions each holds, as
/// `kafka-consumer-groups.sh --describe --members` prints them.
async fn members(brokers: &str, group: &str) -> Vec<(String, usize)> {
    let output = kafka::run_tool(
        kafka::CONSUMER_GROUPS_TOOL,
        &[
            "--bootstrap-server",
            brokers,
            "--describe",
            "--group",
            group,
            "--members",
        ],
    )
    .await
    .expect("run kafka-consumer-groups");
    let text = String::from_utf8_lossy(&output.stdout);
    // GROUP CONSUMER-ID HOST CLIENT-ID #PARTITIONS
    text.lines()
        .filter(|line| line.starts_with(group))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.get(1)?.to_string(), fields.last()?.parse().ok()?))
        })
        .collect()
}

async fn wait_for_members(brokers: &str, group: &str, count: usize) -> Vec<(String, usize)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = members(brokers, group).await;
        let held: usize = found.iter().map(|(_, n)| n).sum();
        if found.len() == count && held == 3 && found.iter().all(|(_, n)| *n > 0) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{group} did not settle on {count} members holding 3 partitions: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_killed_replicas_partitions_are_taken_over_and_every_saga_ends_once() {
    let mut platform = TestPlatform::start(&[("KAFKA_PARTITIONS", "3")]).await;
    platform.warm_up().await;
    let brokers = platform.config.kafka_brokers.clone();
    let group = format!("{}inventory-svc", platform.config.topic_prefix);

    platform.start_replica("inventory-svc");
    let both = wait_for_members(&brokers, &group, 2).await;
    eprintln!("two replicas share the partitions: {both:?}");

    let before = platform.stock("SKU-KEYBOARD").await;
    let killed = platform.kill_service("inventory-svc").await;
    let killed_at = Instant::now();
    eprintln!("killed inventory-svc pid {killed:?}");
    // Orders placed at once: those keyed to the dead replica's partitions wait for them.
    let orders =
        join_all((0..12).map(|_| platform.place_order("SKU-KEYBOARD", 1, "pm_card_visa"))).await;

    let survivor = wait_for_members(&brokers, &group, 1).await;
    let taken_over = killed_at.elapsed();
    eprintln!("the survivor holds every partition {taken_over:.1?} after the kill: {survivor:?}");
    assert!(
        taken_over < Duration::from_secs(30),
        "partitions took {taken_over:?} to move"
    );

    platform.verify_and_expect_completed(&orders).await;
    // Each order reserved and sold once: nothing handled twice to effect, nothing lost.
    let after = platform.stock("SKU-KEYBOARD").await;
    assert_eq!(after.reserved, before.reserved, "no reservation left held");
    assert_eq!(after.committed - before.committed, orders.len() as i64);
    assert_eq!(before.available - after.available, orders.len() as i64);
}

#[tokio::test]
async fn kcat_lists_the_platforms_topics() {
    let platform = TestPlatform::start(&[]).await;
    let brokers = platform.config.kafka_brokers.clone();
    let expected: Vec<String> = proto::topics::ALL
        .iter()
        .map(|topic| format!("{}{topic}", platform.config.topic_prefix))
        .flat_map(|name| [proto::topics::dead_letter(&name), name])
        .collect();
    // The broker's metadata follows topic creation by a moment (it is the controller's, sent
    // on to the broker), longer on a loaded machine: asked again until it lists them.
    let what = format!("kcat -L to list {expected:?}");
    test_support::eventually(Duration::from_secs(30), &what, || async {
        let output = std::process::Command::new("kcat")
            .args(["-b", &brokers, "-L", "-J"])
            .output()
            .unwrap_or_else(|e| {
                panic!("kcat is missing ({e}): `cargo run -p platform -- test` installs it, or apt-get install kcat")
            });
        assert!(
            output.status.success(),
            "kcat -L: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metadata: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("kcat -J prints JSON");
        let topics: Vec<&str> = metadata["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .filter_map(|t| t["topic"].as_str())
            .collect();
        expected
            .iter()
            .all(|name| topics.contains(&name.as_str()))
            .then_some(())
    })
    .await;
}
