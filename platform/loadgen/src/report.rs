//! What a run did: each order's end, the counts by outcome, the latency percentiles.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::mix::Outcome;

#[derive(Clone, Debug, Serialize)]
pub struct OrderResult {
    pub order_id: String,
    pub outcome: Outcome,
    pub status: String,
    pub failure_reason: Option<String>,
    pub latency_ms: f64,
    /// What the client saw of the payment verification, if it verified.
    pub verify_status: Option<String>,
}

impl OrderResult {
    pub fn as_expected(&self) -> bool {
        self.status == self.outcome.expected_status()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub orders: u64,
    pub finished: u64,
    pub elapsed_s: f64,
    pub sagas_per_s: f64,
    pub latency_ms: Percentiles,
    /// Counts by outcome asked, then final status.
    pub by_outcome: BTreeMap<String, BTreeMap<String, u64>>,
    /// Orders whose final status is not the one their outcome asked for.
    pub unexpected: Vec<OrderResult>,
    /// Orders that could not be followed to their end (errors, timeouts).
    pub errors: Vec<String>,
    pub retries: u64,
    /// Milliseconds of CPU per saga of each process of the platform on this machine, when
    /// measured (`loadgen --cpu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms_per_saga: Option<BTreeMap<String, f64>>,
    /// Of Kafka's CPU per saga, what its JVM's JIT compilers used: high while the broker is
    /// still compiling its hot paths after a start (`loadgen --cpu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_jit_ms_per_saga: Option<f64>,
    /// The mean time of each stage of one Kafka crossing, from the services' metrics, when
    /// measured (`loadgen --stages`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crossing: Option<crate::stages::Crossing>,
    #[serde(skip)]
    pub results: Vec<OrderResult>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Report {
    /// The report of a run of `orders` orders over `elapsed`: what each of `results` ended as,
    /// and the latency percentiles.
    pub fn new(
        orders: u64,
        results: Vec<OrderResult>,
        errors: Vec<String>,
        elapsed: Duration,
        retries: u64,
    ) -> anyhow::Result<Report> {
        let elapsed = elapsed.as_secs_f64();
        let mut histogram = Histogram::<u64>::new(3)?;
        let mut by_outcome: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for r in &results {
            let _ = histogram.record((r.latency_ms * 1000.0) as u64);
            *by_outcome
                .entry(r.outcome.name().to_owned())
                .or_default()
                .entry(r.status.clone())
                .or_default() += 1;
        }
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Ok(Report {
            orders,
            finished: results.len() as u64,
            elapsed_s: elapsed,
            sagas_per_s: results.len() as f64 / elapsed.max(1e-9),
            latency_ms: Percentiles {
                p50: ms(0.50),
                p95: ms(0.95),
                p99: ms(0.99),
                max: histogram.max() as f64 / 1000.0,
            },
            by_outcome,
            unexpected: results
                .iter()
                .filter(|r| !r.as_expected())
                .cloned()
                .collect(),
            errors,
            retries,
            cpu_ms_per_saga: None,
            kafka_jit_ms_per_saga: None,
            crossing: None,
            results,
        })
    }

    pub fn ok(&self) -> bool {
        self.unexpected.is_empty() && self.errors.is_empty()
    }

    /// What the broker JVM's JIT compilers took of Kafka's CPU, with a word when they took
    /// more than a tenth of it: figures taken while the broker still compiles are not its
    /// steady state.
    fn kafka_jit_line(&self) -> Option<String> {
        let jit = self.kafka_jit_ms_per_saga?;
        let kafka = self.cpu_ms_per_saga.as_ref()?.get("kafka").copied()?;
        let mut line = format!("of Kafka's, its JVM's JIT compilers {jit:.2}");
        if jit > kafka / 10.0 {
            line.push_str(
                ": the broker is still compiling its hot paths, so these figures are not its \
                 steady state (warm it up longer: README, \"Figures\")",
            );
        }
        Some(line)
    }

    pub fn print(&self) {
        println!(
            "{} orders in {:.1} s: {:.1} sagas/s; latency POST -> final state p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.finished, self.elapsed_s, self.sagas_per_s, self.latency_ms.p50, self.latency_ms.p95, self.latency_ms.p99, self.latency_ms.max
        );
        for (outcome, statuses) in &self.by_outcome {
            let parts: Vec<String> = statuses.iter().map(|(s, n)| format!("{n} {s}")).collect();
            println!("  {outcome:>12}: {}", parts.join(", "));
        }
        if self.retries > 0 {
            println!("  {} requests retried after transient errors", self.retries);
        }
        if let Some(cpu) = &self.cpu_ms_per_saga {
            let parts: Vec<String> = cpu.iter().map(|(p, ms)| format!("{p} {ms:.2}")).collect();
            let total: f64 = cpu.values().sum();
            println!("  CPU ms per saga: {} (total {total:.1})", parts.join(", "));
            if let Some(line) = self.kafka_jit_line() {
                println!("  {line}");
            }
        }
        if let Some(crossing) = &self.crossing {
            println!("  {}", crossing.line());
        }
        for r in &self.unexpected {
            println!(
                "  UNEXPECTED order {} asked to {} ended {} ({})",
                r.order_id,
                r.outcome.name(),
                r.status,
                r.failure_reason.as_deref().unwrap_or("-")
            );
        }
        for e in &self.errors {
            println!("  ERROR {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_with_cpu(kafka: f64, jit: Option<f64>) -> Report {
        let mut report = Report::new(1, Vec::new(), Vec::new(), Duration::from_secs(1), 0)
            .expect("an empty report");
        report.cpu_ms_per_saga = Some(BTreeMap::from([("kafka".to_owned(), kafka)]));
        report.kafka_jit_ms_per_saga = jit;
        report
    }

    #[test]
    fn a_broker_still_compiling_is_called_out_and_a_settled_one_is_not() {
        let compiling = report_with_cpu(15.0, Some(8.8)).kafka_jit_line().unwrap();
        assert!(compiling.starts_with("of Kafka's, its JVM's JIT compilers 8.80: "));
        assert!(compiling.contains("not its steady state"), "{compiling}");
        let settled = report_with_cpu(2.7, Some(0.1)).kafka_jit_line().unwrap();
        assert_eq!(settled, "of Kafka's, its JVM's JIT compilers 0.10");
        assert_eq!(report_with_cpu(2.7, None).kafka_jit_line(), None);
    }
}
