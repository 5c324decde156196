//! Logging, tracing and metrics shared by every service.
//!
//! - Logs: `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` writes one JSON object per
//!   line (with the fields of the spans in scope, so a request's or message's `correlation_id`
//!   is on every line written while handling it), anything else human-readable lines.
//! - Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set,
//!   spans are exported over OTLP/gRPC, configured by the standard `OTEL_*` variables
//!   (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_SCHEDULE_DELAY`...). Without it no
//!   OpenTelemetry layer is installed at all, so tracing costs what logging costs.
//!   [`propagation`] carries the W3C trace context through gRPC metadata, outbox rows and
//!   Kafka headers; [`grpc`] instruments tonic servers and clients.
//! - Metrics: a Prometheus exporter serving `/metrics` on `METRICS_ADDR` (see [`metric`] for
//!   the names), on a port of each service's own ([`services`]).

pub mod grpc;
pub mod metric;
pub mod propagation;

mod otlp;
pub mod prometheus;
pub mod services;
mod text;

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Longest time spent flushing spans on the way out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`init`] set up; call [`Telemetry::shutdown`] on the way out to flush the spans not yet
/// exported.
#[must_use = "keep it until the end of main and call shutdown() to flush the spans"]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    metrics_addr: Option<SocketAddr>,
}

/// Installs the global subscriber (logs and, when configured, the OTLP exporter) and the
/// Prometheus exporter for `service`. Call once, first thing in `main`, inside the Tokio
/// runtime (the OTLP channel and the `/metrics` server run on it).
pub fn init(service: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            "info,sqlx=warn,rdkafka=warn,h2=warn,tower=warn,hyper=warn,opentelemetry=warn",
        )
    });
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let (tracer_provider, otlp_error) = match otlp::tracer_provider(service) {
        Ok(provider) => (provider, None),
        Err(e) => (None, Some(e)),
    };

    type Base = tracing_subscriber::layer::Layered<EnvFilter, tracing_subscriber::Registry>;
    let mut layers: Vec<Box<dyn tracing_subscriber::Layer<Base> + Send + Sync>> = Vec::new();
    if json {
        layers.push(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .boxed(),
        );
    } else {
        layers.push(
            tracing_subscriber::fmt::layer()
                .fmt_fields(text::TextFields)
                .boxed(),
        );
    }
    if let Some(provider) = &tracer_provider {
        use opentelemetry::trace::TracerProvider as _;
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service))
                .with_tracked_inactivity(false)
                .with_threads(false)
                .boxed(),
        );
    }
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init()
        .is_ok();
    if installed && tracer_provider.is_some() {
        propagation::enable();
    }
    if let Some(e) = otlp_error {
        tracing::warn!(error = %e, "cannot set up the OTLP exporter: no spans are exported");
    }
    if tracer_provider.is_some() {
        tracing::info!(service, "exporting spans over OTLP");
    }
    let metrics_addr = prometheus::start(service);
    Telemetry {
        tracer_provider: tracer_provider.filter(|_| installed),
        metrics_addr,
    }
}

impl Telemetry {
    /// The address `/metrics` is served on, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Whether spans are exported.
    pub fn exports_spans(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Exports the spans not yet sent, waiting at most a few seconds.
    pub async fn shutdown(mut self) {
        let Some(provider) = self.tracer_provider.take() else {
            return;
        };
        // The SDK blocks while it flushes; the export itself needs the runtime.
        let flush =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
        match tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_secs(1), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing spans failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing spans failed"),
            Err(_) => tracing::warn!("flushing spans timed out"),
        }
    }
}
