//! The load generator: places orders through the REST API like real clients, with a mix of
//! outcomes, verifies payments as soon as it can, and waits for every order's final state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::stream::{FuturesUnordered, StreamExt as _};
use hdrhistogram::Histogram;
use reqwest::header::AUTHORIZATION;
use serde::Serialize;
use serde_json::{json, Value};

/// What an order is placed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Paid with an approving card and verified at once: `COMPLETED`.
    Succeed,
    /// Paid with a declining card: `FAILED`, stock released.
    Decline,
    /// A SKU with no stock: `FAILED` at reservation.
    OutOfStock,
    /// Never verified: `FAILED` once the platform's payment deadline passes.
    Deadline,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Succeed,
        Outcome::Decline,
        Outcome::OutOfStock,
        Outcome::Deadline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Succeed => "succeed",
            Outcome::Decline => "decline",
            Outcome::OutOfStock => "out-of-stock",
            Outcome::Deadline => "deadline",
        }
    }

    /// The final order status this outcome must end in.
    pub fn expected_status(self) -> &'static str {
        match self {
            Outcome::Succeed => "COMPLETED",
            _ => "FAILED",
        }
    }
}

/// Weights of the outcomes, e.g. `succeed=80,decline=10,out-of-stock=5,deadline=5`.
#[derive(Clone, Debug)]
pub struct Mix(Vec<(Outcome, u32)>);

impl std::str::FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut weights = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected name=weight"))?;
            let outcome = Outcome::ALL
                .into_iter()
                .find(|o| o.name() == name.trim())
                .ok_or_else(|| {
                    format!("unknown outcome `{name}` (succeed, decline, out-of-stock, deadline)")
                })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: weight must be a whole number"))?;
            weights.push((outcome, weight));
        }
        if weights.iter().map(|w| w.1).sum::<u32>() == 0 {
            return Err("the mix needs at least one positive weight".into());
        }
        Ok(Mix(weights))
    }
}

impl Mix {
    /// The outcome of the `i`-th order: weights spread evenly over the run (deterministic, so a
    /// run of N orders has exactly its share of each).
    pub fn pick(&self, i: u64) -> Outcome {
        let total: u64 = self.0.iter().map(|w| u64::from(w.1)).sum();
        // Spread with a multiplicative hash so outcomes interleave rather than come in blocks.
        let slot = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % total;
        let mut acc = 0;
        for (outcome, weight) in &self.0 {
            acc += u64::from(*weight);
            if slot < acc {
                return *outcome;
            }
        }
        Outcome::Succeed
    }
}

/// How to run the load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub gateway: String,
    pub orders: u64,
    /// Orders in flight at once.
    pub concurrency: usize,
    /// Orders started per second instead of a fixed concurrency (then `concurrency` caps what is
    /// in flight).
    pub rate: Option<f64>,
    pub mix: Mix,
    /// Longest one order may take from POST to its final state.
    pub order_timeout: Duration,
    /// Retry POST /orders (with its Idempotency-Key), verify and reads on 5xx and connection
    /// errors, as a careful client does (for runs with failures injected).
    pub retry_transient: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// The gateway's HS256 JWT_SECRET, to sign the customers' tokens with.
    pub jwt_secret: String,
}

/// Customers the load's orders are spread over, each with a token of their own.
const CUSTOMERS: u64 = 100;

/// The SKUs orders that should succeed use (restocked before a run), and the one kept empty.
pub const IN_STOCK_SKUS: [&str; 4] = ["SKU-KEYBOARD", "SKU-MOUSE", "SKU-HEADSET", "SKU-WEBCAM"];
pub const EMPTY_SKU: &str = "SKU-MONITOR";

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
    pub fn ok(&self) -> bool {
        self.unexpected.is_empty() && self.errors.is_empty()
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

struct Client {
    http: reqwest::Client,
    gateway: String,
    retry_transient: bool,
    retries: AtomicU64,
    deadline_budget: Duration,
    /// `Bearer <token>` of customer `load-{i}`.
    authorizations: Vec<String>,
}

fn transient(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

impl Client {
    /// One request, retried on transient failures when allowed, until `deadline`.
    async fn send(
        &self,
        deadline: Instant,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let mut delay = Duration::from_millis(50);
        loop {
            let result = make(&self.http).send().await;
            let retry = match &result {
                Ok(r) => self.retry_transient && transient(r.status()),
                Err(_) => self.retry_transient,
            };
            if !retry || Instant::now() + delay > deadline {
                let response = result?;
                let status = response.status();
                let body = response.json().await.unwrap_or(Value::Null);
                return Ok((status, body));
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Long-polls the order until its status is no longer `status`.
    async fn wait_while(
        &self,
        authorization: &str,
        order_id: &str,
        status: &str,
        deadline: Instant,
    ) -> anyhow::Result<Value> {
        loop {
            let url = format!(
                "{}/orders/{order_id}?wait_while={status}&timeout_ms=5000",
                self.gateway
            );
            let (code, order) = self
                .send(deadline, |http| {
                    http.get(&url).header(AUTHORIZATION, authorization)
                })
                .await?;
            if !code.is_success() {
                bail!("GET /orders/{order_id}: {code} {order}");
            }
            if order["status"] != status {
                return Ok(order);
            }
            if Instant::now() > deadline {
                bail!(
                    "order {order_id} still {status} after {:?}",
                    self.deadline_budget
                );
            }
        }
    }

    async fn run_order(
        &self,
        i: u64,
        outcome: Outcome,
        run_id: &str,
    ) -> Result<OrderResult, String> {
        let started = Instant::now();
        let deadline = started + self.deadline_budget;
        let (sku, method) = match outcome {
            Outcome::Succeed | Outcome::Deadline => {
                (IN_STOCK_SKUS[(i % 4) as usize], "pm_card_visa")
            }
            Outcome::Decline => (IN_STOCK_SKUS[(i % 4) as usize], "pm_card_chargeDeclined"),
            Outcome::OutOfStock => (EMPTY_SKU, "pm_card_visa"),
        };
        let authorization = self.authorizations[(i % CUSTOMERS) as usize].as_str();
        let body = json!({
            "items": [{"sku": sku, "quantity": 1}],
            "payment_method": method,
        });
        let key = format!("{run_id}-{i}");
        let url = format!("{}/orders", self.gateway);
        let (status, created) = self
            .send(deadline, |http| {
                http.post(&url)
                    .header(AUTHORIZATION, authorization)
                    .header("Idempotency-Key", &key)
                    .json(&body)
            })
            .await
            .map_err(|e| format!("order #{i}: POST /orders: {e}"))?;
        if status != reqwest::StatusCode::CREATED {
            return Err(format!(
                "order #{i}: POST /orders answered {status}: {created}"
            ));
        }
        let order_id = created["order_id"].as_str().unwrap_or_default().to_owned();
        let fail = |e: anyhow::Error| format!("order {order_id} ({}): {e:#}", outcome.name());
        let mut order = self
            .wait_while(authorization, &order_id, "PENDING", deadline)
            .await
            .map_err(fail)?;
        let mut verify_status = None;
        if order["status"] == "PAYMENT_INITIATED" {
            if matches!(outcome, Outcome::Succeed | Outcome::Decline) {
                let payment_id = order["payment_id"].as_str().unwrap_or_default().to_owned();
                let url = format!("{}/payment/verify", self.gateway);
                let body = json!({ "payment_id": payment_id });
                let (code, verified) = self
                    .send(deadline, |http| {
                        http.post(&url)
                            .header(AUTHORIZATION, authorization)
                            .json(&body)
                    })
                    .await
                    .map_err(fail)?;
                verify_status = Some(if code.is_success() {
                    verified["status"].as_str().unwrap_or_default().to_owned()
                } else {
                    format!("HTTP {}", code.as_u16())
                });
            }
            order = self
                .wait_while(authorization, &order_id, "PAYMENT_INITIATED", deadline)
                .await
                .map_err(fail)?;
        }
        Ok(OrderResult {
            order_id,
            outcome,
            status: order["status"].as_str().unwrap_or_default().to_owned(),
            failure_reason: order["failure_reason"].as_str().map(str::to_owned),
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            verify_status,
        })
    }
}

/// Runs the load and reports. Fails only when the gateway cannot be used at all.
pub async fn run(config: &LoadConfig) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(config.concurrency.max(1) * 2)
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()?;
    let (status, _) = {
        let r = http
            .get(format!("{}/healthz", config.gateway))
            .send()
            .await
            .with_context(|| format!("the gateway at {} does not answer", config.gateway))?;
        (r.status(), ())
    };
    if !status.is_success() {
        bail!(
            "the gateway at {} answered /healthz with {status}",
            config.gateway
        );
    }
    let client = Arc::new(Client {
        http,
        gateway: config.gateway.trim_end_matches('/').to_owned(),
        retry_transient: config.retry_transient,
        retries: AtomicU64::new(0),
        deadline_budget: config.order_timeout,
        authorizations: (0..CUSTOMERS)
            .map(|i| {
                let token = gateway::identity::hs256_token(
                    &config.jwt_secret,
                    gateway::identity::DEFAULT_ISSUER,
                    gateway::identity::DEFAULT_AUDIENCE,
                    &format!("load-{i}"),
                    // Longer than any run.
                    Duration::from_secs(7 * 24 * 3600),
                )?;
                Ok(format!("Bearer {token}"))
            })
            .collect::<anyhow::Result<_>>()?,
    });
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let bar = if config.progress {
        let bar = indicatif::ProgressBar::new(config.orders);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} orders, {per_sec}, eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut results = Vec::with_capacity(config.orders as usize);
    let mut errors = Vec::new();
    let interval = config
        .rate
        .map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
    let mut next_start = Instant::now();
    let mut launched = 0u64;
    while launched < config.orders || !in_flight.is_empty() {
        let can_launch = launched < config.orders && in_flight.len() < config.concurrency.max(1);
        let due = interval.is_none_or(|_| Instant::now() >= next_start);
        if can_launch && due {
            let outcome = config.mix.pick(launched);
            let client = client.clone();
            let run_id = run_id.clone();
            let i = launched;
            in_flight.push(tokio::spawn(async move {
                client.run_order(i, outcome, &run_id).await
            }));
            launched += 1;
            if let Some(interval) = interval {
                next_start += interval;
            }
            continue;
        }
        let wait_for_start = async {
            match (can_launch, interval) {
                (true, Some(_)) => tokio::time::sleep_until(next_start.into()).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            done = in_flight.next(), if !in_flight.is_empty() => {
                match done {
                    Some(Ok(Ok(result))) => results.push(result),
                    Some(Ok(Err(error))) => errors.push(error),
                    Some(Err(panic)) => errors.push(format!("an order task failed: {panic}")),
                    None => {}
                }
                bar.inc(1);
            }
            _ = wait_for_start => {}
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();

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
        orders: config.orders,
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
        retries: client.retries.load(Ordering::Relaxed),
        cpu_ms_per_saga: None,
        crossing: None,
        results,
    })
}

/// Makes stock for a run: plenty of every SKU that orders should get, none of [`EMPTY_SKU`].
pub async fn restock(inventory_url: &str) -> anyhow::Result<()> {
    let mut client =
        proto::inventory::v1::inventory_service_client::InventoryServiceClient::connect(
            inventory_url.to_owned(),
        )
        .await
        .with_context(|| format!("connecting to the inventory service at {inventory_url}"))?;
    for (sku, available) in IN_STOCK_SKUS
        .iter()
        .map(|s| (*s, 100_000_000))
        .chain([(EMPTY_SKU, 0)])
    {
        client
            .set_stock(proto::inventory::v1::SetStockRequest {
                sku: sku.to_owned(),
                available,
            })
            .await
            .with_context(|| format!("setting the stock of {sku}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_gives_each_outcome_its_share() {
        let mix: Mix = "succeed=70,decline=10,out-of-stock=10,deadline=10"
            .parse()
            .expect("mix");
        let mut counts = BTreeMap::new();
        for i in 0..10_000 {
            *counts.entry(mix.pick(i)).or_insert(0) += 1;
        }
        assert!(
            (6_800..7_200).contains(&counts[&Outcome::Succeed]),
            "{counts:?}"
        );
        for o in [Outcome::Decline, Outcome::OutOfStock, Outcome::Deadline] {
            assert!((800..1_200).contains(&counts[&o]), "{counts:?}");
        }
    }

    #[test]
    fn bad_mixes_are_refused_with_a_reason() {
        assert!("succeed=0".parse::<Mix>().unwrap_err().contains("positive"));
        assert!("win=3"
            .parse::<Mix>()
            .unwrap_err()
            .contains("unknown outcome"));
        assert!("succeed"
            .parse::<Mix>()
            .unwrap_err()
            .contains("name=weight"));
    }
}
