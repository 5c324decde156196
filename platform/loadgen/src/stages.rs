//! The stages of one Kafka crossing, from the services' own histograms: `loadgen` reads each
//! service's `/metrics` before and after a run and reports the mean time of each stage over the
//! messages of the run.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;
use telemetry::metric;

/// The stages, in the order a message goes through them, with the name the report gives each.
pub const STAGES: [(&str, &str); 4] = [
    (metric::OUTBOX_WAIT, "outbox wait"),
    (metric::OUTBOX_PUBLISH, "publish"),
    (metric::MESSAGE_DELIVERY, "delivery"),
    (metric::CONSUMER_BATCH, "handler transaction"),
];

/// The services whose relays and consumers make the crossings.
const SERVICES: [&str; 4] = ["order-svc", "inventory-svc", "payment-svc", "orchestrator"];

/// Sums and counts of each stage's histogram, and of the consumers' batch sizes, over every
/// service.
#[derive(Clone, Debug, Default)]
pub struct Sample(BTreeMap<String, (f64, f64)>);

/// What happened in one crossing during a run, on average.
#[derive(Clone, Debug, Serialize)]
pub struct Crossing {
    /// Mean milliseconds of each stage, by the names of [`STAGES`].
    pub stages_ms: BTreeMap<String, f64>,
    /// Mean messages in one consumer transaction.
    pub batch_messages: f64,
}

impl Sample {
    /// Reads `/metrics` of every service at its default address.
    pub async fn take(client: &reqwest::Client) -> anyhow::Result<Sample> {
        let mut sample = Sample::default();
        for service in SERVICES {
            let addr: SocketAddr = telemetry::prometheus::default_addr(service);
            let text = client
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| anyhow::anyhow!("reading {service}'s metrics at {addr}: {e}"))?
                .text()
                .await?;
            sample.add(&text);
        }
        Ok(sample)
    }

    /// Adds the `_sum` and `_count` lines of the crossing's metrics (every label together).
    fn add(&mut self, exposition: &str) {
        let wanted = STAGES
            .iter()
            .map(|(name, _)| *name)
            .chain([metric::CONSUMER_BATCH_SIZE]);
        for name in wanted {
            for line in exposition.lines() {
                let Some(rest) = line.strip_prefix(name) else {
                    continue;
                };
                let (is_sum, rest) = match (rest.strip_prefix("_sum"), rest.strip_prefix("_count"))
                {
                    (Some(rest), _) => (true, rest),
                    (_, Some(rest)) => (false, rest),
                    _ => continue,
                };
                let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
                else {
                    continue;
                };
                let entry = self.0.entry(name.to_owned()).or_default();
                if is_sum {
                    entry.0 += value;
                } else {
                    entry.1 += value;
                }
            }
        }
    }

    /// The mean of each stage between `self` and `later`.
    pub fn crossing(&self, later: &Sample) -> Crossing {
        let mean = |name: &str| {
            let (sum0, count0) = self.0.get(name).copied().unwrap_or_default();
            let (sum1, count1) = later.0.get(name).copied().unwrap_or_default();
            let count = count1 - count0;
            if count > 0.0 {
                (sum1 - sum0) / count
            } else {
                0.0
            }
        };
        Crossing {
            stages_ms: STAGES
                .iter()
                .map(|(name, label)| ((*label).to_owned(), mean(name) * 1000.0))
                .collect(),
            batch_messages: mean(metric::CONSUMER_BATCH_SIZE),
        }
    }
}

impl Crossing {
    /// One line: each stage's mean in the order of a crossing, and their sum.
    pub fn line(&self) -> String {
        let parts: Vec<String> = STAGES
            .iter()
            .map(|(_, label)| format!("{label} {:.2}", self.stages_ms[*label]))
            .collect();
        let total: f64 = self.stages_ms.values().sum();
        format!(
            "one Kafka crossing, mean ms: {} (sum {total:.2}); {:.1} messages per consumer transaction",
            parts.join(", "),
            self.batch_messages
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_label_and_takes_the_difference() {
        let mut before = Sample::default();
        before.add(
            "consumer_batch_seconds_sum 1\nconsumer_batch_seconds_count 10\n\
             message_delivery_seconds_sum{topic=\"a\"} 0.5\nmessage_delivery_seconds_count{topic=\"a\"} 5\n",
        );
        let mut after = Sample::default();
        after.add(
            "# TYPE consumer_batch_seconds histogram\n\
             consumer_batch_seconds_bucket{le=\"0.001\"} 3\n\
             consumer_batch_seconds_sum 3\nconsumer_batch_seconds_count 20\n\
             message_delivery_seconds_sum{topic=\"a\"} 0.5\nmessage_delivery_seconds_count{topic=\"a\"} 5\n\
             message_delivery_seconds_sum{topic=\"b\"} 0.1\nmessage_delivery_seconds_count{topic=\"b\"} 5\n\
             consumer_batch_messages_sum 60\nconsumer_batch_messages_count 20\n",
        );
        let crossing = before.crossing(&after);
        assert_eq!(crossing.stages_ms["handler transaction"], 200.0);
        assert!((crossing.stages_ms["delivery"] - 20.0).abs() < 1e-9);
        assert_eq!(crossing.stages_ms["publish"], 0.0, "no samples: 0");
        assert_eq!(crossing.batch_messages, 3.0);
        assert!(crossing.line().starts_with("one Kafka crossing, mean ms: outbox wait 0.00, publish 0.00, delivery 20.00, handler transaction 200.00"));
    }
}
