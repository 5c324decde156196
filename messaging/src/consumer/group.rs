//! The consumer's side of the broker's consumer group: which partitions this member holds, the
//! offsets committed when a partition is given up, and the lag from librdkafka's statistics.
//!
//! The members of a service's group split its topics' partitions through the broker's own
//! group protocol (cooperative-sticky assignment: a rebalance moves only the partitions that
//! change hands), so Kafka's tools (`kafka-consumer-groups.sh --describe --group <group>`)
//! show each member, its partitions and its lag. A member killed with `kill -9` stops
//! heartbeating and its partitions go to the others after the session timeout.
//!
//! Offsets are stored only after the transaction of the messages they cover has committed,
//! and committed on every revocation before the partition is given up, so its next owner
//! starts after the last committed transaction. The inbox makes a message handled twice in a
//! hand-over (or redelivered) have one effect all the same.

use std::collections::BTreeSet;
use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;
use telemetry::metric;

/// How often librdkafka computes its statistics (and so the lag).
pub(crate) const INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// One partition of one topic.
pub(crate) type Partition = (String, i32);

/// The consumer's context: the partitions assigned to this member, kept up to date by the
/// rebalance callbacks (run inside the consumer's poll, so between two batches), and
/// `consumer_lag{topic}` from each statistics report.
pub(crate) struct GroupContext {
    assigned: Mutex<BTreeSet<Partition>>,
    partitions_gauge: metrics::Gauge,
}

impl GroupContext {
    pub(crate) fn new(group: &str) -> Self {
        Self {
            assigned: Mutex::default(),
            partitions_gauge: metrics::gauge!(metric::CONSUMER_PARTITIONS, "group" => group.to_owned()),
        }
    }

    /// Whether this member still holds `partition`: a message of a partition revoked since it
    /// was fetched belongs to its next owner.
    pub(crate) fn holds(&self, topic: &str, partition: i32) -> bool {
        self.lock().contains(&(topic.to_owned(), partition))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Partition>> {
        self.assigned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn partitions(list: &TopicPartitionList) -> Vec<Partition> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

fn describe(partitions: &[Partition]) -> String {
    partitions
        .iter()
        .map(|(topic, partition)| format!("{topic}/{partition}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        for (name, topic) in &statistics.topics {
            let lag: i64 = topic
                .partitions
                .values()
                // Partition -1 is librdkafka's internal one; -1 lag means unknown yet.
                .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
                .map(|p| p.consumer_lag)
                .sum();
            metrics::gauge!(metric::CONSUMER_LAG, "topic" => name.clone()).set(lag as f64);
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let leaving = partitions(list);
                {
                    let mut assigned = self.lock();
                    for p in &leaving {
                        assigned.remove(p);
                    }
                    self.partitions_gauge.set(assigned.len() as f64);
                }
                // What was handled so far is committed before another member may start.
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    // "No offset stored" is the usual case after an idle spell.
                    tracing::debug!(error = %e, "offset commit before revocation");
                }
                if !leaving.is_empty() {
                    tracing::info!(partitions = %describe(&leaving), "partitions given up");
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let joining = partitions(list);
            let mut assigned = self.lock();
            assigned.extend(joining.iter().cloned());
            self.partitions_gauge.set(assigned.len() as f64);
            if !joining.is_empty() {
                tracing::info!(partitions = %describe(&joining), "partitions taken");
            }
        }
    }
}

/// Owns the Kafka consumer and drops it on a thread of its own. librdkafka's close, run on
/// drop, can block forever in a rebalance callback (rust-rdkafka #509, librdkafka #4041);
/// that must not hang a runtime shutting down, nor a test's end.
pub(super) struct DropOffThread(pub(super) Option<StreamConsumer<GroupContext>>);

impl DropOffThread {
    pub(super) fn consumer(&self) -> &StreamConsumer<GroupContext> {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for DropOffThread {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("kafka-consumer-close".into())
                .spawn(move || drop(consumer));
        }
    }
}
