//! The envelope of every message, in Kafka headers: the whole `messaging.v1.Envelope`,
//! protobuf-encoded, in one `envelope` header, and the W3C trace context again in
//! `traceparent`/`tracestate` headers, where tracing tools outside the platform look for it.
//!
//! One header rather than one per field: every header costs a key and a length in each record
//! on the wire and on disk, and the envelope is read whole anyway. Messages with one header
//! per field (this platform's earlier releases) are still read.

use prost::Message as _;
use proto::messaging::v1::Envelope;
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Milliseconds since the epoch: the unit of the envelope's `occurred_at_ms` and of Kafka's
/// timestamps.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The header holding the protobuf-encoded envelope.
pub const ENVELOPE: &str = "envelope";
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

// One header per field: how earlier releases sent the envelope, still understood.
pub const MESSAGE_ID: &str = "message-id";
pub const MESSAGE_TYPE: &str = "message-type";
pub const SAGA_ID: &str = "saga-id";
pub const CORRELATION_ID: &str = "correlation-id";
pub const CAUSATION_ID: &str = "causation-id";
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

/// The envelope as Kafka headers: `envelope`, then the trace context when there is one.
pub fn to_headers(envelope: &Envelope) -> OwnedHeaders {
    let encoded = envelope.encode_to_vec();
    let mut headers = OwnedHeaders::new_with_capacity(3).insert(Header {
        key: ENVELOPE,
        value: Some(encoded.as_slice()),
    });
    for (key, value) in [
        (TRACEPARENT, &envelope.traceparent),
        (TRACESTATE, &envelope.tracestate),
    ] {
        if !value.is_empty() {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
    }
    headers
}

/// Reads the envelope back from headers. An undecodable `envelope` header, or missing or
/// non-UTF-8 per-field headers, give empty fields, which the consumer then rejects where they
/// matter (the message id).
pub fn from_headers<H: Headers>(headers: &H) -> Envelope {
    if let Some(header) = headers.iter().find(|h| h.key == ENVELOPE) {
        return header
            .value
            .and_then(|v| Envelope::decode(v).ok())
            .unwrap_or_default();
    }
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
    fn headers_are_the_envelope_and_the_trace_context() {
        let envelope = Envelope {
            message_id: "id".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            ..Envelope::default()
        };
        let headers = to_headers(&envelope);
        let keys: Vec<&str> = headers.iter().map(|h| h.key).collect();
        assert_eq!(keys, [ENVELOPE, TRACEPARENT]);
        assert_eq!(
            headers.get(1).value,
            Some(envelope.traceparent.as_bytes()),
            "W3C traceparent as its own header"
        );
        assert_eq!(from_headers(&headers), envelope);
    }

    #[test]
    fn one_header_per_field_is_still_read() {
        let headers = [
            (MESSAGE_ID, "id-1"),
            (MESSAGE_TYPE, "order.v1.OrderCreated"),
            (SAGA_ID, "saga-1"),
            (CORRELATION_ID, "corr-1"),
            (CAUSATION_ID, "cause-1"),
            (
                TRACEPARENT,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            (TRACESTATE, "vendor=1"),
            (SOURCE, "order-svc"),
            (OCCURRED_AT_MS, "1700000000123"),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
        let envelope = from_headers(&headers);
        assert_eq!(envelope.message_id, "id-1");
        assert_eq!(envelope.message_type, "order.v1.OrderCreated");
        assert_eq!(envelope.saga_id, "saga-1");
        assert_eq!(envelope.correlation_id, "corr-1");
        assert_eq!(envelope.causation_id, "cause-1");
        assert_eq!(envelope.tracestate, "vendor=1");
        assert_eq!(envelope.source, "order-svc");
        assert_eq!(envelope.occurred_at_ms, 1_700_000_000_123);
    }

    #[test]
    fn an_undecodable_envelope_reads_as_empty() {
        let headers = OwnedHeaders::new().insert(Header {
            key: ENVELOPE,
            value: Some(&[0xff_u8, 0xff, 0xff][..]),
        });
        assert_eq!(from_headers(&headers), Envelope::default());
    }
}
