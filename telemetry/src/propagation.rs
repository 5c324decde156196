//! W3C trace context (`traceparent`, `tracestate`) between spans and the strings that carry it
//! across processes: gRPC metadata, outbox rows, Kafka headers.
//!
//! Without the OpenTelemetry layer (no OTLP endpoint configured) spans have no trace context:
//! [`TraceContext::current`] is `None` and [`set_parent`] does nothing, so callers pass on the
//! context they received instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry::Context;
pub use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Header, metadata key and envelope field of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header, metadata key and envelope field of the W3C trace state.
pub const TRACESTATE: &str = "tracestate";

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROPAGATOR: LazyLock<TraceContextPropagator> = LazyLock::new(TraceContextPropagator::new);

/// Marks the OpenTelemetry layer as installed (by [`crate::init`], or a test's subscriber).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans carry OpenTelemetry trace context in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A W3C trace context as text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: String,
}

impl TraceContext {
    /// The context of the current span, when spans have one.
    pub fn current() -> Option<TraceContext> {
        if !enabled() {
            return None;
        }
        Self::of_span(&tracing::Span::current())
    }

    /// The context of `span`, when it has one.
    pub fn of_span(span: &tracing::Span) -> Option<TraceContext> {
        if !enabled() {
            return None;
        }
        Self::of_context(&span.context())
    }

    /// The context of an OpenTelemetry context's span, when it is valid.
    pub fn of_context(cx: &Context) -> Option<TraceContext> {
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut out = TraceContext::default();
        PROPAGATOR.inject_context(cx, &mut out);
        Some(out)
    }

    /// The remote span context it describes; `None` when `traceparent` is missing or invalid.
    pub fn span_context(&self) -> Option<SpanContext> {
        remote_span_context(&self.traceparent, &self.tracestate)
    }
}

impl Injector for TraceContext {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = value,
            TRACESTATE => self.tracestate = value,
            _ => {}
        }
    }
}

struct Carrier<'a> {
    traceparent: &'a str,
    tracestate: &'a str,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = match key {
            TRACEPARENT => self.traceparent,
            TRACESTATE => self.tracestate,
            _ => return None,
        };
        (!value.is_empty()).then_some(value.trim())
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The remote span context of a `traceparent` (and `tracestate`); `None` when it is missing or
/// invalid.
pub fn remote_span_context(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    if traceparent.is_empty() {
        return None;
    }
    let cx = PROPAGATOR.extract(&Carrier {
        traceparent,
        tracestate,
    });
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Makes the remote span of `traceparent` the parent of `span`, which must not have been
/// entered yet. Returns whether it did (no OpenTelemetry, or a missing or invalid
/// `traceparent`: the span keeps its parent, or starts a trace).
pub fn set_parent(span: &tracing::Span, traceparent: &str, tracestate: &str) -> bool {
    if !enabled() || traceparent.is_empty() {
        return false;
    }
    let Some(remote) = remote_span_context(traceparent, tracestate) else {
        return false;
    };
    span.set_parent(Context::new().with_remote_span_context(remote))
        .is_ok()
}

/// Links `span` to the span of another trace (a request that joins a saga, say).
pub fn add_link(span: &tracing::Span, to: SpanContext) {
    if enabled() {
        span.add_link(to);
    }
}

/// Adds an event to `span`'s OpenTelemetry span only (no log line), when spans are exported.
pub fn add_event(span: &tracing::Span, name: &'static str, attributes: Vec<KeyValue>) {
    if enabled() {
        span.add_event(name, attributes);
    }
}

/// Sets an attribute of `span`'s OpenTelemetry span only, when spans are exported.
pub fn set_attribute(
    span: &tracing::Span,
    key: &'static str,
    value: impl Into<opentelemetry::Value>,
) {
    if enabled() {
        span.set_attribute(key, value);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    const TRACEPARENT_IN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn with_otel<T>(f: impl FnOnce() -> T) -> T {
        enable();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    fn trace_id(traceparent: &str) -> &str {
        traceparent.split('-').nth(1).expect("trace id")
    }

    fn span_id(traceparent: &str) -> &str {
        traceparent.split('-').nth(2).expect("span id")
    }

    #[test]
    fn a_span_with_a_remote_parent_continues_its_trace() {
        with_otel(|| {
            let span = tracing::info_span!("consumer");
            assert!(set_parent(&span, TRACEPARENT_IN, "vendor=1"));
            let context = span
                .in_scope(TraceContext::current)
                .expect("a trace context");
            assert_eq!(
                trace_id(&context.traceparent),
                "0af7651916cd43dd8448eb211c80319c"
            );
            // A new span of its own, a child of the remote one.
            assert_ne!(span_id(&context.traceparent), "b7ad6b7169203331");
            assert!(context.traceparent.starts_with("00-"));
            assert!(context.traceparent.ends_with("-01"), "sampled: {context:?}");
            assert_eq!(context.tracestate, "vendor=1");
        });
    }

    #[test]
    fn the_context_of_a_span_round_trips_through_its_strings() {
        with_otel(|| {
            let span = tracing::info_span!("producer");
            let written = TraceContext::of_span(&span).expect("a trace context");
            let read = written.span_context().expect("a valid context");
            assert!(read.is_remote());
            assert_eq!(
                format!("{:032x}", read.trace_id()),
                trace_id(&written.traceparent)
            );
            assert_eq!(
                format!("{:016x}", read.span_id()),
                span_id(&written.traceparent)
            );
            // A child made from the strings is in the same trace, under that span.
            let child = tracing::info_span!("child");
            assert!(set_parent(
                &child,
                &written.traceparent,
                &written.tracestate
            ));
            let child_context = TraceContext::of_span(&child).expect("child context");
            assert_eq!(
                trace_id(&child_context.traceparent),
                trace_id(&written.traceparent)
            );
        });
    }

    #[test]
    fn a_root_span_starts_a_new_trace() {
        with_otel(|| {
            let a = TraceContext::of_span(&tracing::info_span!("a")).expect("context");
            let b = TraceContext::of_span(&tracing::info_span!("b")).expect("context");
            assert_ne!(trace_id(&a.traceparent), trace_id(&b.traceparent));
        });
    }

    #[test]
    fn missing_or_invalid_context_is_ignored() {
        with_otel(|| {
            let span = tracing::info_span!("s");
            assert!(!set_parent(&span, "", ""));
            assert!(!set_parent(&span, "garbage", ""));
            assert!(!set_parent(
                &span,
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                ""
            ));
            assert!(remote_span_context("00-xyz", "").is_none());
        });
    }

    #[test]
    fn without_opentelemetry_spans_have_no_context() {
        // No OpenTelemetry layer in this subscriber: nothing to read, whatever the flag.
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("plain");
            assert_eq!(span.in_scope(TraceContext::current), None);
            assert!(!set_parent(&span, TRACEPARENT_IN, ""));
        });
    }
}
