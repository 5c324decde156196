//! Messaging's part of the service skeleton ([`runtime::Service`]): start-up with the shared
//! tables and the topics, the relay and the consumers as the service's tasks, and the context
//! of the messages a gRPC request causes.

use std::net::SocketAddr;

use runtime::config::DatabaseArgs;
use runtime::Service;
use sqlx::migrate::Migrator;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use crate::{Consumer, Handler, KafkaArgs, MessageContext, Outbox, Relay};

/// Starts a service that sends and receives messages: its database migrated with
/// [`crate::MIGRATOR`] first, then `migrator`; the topics created where missing; the gRPC
/// listener bound; the broker probed by its health. Returns it with its outbox: one per
/// process, so that every writer's commit wakes the relay in memory.
pub async fn start(
    name: &'static str,
    database: &DatabaseArgs,
    migrator: &Migrator,
    grpc_addr: SocketAddr,
    kafka: &KafkaArgs,
) -> anyhow::Result<(Service, Outbox)> {
    let service = Service::start(name, database, &[&crate::MIGRATOR, migrator], grpc_addr).await?;
    kafka.ensure_topics().await?;
    Ok((
        service.probe(kafka.probe()?),
        Outbox::new(name, kafka.clone()),
    ))
}

/// The relay and the consumers of a [`Service`].
pub trait ServiceExt: Sized {
    /// Publishes `outbox` (woken in memory by its writers' commits) until the service stops.
    fn relay(self, outbox: &Outbox) -> anyhow::Result<Self>;

    /// Consumes `topics` (names from [`proto::topics`]) into `handler` in the service's
    /// consumer group, its replies through `outbox`, until the service stops.
    fn consumer<H: Handler>(self, topics: &[&str], outbox: &Outbox, handler: H) -> Self;
}

impl ServiceExt for Service {
    fn relay(self, outbox: &Outbox) -> anyhow::Result<Self> {
        let relay = Relay::for_outbox(self.pool().clone(), outbox)?;
        Ok(self.task("outbox relay", |cancel| relay.run(cancel)))
    }

    fn consumer<H: Handler>(self, topics: &[&str], outbox: &Outbox, handler: H) -> Self {
        let consumer = Consumer::new(
            outbox.kafka(),
            self.name(),
            topics,
            self.pool().clone(),
            outbox.clone(),
        );
        self.task("consumer", |cancel| consumer.run(handler, cancel))
    }
}

/// Metadata carrying the saga's correlation id (made by the gateway from `X-Correlation-ID`).
pub const CORRELATION_ID: &str = "x-correlation-id";
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
/// Longest correlation id taken from a caller.
const MAX_CORRELATION_ID_CHARS: usize = 128;
const MAX_TRACE_HEADER_CHARS: usize = 512;

/// The context of the messages a gRPC request causes: the caller's correlation id and trace
/// context from its metadata (a value that is empty, not text, or too long counts as absent:
/// empty), caused by the request itself, which gets a new id.
pub fn request_context(metadata: &MetadataMap) -> MessageContext {
    let text = |key: &str, max: usize| {
        metadata
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= max)
            .map(str::to_owned)
            .unwrap_or_default()
    };
    MessageContext {
        correlation_id: text(CORRELATION_ID, MAX_CORRELATION_ID_CHARS),
        causation_id: Uuid::now_v7().to_string(),
        traceparent: text(TRACEPARENT, MAX_TRACE_HEADER_CHARS),
        tracestate: text(TRACESTATE, MAX_TRACE_HEADER_CHARS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_context_takes_only_usable_metadata() {
        let mut metadata = MetadataMap::new();
        metadata.insert(CORRELATION_ID, " corr-1 ".parse().unwrap());
        metadata.insert(TRACEPARENT, "x".repeat(513).parse().unwrap());
        metadata.insert(TRACESTATE, "vendor=1".parse().unwrap());
        let context = request_context(&metadata);
        assert_eq!(context.correlation_id, "corr-1");
        assert_eq!(context.traceparent, "", "too long");
        assert_eq!(context.tracestate, "vendor=1");
        assert!(Uuid::parse_str(&context.causation_id).is_ok());

        metadata.insert(CORRELATION_ID, "c".repeat(129).parse().unwrap());
        assert_eq!(request_context(&metadata).correlation_id, "", "too long");
        assert_eq!(request_context(&MetadataMap::new()).correlation_id, "");
    }
}
