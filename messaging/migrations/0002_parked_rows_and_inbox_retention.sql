-- Outbox rows the relay could never publish (an envelope that does not decode, a message the
-- broker refuses), set aside with the error so that the rest of the outbox goes on. An
-- operator reads them here (and in the `outbox_parked` gauge), fixes the cause and moves a
-- row back into `outbox` to publish it.
CREATE TABLE outbox_parked (
    id            BIGINT      PRIMARY KEY,
    message_id    UUID        NOT NULL,
    topic         TEXT        NOT NULL,
    message_key   TEXT        NOT NULL,
    message_type  TEXT        NOT NULL,
    envelope      BYTEA       NOT NULL,
    payload       BYTEA       NOT NULL,
    extra_headers BYTEA       NOT NULL DEFAULT '',
    created_at    TIMESTAMPTZ NOT NULL,
    error         TEXT        NOT NULL,
    parked_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The inbox keeps a handled message's id for a retention period, then forgets it; rows are
-- appended in time order, which a BRIN index serves at almost no cost per insert.
CREATE INDEX inbox_handled_at ON inbox USING brin (handled_at);
