-- A writer's statement reads which rows of its messages' keys are still in the outbox (the
-- relay publishes what a writer hands it in memory only when those are published already:
-- messaging/src/relay.rs), by key.
CREATE INDEX outbox_message_key ON outbox (message_key);
