//! Starts the real gateway on port 0, the way `main` does.

#![allow(dead_code)] // each test file uses part of it

use std::net::SocketAddr;

use gateway::identity::{self, JwtConfig};
use gateway::{App, Config};
use tokio_util::sync::CancellationToken;

/// The HS256 secret the test gateways verify tokens with.
pub const SECRET: &str = "gateway-tests-secret";
/// The customer of the token `Gateway::client` sends.
pub const CUSTOMER: &str = "cust-1";

/// A token of the test gateways for `customer`.
pub fn token(customer: &str) -> String {
    identity::hs256_token(
        SECRET,
        identity::DEFAULT_ISSUER,
        identity::DEFAULT_AUDIENCE,
        customer,
        std::time::Duration::from_secs(600),
    )
    .expect("token")
}

pub struct Gateway {
    pub base: String,
    pub client: reqwest::Client,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    pub async fn start(
        order: &str,
        inventory: &str,
        payment: &str,
        request_timeout_ms: u64,
    ) -> Gateway {
        let config = Config {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            order_svc_url: order.to_owned(),
            inventory_svc_url: inventory.to_owned(),
            payment_svc_url: payment.to_owned(),
            request_timeout_ms,
            jwt: JwtConfig::hs256(SECRET),
            threads: Default::default(),
        };
        let app = App::build(config).await.expect("gateway builds");
        let base = format!("http://{}", app.http_addr());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(app.run(cancel.clone()));
        Gateway {
            base,
            // Every request as customer `CUSTOMER`, unless it sets its own Authorization.
            client: reqwest::Client::builder()
                .default_headers(
                    [(
                        reqwest::header::AUTHORIZATION,
                        format!("Bearer {}", token(CUSTOMER)).parse().unwrap(),
                    )]
                    .into_iter()
                    .collect(),
                )
                .build()
                .unwrap(),
            cancel,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the gateway and checks that it shut down cleanly.
    pub async fn stop(self) {
        self.cancel.cancel();
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), self.task).await;
        stopped
            .expect("gateway stops within 10 s")
            .expect("task joins")
            .expect("run succeeds");
    }
}

/// A URL on which nothing listens: bound to a free port, then released.
pub fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// Checks the error body shape and that the correlation id header is present and in the
/// body; returns the body.
pub async fn error_body(response: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let header = response
        .headers()
        .get("x-correlation-id")
        .expect("x-correlation-id header")
        .to_str()
        .unwrap()
        .to_owned();
    let content_type = response
        .headers()
        .get("content-type")
        .expect("content type")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/json");
    let body: serde_json::Value = response.json().await.expect("a JSON body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(body["correlation_id"], header.as_str(), "{body}");
    body
}
