//! Fields of human-readable log lines: every field but the constant ones that only tell
//! OpenTelemetry what kind of span it is (JSON lines keep them all).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput as _};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::FormatFields;

/// Left out of text lines: the same on every span of a kind, or already in `otel.name`.
const NOISE: [&str; 6] = [
    "otel.kind",
    "otel.status_code",
    "messaging.system",
    "messaging.operation.type",
    "messaging.destination.name",
    "rpc.system",
];

/// tracing-subscriber's default field format, less [`NOISE`].
pub(crate) struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Quiet(DefaultVisitor::new(writer, true));
        fields.record(&mut visitor);
        visitor.0.finish()
    }
}

struct Quiet<'a>(DefaultVisitor<'a>);

impl Visit for Quiet<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !NOISE.contains(&field.name()) {
            self.0.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.record_error(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !NOISE.contains(&field.name()) {
            self.0.record_debug(field, value);
        }
    }
}
