//! One client of the gateway, as a customer's application would be: places an order, verifies
//! its payment, and long-polls it to its final state, retrying transient failures when asked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use reqwest::header::AUTHORIZATION;
use serde_json::{json, Value};

use crate::mix::Outcome;
use crate::report::OrderResult;
use crate::stock::{EMPTY_SKU, IN_STOCK_SKUS};
use crate::LoadConfig;

/// Customers the load's orders are spread over, each with a token of their own.
const CUSTOMERS: u64 = 100;

pub struct Client {
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
    /// A client of the gateway of `config`, once the gateway answers `/healthz`, with a token
    /// for each of the load's customers.
    pub async fn connect(config: &LoadConfig) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(config.concurrency.max(1) * 2)
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()?;
        let status = http
            .get(format!("{}/healthz", config.gateway))
            .send()
            .await
            .with_context(|| format!("the gateway at {} does not answer", config.gateway))?
            .status();
        if !status.is_success() {
            bail!(
                "the gateway at {} answered /healthz with {status}",
                config.gateway
            );
        }
        Ok(Client {
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
        })
    }

    /// Requests retried after transient failures so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

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

    /// Places the `i`-th order of run `run_id` to do `outcome`, verifies its payment when
    /// the outcome asks for it, and follows it to its final state.
    pub async fn run_order(
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
