-- One payment per order. It awaits verification by the client until the provider decides
-- (SUCCEEDED or DECLINED), or the saga voids it (VOIDED) or gives the money back (REFUNDED).
CREATE TABLE payments (
    payment_id     UUID        PRIMARY KEY,
    order_id       UUID        NOT NULL UNIQUE,
    amount_cents   BIGINT      NOT NULL CHECK (amount_cents >= 0),
    currency       TEXT        NOT NULL,
    payment_method TEXT        NOT NULL,
    status         TEXT        NOT NULL CHECK (status IN
                       ('AWAITING_VERIFICATION', 'SUCCEEDED', 'DECLINED', 'VOIDED', 'REFUNDED')),
    decline_reason TEXT,
    -- The saga's correlation id and trace context, from the ChargePayment command, so that the
    -- replies a later verification causes belong to the same saga and trace.
    correlation_id TEXT        NOT NULL DEFAULT '',
    traceparent    TEXT        NOT NULL DEFAULT '',
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
