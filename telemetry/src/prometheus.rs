//! The Prometheus exporter: the global `metrics` recorder and a small HTTP server answering
//! `GET /metrics` on `METRICS_ADDR`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram buckets of every `*_seconds` metric: from a millisecond (one saga step on a quiet
/// machine) to ten minutes (the payment deadline).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

/// How often histograms are compacted between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Where a service serves `/metrics` unless `METRICS_ADDR` says otherwise: its port in
/// [`crate::services::SERVICES`]; any free port for a name that is not the platform's.
pub fn default_addr(service: &str) -> SocketAddr {
    let port = crate::services::named(service).map_or(0, |s| s.metrics_port);
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Installs the recorder and serves `/metrics`; returns the bound address (port 0 picks a free
/// one). `METRICS_ADDR=off` serves nothing. A failure is logged, not fatal: the service runs
/// without metrics rather than not at all.
pub(crate) fn start(service: &'static str) -> Option<SocketAddr> {
    let addr = match std::env::var("METRICS_ADDR") {
        Ok(value) if value.trim().is_empty() || value.trim().eq_ignore_ascii_case("off") => {
            return None
        }
        Ok(value) => match value.trim().parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(e) => {
                tracing::warn!(%value, error = %e, "METRICS_ADDR is not an address (host:port): no metrics served");
                return None;
            }
        },
        Err(_) => default_addr(service),
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("telemetry::init outside a Tokio runtime: no metrics served");
        return None;
    };
    let listener = match std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
    {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot listen on METRICS_ADDR: no metrics served");
            return None;
        }
    };
    let bound = listener.local_addr().unwrap_or(addr);
    let handle = match install() {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the metrics recorder");
            return None;
        }
    };
    crate::metric::describe();
    let upkeep = handle.clone();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    runtime.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener");
                return;
            }
        };
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || std::future::ready(handle.render())),
        );
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(metrics_addr = %bound, "serving Prometheus metrics on /metrics");
    Some(bound)
}

fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
        .install_recorder()
}
