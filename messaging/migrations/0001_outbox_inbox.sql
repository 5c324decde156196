-- Transactional outbox: rows are written in the same transaction as the state change that
-- causes them and deleted by the relay once the broker has acknowledged them.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    message_id   UUID        NOT NULL UNIQUE,
    topic        TEXT        NOT NULL,
    message_key  TEXT        NOT NULL,
    message_type TEXT        NOT NULL,
    envelope     BYTEA       NOT NULL,
    payload      BYTEA       NOT NULL,
    -- Headers besides the envelope's (a dead letter's error), length-prefixed pairs.
    extra_headers BYTEA      NOT NULL DEFAULT '',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Wakes the relay when a transaction that wrote to the outbox commits (NOTIFY is delivered at
-- commit, once per transaction however many rows it wrote).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Inbox: the id of every message handled, written in the handler's transaction, so that a
-- message delivered twice has one effect.
CREATE TABLE inbox (
    message_id   UUID        PRIMARY KEY,
    message_type TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    handled_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
