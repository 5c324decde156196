//! The whole platform for end-to-end tests: the five real service binaries started as
//! processes, with databases and topics of their own on the test PostgreSQL and broker
//! (see `test-support`), and the calls the tests make through its APIs.

use std::time::Duration;

use platform::services::{self, Addresses, PlatformConfig};
use test_support::{kafka_brokers, unique_suffix, TEST_DATABASE_PREFIX};

/// The orchestrator's setting of its admin token.
const ADMIN_TOKEN_ENV: &str = "ADMIN_TOKEN";
/// The gateway's setting of the HS256 secret of customers' tokens.
const JWT_SECRET_ENV: &str = "JWT_SECRET";
/// The customer `TestPlatform::http` acts as.
pub const TEST_CUSTOMER: &str = "test-customer";

fn jwt_secret(config: &PlatformConfig) -> String {
    config
        .extra_env
        .iter()
        .find(|(k, _)| k == JWT_SECRET_ENV)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| gateway::identity::DEV_JWT_SECRET.to_owned())
}

fn customer_token(config: &PlatformConfig, customer: &str) -> String {
    gateway::identity::hs256_token(
        &jwt_secret(config),
        gateway::identity::DEFAULT_ISSUER,
        gateway::identity::DEFAULT_AUDIENCE,
        customer,
        Duration::from_secs(3600),
    )
    .expect("a token")
}

/// The status and JSON body (`null` when it is not JSON) of `request`, which must be answered.
async fn answer(
    request: reqwest::RequestBuilder,
    what: &str,
) -> (reqwest::StatusCode, serde_json::Value) {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// The five real service binaries started as processes for one test, on free ports, with
/// databases and topics of their own. Killed when dropped.
pub struct TestPlatform {
    pub config: PlatformConfig,
    pub gateway: String,
    pub http: reqwest::Client,
    pub log_dir: std::path::PathBuf,
    children: Vec<(&'static str, tokio::process::Child)>,
}

impl TestPlatform {
    /// Starts the platform; `extra_env` is given to every service (e.g. a short
    /// `PAYMENT_DEADLINE_SECS`).
    pub async fn start(extra_env: &[(&str, &str)]) -> TestPlatform {
        Self::start_with_brokers(&kafka_brokers(), extra_env).await
    }

    /// Like [`TestPlatform::start`], on the given brokers (a broker of the test's own, which it
    /// may stop and start).
    pub async fn start_with_brokers(brokers: &str, extra_env: &[(&str, &str)]) -> TestPlatform {
        let server = test_support::database_server().await;
        let suffix = unique_suffix();
        let config = PlatformConfig {
            database_server_url: server,
            database_prefix: format!("{TEST_DATABASE_PREFIX}{suffix}_"),
            kafka_brokers: brokers.to_owned(),
            topic_prefix: format!("t{suffix}."),
            addresses: Addresses::free().expect("free ports"),
            extra_env: extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .chain(
                    (!extra_env.iter().any(|(k, _)| *k == "RUST_LOG"))
                        .then(|| ("RUST_LOG".to_owned(), "info,sqlx=warn".to_owned())),
                )
                .chain([
                    // The orchestrator's admin API takes a token of this platform's own.
                    (ADMIN_TOKEN_ENV.to_owned(), format!("test-admin-{suffix}")),
                    // The gateway takes customers' tokens signed with a secret of its own.
                    (JWT_SECRET_ENV.to_owned(), format!("test-jwt-{suffix}")),
                ])
                .collect(),
        };
        let bin_dir = services::binary_dir();
        // Tests of old binaries would pass or fail for code that is no longer there.
        if let Err(e) = services::check_fresh(&bin_dir) {
            panic!("{e:#}");
        }
        let log_dir = bin_dir.join("test-logs").join(&suffix);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let mut children = Vec::new();
        for service in services::SERVICES {
            let log =
                std::fs::File::create(log_dir.join(format!("{service}.log"))).expect("log file");
            let child = services::spawn(
                &bin_dir,
                service,
                &config.env(service),
                std::process::Stdio::from(log.try_clone().expect("log file")),
                std::process::Stdio::from(log),
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
            children.push((service, child));
        }
        let authorization = format!("Bearer {}", customer_token(&config, TEST_CUSTOMER));
        let mut platform = TestPlatform {
            gateway: format!("http://{}", config.addresses.gateway),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                // As customer `TEST_CUSTOMER`, unless a request sets its own Authorization.
                .default_headers(reqwest::header::HeaderMap::from_iter([(
                    reqwest::header::AUTHORIZATION,
                    authorization.parse().expect("a header value"),
                )]))
                .build()
                .expect("http client"),
            config,
            log_dir,
            children,
        };
        platform.wait_ready().await;
        platform
    }

    async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let orchestrator = self.config.addresses.orchestrator;
        loop {
            let gateway_ready = self
                .http
                .get(format!("{}/readyz", self.gateway))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let orchestrator_up = tokio::net::TcpStream::connect(orchestrator).await.is_ok();
            if gateway_ready && orchestrator_up {
                return;
            }
            for (service, child) in self.children.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = self.log_dir.join(format!("{service}.log"));
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    panic!(
                        "{service} exited at start ({status}); the end of {}:\n{}",
                        log.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "the platform did not become ready within 60 s: the gateway's /readyz {}, \
                     the orchestrator's port {}; logs in {}",
                    if gateway_ready { "ready" } else { "not ready" },
                    if orchestrator_up { "open" } else { "closed" },
                    self.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The URL of the orchestrator's operators' API (SagaAdmin).
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.config.addresses.admin)
    }

    /// The token the orchestrator's admin API takes.
    pub fn admin_token(&self) -> String {
        self.config
            .extra_env
            .iter()
            .find(|(k, _)| k == ADMIN_TOKEN_ENV)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| sagactl::DEV_ADMIN_TOKEN.to_owned())
    }

    /// A token of this platform's gateway for `customer`, valid for an hour.
    pub fn token(&self, customer: &str) -> String {
        customer_token(&self.config, customer)
    }

    /// The HS256 secret this platform's gateway verifies customers' tokens with.
    pub fn jwt_secret(&self) -> String {
        jwt_secret(&self.config)
    }

    /// The gRPC URL of a service, for checks through its own API.
    pub fn grpc_url(&self, service: &str) -> String {
        let a = &self.config.addresses;
        let addr = match service {
            "order-svc" => a.order,
            "inventory-svc" => a.inventory,
            "payment-svc" => a.payment,
            "orchestrator" => a.orchestrator,
            other => panic!("no gRPC service {other}"),
        };
        format!("http://{addr}")
    }

    /// `POST` JSON to the gateway; returns the status and the JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let request = self.http.post(format!("{}{path}", self.gateway)).json(body);
        answer(request, &format!("POST {path}")).await
    }

    /// `POST /orders` with an `Idempotency-Key`, as a client retrying its request does;
    /// returns the status and the JSON body (panics on a body that is not JSON).
    pub async fn post_order_with_key(
        &self,
        key: &str,
        body: &serde_json::Value,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let response = self
            .http
            .post(format!("{}/orders", self.gateway))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .expect("POST /orders");
        let status = response.status();
        (status, response.json().await.expect("json"))
    }

    pub async fn get(&self, path: &str) -> (reqwest::StatusCode, serde_json::Value) {
        let request = self.http.get(format!("{}{path}", self.gateway));
        answer(request, &format!("GET {path}")).await
    }

    /// Polls `GET /orders/{id}` until `done` holds for the order, or panics after `timeout`.
    pub async fn wait_for_order(
        &self,
        order_id: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (status, order) = self.get(&format!("/orders/{order_id}")).await;
            if status.is_success() && done(&order) {
                return order;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "order {order_id} did not reach the expected state within {timeout:?}; last: {order}; logs in {}",
                    self.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stock of `sku` as the inventory service reports it.
    pub async fn stock(&self, sku: &str) -> proto::inventory::v1::StockLevel {
        let mut client = self.inventory().await;
        let levels = client
            .get_stock(proto::inventory::v1::GetStockRequest {
                skus: vec![sku.to_owned()],
            })
            .await
            .unwrap_or_else(|e| panic!("GetStock {sku}: {e}"))
            .into_inner()
            .levels;
        levels
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no stock level for {sku}"))
    }

    pub async fn set_stock(&self, sku: &str, available: i64) {
        self.inventory()
            .await
            .set_stock(proto::inventory::v1::SetStockRequest {
                sku: sku.to_owned(),
                available,
            })
            .await
            .unwrap_or_else(|e| panic!("SetStock {sku}: {e}"));
    }

    /// The reservation of an order, if the inventory service has one.
    pub async fn reservation(&self, order_id: &str) -> Option<proto::inventory::v1::Reservation> {
        match self
            .inventory()
            .await
            .get_reservation(proto::inventory::v1::GetReservationRequest {
                order_id: order_id.to_owned(),
            })
            .await
        {
            Ok(r) => Some(r.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(e) => panic!("GetReservation {order_id}: {e}"),
        }
    }

    /// The payment of an order, if the payment service has one.
    pub async fn payment_of_order(&self, order_id: &str) -> Option<proto::payment::v1::Payment> {
        let mut client = proto::payment::v1::payment_service_client::PaymentServiceClient::connect(
            self.grpc_url("payment-svc"),
        )
        .await
        .expect("payment-svc gRPC");
        match client
            .get_payment(proto::payment::v1::GetPaymentRequest {
                payment_id: String::new(),
                order_id: order_id.to_owned(),
            })
            .await
        {
            Ok(p) => Some(p.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(e) => panic!("GetPayment of order {order_id}: {e}"),
        }
    }

    pub async fn inventory(
        &self,
    ) -> proto::inventory::v1::inventory_service_client::InventoryServiceClient<
        tonic::transport::Channel,
    > {
        proto::inventory::v1::inventory_service_client::InventoryServiceClient::connect(
            self.grpc_url("inventory-svc"),
        )
        .await
        .expect("inventory-svc gRPC")
    }

    /// Places an order through the gateway and returns its id, asserting a 201.
    pub async fn place_order(&self, sku: &str, quantity: u32, payment_method: &str) -> String {
        let (status, body) = self
            .post(
                "/orders",
                &serde_json::json!({
                    "customer_id": TEST_CUSTOMER,
                    "items": [{"sku": sku, "quantity": quantity}],
                    "payment_method": payment_method,
                }),
            )
            .await;
        assert_eq!(status, 201, "POST /orders: {body}");
        body["order_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no order_id in {body}"))
            .to_owned()
    }

    /// Waits until the order is `COMPLETED` or `FAILED` and returns it.
    pub async fn final_order(&self, order_id: &str) -> serde_json::Value {
        self.wait_for_order(order_id, Duration::from_secs(60), |o| {
            o["status"] == "COMPLETED" || o["status"] == "FAILED"
        })
        .await
    }

    /// Waits for the payment id of an order (its status `PAYMENT_INITIATED` or later).
    pub async fn payment_id(&self, order_id: &str) -> String {
        let order = self
            .wait_for_order(order_id, Duration::from_secs(60), |o| {
                o["payment_id"].is_string()
            })
            .await;
        order["payment_id"].as_str().unwrap_or_default().to_owned()
    }

    /// Runs one order of SKU-HEADSET to its end, so that every consumer has joined its group:
    /// tests with short deadlines start their clock after this. (With a deadline shorter than
    /// the groups take to form, that order may fail; only its having ended matters.)
    pub async fn warm_up(&self) {
        let order_id = self.place_order("SKU-HEADSET", 1, "pm_card_visa").await;
        let order = self
            .wait_for_order(&order_id, Duration::from_secs(60), |o| {
                o["payment_id"].is_string() || o["status"] == "FAILED"
            })
            .await;
        if let Some(payment_id) = order["payment_id"].as_str() {
            self.post(
                "/payment/verify",
                &serde_json::json!({ "payment_id": payment_id }),
            )
            .await;
        }
        self.final_order(&order_id).await;
        self.wait_for_saga_end(&order_id).await;
    }

    /// Verifies the payment of every order of `orders` as a client would, then asserts that
    /// each ends `COMPLETED`.
    pub async fn verify_and_expect_completed(&self, orders: &[String]) {
        for order_id in orders {
            let payment_id = self.payment_id(order_id).await;
            let (status, body) = self
                .post(
                    "/payment/verify",
                    &serde_json::json!({ "payment_id": payment_id }),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
        for order_id in orders {
            let order = self.final_order(order_id).await;
            assert_eq!(order["status"], "COMPLETED", "{order}");
        }
    }

    /// Waits until the orchestrator's saga of `order_id` has ended (`COMPLETED` or `FAILED`):
    /// its last step, order-svc's confirmation of the order's status, comes after the order
    /// shows its final status.
    pub async fn wait_for_saga_end(&self, order_id: &str) {
        use proto::saga::v1::{GetSagaRequest, SagaState};
        let mut admin = sagactl::admin_client(&self.admin_url(), &self.admin_token())
            .await
            .unwrap_or_else(|e| panic!("the orchestrator's admin API: {e}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let state = admin
                .get_saga(GetSagaRequest {
                    saga_id: order_id.to_owned(),
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().saga)
                .map(|s| s.state());
            if matches!(state, Some(SagaState::Completed | SagaState::Failed)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "saga {order_id} did not end within 60 s: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts another replica of `service`: the same database, topics and consumer group, ports
    /// of its own (its log is `<service>-replica-<n>.log`).
    pub fn start_replica(&mut self, service: &'static str) {
        let mut env = self.config.env(service);
        let n = self.children.iter().filter(|(s, _)| *s == service).count();
        for (key, value) in env.iter_mut() {
            if key.ends_with("_ADDR") {
                *value = "127.0.0.1:0".to_owned();
            }
            if key == "KAFKA_GROUP_INSTANCE_ID" {
                *value = format!("{service}-replica-{n}");
            }
        }
        let log = std::fs::File::create(self.log_dir.join(format!("{service}-replica-{n}.log")))
            .expect("log file");
        let child = services::spawn(
            &services::binary_dir(),
            service,
            &env,
            std::process::Stdio::from(log.try_clone().expect("log file")),
            std::process::Stdio::from(log),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        self.children.push((service, child));
    }

    /// Kills the most recently started process of `service` (as `kill -9` would): a replica,
    /// when there is one, so that the addresses the tests call stay up. Returns its pid.
    pub async fn kill_service(&mut self, service: &str) -> Option<u32> {
        let index = self.children.iter().rposition(|(s, _)| *s == service)?;
        let (_, mut child) = self.children.remove(index);
        let pid = child.id();
        let _ = child.kill().await;
        pid
    }

    /// Kills every service (as `kill -9` would).
    pub async fn kill(&mut self) {
        for (_, child) in self.children.iter_mut() {
            let _ = child.kill().await;
        }
    }
}
