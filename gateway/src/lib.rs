//! The platform's REST API: `POST /orders`, `GET /orders`, `GET /orders/{id}`,
//! `POST /payment/verify`, `GET /products`, `/healthz`, `/readyz`, forwarded over gRPC to
//! order-svc, inventory-svc and payment-svc, for the customer a JWT names; its OpenAPI
//! document at `GET /openapi.json`. It keeps no state of its own.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod backends;
pub mod config;
pub mod correlation;
pub mod error;
pub mod identity;
pub mod json;
pub mod openapi;
mod routes;

pub use config::Config;

/// Largest request body accepted (413 above).
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// The OpenAPI document of the API, exactly as `GET /openapi.json` serves it.
pub fn openapi_json() -> String {
    routes::openapi_json()
}

/// The gateway, bound and ready to serve.
pub struct App {
    listener: TcpListener,
    http_addr: SocketAddr,
    router: axum::Router,
}

impl App {
    /// Makes the (lazy) channels to the services and binds the HTTP listener (port 0 allowed).
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let backends = backends::Backends::connect_lazy(&config)?;
        let state = routes::AppState {
            backends,
            // Half the request timeout at most, so that a slow probe still gets its 503 body.
            readiness_timeout: Duration::from_secs(2).min(config.request_timeout() / 2),
            request_timeout: config.request_timeout(),
            verifier: identity::Verifier::from_config(&config.jwt)?,
        };
        let router = routes::router(state, config.request_timeout());
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.http_addr))?;
        let http_addr = listener.local_addr()?;
        Ok(App {
            listener,
            http_addr,
            router,
        })
    }

    /// The bound address (the real port when the configured one was 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Serves until `cancel`, then lets the requests in flight finish.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.http_addr, "listening");
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, self.router)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
            .context("HTTP server failed")?;
        tracing::info!("stopped");
        Ok(())
    }
}
