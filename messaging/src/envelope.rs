//! The envelope of every message, as Kafka headers: one header per field of
//! `messaging.v1.Envelope`.

use proto::messaging::v1::Envelope;
use rdkafka::message::{Header, Headers, OwnedHeaders};

pub const MESSAGE_ID: &str = "message-id";
pub const MESSAGE_TYPE: &str = "message-type";
pub const SAGA_ID: &str = "saga-id";
pub const CORRELATION_ID: &str = "correlation-id";
pub const CAUSATION_ID: &str = "causation-id";
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const SOURCE: &str = "source";
pub const OCCURRED_AT_MS: &str = "occurred-at-ms";

/// What a message inherits from whatever caused it: the saga's correlation id, the id of the
/// causing message and the trace context.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageContext {
    pub correlation_id: String,
    pub causation_id: String,
    pub traceparent: String,
    pub tracestate: String,
}

/// The envelope's fields as Kafka headers. Empty fields are left out.
pub fn to_headers(envelope: &Envelope) -> OwnedHeaders {
    let occurred_at = envelope.occurred_at_ms.to_string();
    let fields = [
        (MESSAGE_ID, envelope.message_id.as_str()),
        (MESSAGE_TYPE, envelope.message_type.as_str()),
        (SAGA_ID, envelope.saga_id.as_str()),
        (CORRELATION_ID, envelope.correlation_id.as_str()),
        (CAUSATION_ID, envelope.causation_id.as_str()),
        (TRACEPARENT, envelope.traceparent.as_str()),
        (TRACESTATE, envelope.tracestate.as_str()),
        (SOURCE, envelope.source.as_str()),
        (OCCURRED_AT_MS, occurred_at.as_str()),
    ];
    fields
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// Reads the envelope back from headers; missing or non-UTF-8 headers give empty fields, which
/// the consumer then rejects where they matter (the message id).
pub fn from_headers<H: Headers>(headers: &H) -> Envelope {
    let mut envelope = Envelope::default();
    for header in headers.iter() {
        let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) else {
            continue;
        };
        let value = value.to_owned();
        match header.key {
            MESSAGE_ID => envelope.message_id = value,
            MESSAGE_TYPE => envelope.message_type = value,
            SAGA_ID => envelope.saga_id = value,
            CORRELATION_ID => envelope.correlation_id = value,
            CAUSATION_ID => envelope.causation_id = value,
            TRACEPARENT => envelope.traceparent = value,
            TRACESTATE => envelope.tracestate = value,
            SOURCE => envelope.source = value,
            OCCURRED_AT_MS => envelope.occurred_at_ms = value.parse().unwrap_or_default(),
            _ => {}
        }
    }
    envelope
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_every_field() {
        let envelope = Envelope {
            message_id: "0f0e0d0c-0000-4000-8000-000000000001".into(),
            message_type: "inventory.v1.ReserveInventory".into(),
            saga_id: "0f0e0d0c-0000-4000-8000-000000000002".into(),
            correlation_id: "corr-1".into(),
            causation_id: "0f0e0d0c-0000-4000-8000-000000000003".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "vendor=1".into(),
            source: "orchestrator".into(),
            occurred_at_ms: 1_700_000_000_123,
        };
        assert_eq!(from_headers(&to_headers(&envelope)), envelope);
    }

    #[test]
    fn empty_fields_are_not_sent() {
        let envelope = Envelope {
            message_id: "id".into(),
            ..Envelope::default()
        };
        let headers = to_headers(&envelope);
        // message-id and occurred-at-ms (always present, 0 here).
        assert_eq!(headers.count(), 2);
        assert_eq!(from_headers(&headers), envelope);
    }
}
