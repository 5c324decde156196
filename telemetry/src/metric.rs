//! The names of the platform's Prometheus metrics, in one place, with their help text.
//!
//! Record them with the `metrics` macros (`metrics::counter!(metric::SAGAS_STARTED)`); without
//! an exporter installed (in-process tests) the macros do nothing.

/// Sagas started (orchestrator).
pub const SAGAS_STARTED: &str = "sagas_started_total";
/// Sagas that ended `COMPLETED` (orchestrator).
pub const SAGAS_COMPLETED: &str = "sagas_completed_total";
/// Sagas that ended `FAILED`, by `reason` (a bounded category) (orchestrator).
pub const SAGAS_FAILED: &str = "sagas_failed_total";
/// Time a saga spent in a `step` (its state) before moving on, in seconds (orchestrator).
pub const SAGA_STEP_DURATION: &str = "saga_step_duration_seconds";
/// Rows waiting in the outbox (every service).
pub const OUTBOX_BACKLOG: &str = "outbox_backlog";
/// Age of the oldest row waiting in the outbox, in seconds; 0 when empty (every service).
pub const OUTBOX_OLDEST_AGE: &str = "outbox_oldest_age_seconds";
/// Messages published by the outbox relay, by `topic` (every service).
pub const OUTBOX_PUBLISHED: &str = "outbox_published_total";
/// Outbox rows set aside because they can never be published, by `topic` (every service).
pub const OUTBOX_PARKED: &str = "outbox_parked_total";
/// Outbox rows set aside and still waiting for an operator (every service).
pub const OUTBOX_PARKED_ROWS: &str = "outbox_parked_rows";
/// Messages on the consumer's partitions not yet consumed, by `topic` (every consumer).
pub const CONSUMER_LAG: &str = "consumer_lag";
/// One Kafka crossing, stage 1: from a message's creation in its writer's transaction to the
/// relay taking it (handed over in memory, or read from its outbox row).
pub const OUTBOX_WAIT: &str = "outbox_wait_seconds";
/// Stage 2: from the relay sending a batch to the broker's last acknowledgement of it.
pub const OUTBOX_PUBLISH: &str = "outbox_publish_seconds";
/// Stage 3: from the relay's send (the record's timestamp) to the consumer receiving it.
pub const MESSAGE_DELIVERY: &str = "message_delivery_seconds";
/// Stage 4: the consumer's transaction of one batch, from its start to its commit.
pub const CONSUMER_BATCH: &str = "consumer_batch_seconds";
/// Messages in each batch the consumer handled in one transaction.
pub const CONSUMER_BATCH_SIZE: &str = "consumer_batch_messages";
/// Partitions assigned to this consumer by its group, by `group` (every consumer).
pub const CONSUMER_PARTITIONS: &str = "consumer_partitions";
/// Messages handled by a consumer, by `topic` (every consumer).
pub const MESSAGES_HANDLED: &str = "messages_handled_total";
/// Messages sent to a dead-letter topic, by the original `topic` (every consumer).
pub const DEAD_LETTERS: &str = "dead_letters_total";
/// REST requests, by `route` and `status` (gateway).
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// REST request latency, by `route`, in seconds (gateway).
pub const HTTP_REQUEST_DURATION: &str = "http_request_duration_seconds";
/// gRPC requests served, by `service`, `method` and `code` (every gRPC server).
pub const GRPC_REQUESTS: &str = "grpc_requests_total";
/// gRPC request latency, by `service` and `method`, in seconds (every gRPC server).
pub const GRPC_REQUEST_DURATION: &str = "grpc_request_duration_seconds";

/// Registers the help text of every metric (`# HELP` lines).
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SAGAS_STARTED, "Sagas started, one per order.");
    describe_counter!(SAGAS_COMPLETED, "Sagas that ended COMPLETED.");
    describe_counter!(
        SAGAS_FAILED,
        "Sagas that ended FAILED, by reason: inventory_reservation_failed, payment_declined, \
         payment_deadline, inventory_commit_failed, aborted_by_operator, other."
    );
    describe_histogram!(
        SAGA_STEP_DURATION,
        Unit::Seconds,
        "Time a saga spent in a step (its state, e.g. RESERVING) before moving on."
    );
    describe_gauge!(
        OUTBOX_BACKLOG,
        "Rows of the outbox not yet published, as of the relay's last look."
    );
    describe_gauge!(
        OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest outbox row not yet published (0 when the outbox is empty)."
    );
    describe_counter!(
        OUTBOX_PUBLISHED,
        "Messages the outbox relay published, by topic."
    );
    describe_counter!(
        OUTBOX_PARKED,
        "Outbox rows set aside (table outbox_parked) because they can never be published, by topic."
    );
    describe_gauge!(
        OUTBOX_PARKED_ROWS,
        "Outbox rows set aside in outbox_parked, waiting for an operator."
    );
    describe_gauge!(
        CONSUMER_PARTITIONS,
        "Partitions the consumer group assigned to this consumer, by group."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Messages on the partitions assigned to this consumer that it has not consumed yet, by topic."
    );
    describe_histogram!(
        OUTBOX_WAIT,
        Unit::Seconds,
        "From a message's creation in its writer's transaction to the relay taking it: the \
         rest of that transaction, its commit, the relay's wake and its read of the outbox when \
         it reads one."
    );
    describe_histogram!(
        OUTBOX_PUBLISH,
        Unit::Seconds,
        "From the relay sending a batch to the broker to its last acknowledgement."
    );
    describe_histogram!(
        MESSAGE_DELIVERY,
        Unit::Seconds,
        "From the relay's send of a message (its Kafka timestamp) to a consumer receiving it, by topic."
    );
    describe_histogram!(
        CONSUMER_BATCH,
        Unit::Seconds,
        "The consumer's transaction of one batch, from its start to its commit."
    );
    describe_histogram!(
        CONSUMER_BATCH_SIZE,
        "Messages the consumer handled in one transaction."
    );
    describe_counter!(
        MESSAGES_HANDLED,
        "Messages handled by the consumer, by topic."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Messages that could never be handled and went to <topic>.dlq, by original topic."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "REST requests answered, by route and status."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer a REST request, by route."
    );
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC requests answered, by service, method and status code."
    );
    describe_histogram!(
        GRPC_REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer a gRPC request, by service and method."
    );
}
