-- One row per saga (one per order). `data` is the whole state machine value; `version` is
-- the optimistic-concurrency token: every write is `WHERE version = <the version read>`.
CREATE TABLE sagas (
    saga_id        UUID        PRIMARY KEY,
    state          TEXT        NOT NULL,
    data           JSONB       NOT NULL,
    version        BIGINT      NOT NULL,
    customer_id    TEXT        NOT NULL,
    correlation_id TEXT        NOT NULL DEFAULT '',
    traceparent    TEXT        NOT NULL DEFAULT '',
    tracestate     TEXT        NOT NULL DEFAULT '',
    needs_operator BOOLEAN     NOT NULL DEFAULT false,
    last_error     TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX sagas_state_created ON sagas (state, created_at DESC);
CREATE INDEX sagas_customer_created ON sagas (customer_id, created_at DESC);

-- Every transition, for operators: what caused it and what it sent.
CREATE TABLE saga_history (
    id             BIGSERIAL   PRIMARY KEY,
    saga_id        UUID        NOT NULL REFERENCES sagas (saga_id),
    version        BIGINT      NOT NULL,
    from_state     TEXT,
    to_state       TEXT        NOT NULL,
    input          TEXT        NOT NULL,
    message_id     TEXT        NOT NULL,
    message_type   TEXT        NOT NULL,
    commands       JSONB       NOT NULL,
    correlation_id TEXT        NOT NULL DEFAULT '',
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (saga_id, version)
);

-- Durable timers (the payment deadline), fired by any replica with FOR UPDATE SKIP LOCKED.
CREATE TABLE saga_timers (
    saga_id  UUID        NOT NULL REFERENCES sagas (saga_id),
    kind     TEXT        NOT NULL,
    fire_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (saga_id, kind)
);

CREATE INDEX saga_timers_fire_at ON saga_timers (fire_at);
