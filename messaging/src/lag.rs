//! Consumer lag, from the statistics librdkafka computes every few seconds: for each partition
//! assigned to this consumer, the messages between its position and the high watermark.

use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::statistics::Statistics;
use telemetry::metric;

/// How often librdkafka computes its statistics (and so the lag).
pub(crate) const INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The consumer's context: sets `consumer_lag{topic}` from each statistics report.
pub(crate) struct LagContext;

impl ClientContext for LagContext {
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

impl ConsumerContext for LagContext {}
