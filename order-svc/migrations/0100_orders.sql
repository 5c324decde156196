-- The catalog: the only source of prices (a client never sets one).
CREATE TABLE products (
    sku              TEXT   PRIMARY KEY,
    name             TEXT   NOT NULL,
    unit_price_cents BIGINT NOT NULL CHECK (unit_price_cents > 0),
    currency         TEXT   NOT NULL
);

INSERT INTO products (sku, name, unit_price_cents, currency) VALUES
    ('SKU-KEYBOARD', 'Mechanical keyboard', 8900, 'USD'),
    ('SKU-MOUSE', 'Wireless mouse', 2900, 'USD'),
    ('SKU-MONITOR', '27-inch monitor', 32900, 'USD'),
    ('SKU-HEADSET', 'USB headset', 5900, 'USD'),
    ('SKU-WEBCAM', 'HD webcam', 4900, 'USD');

CREATE TABLE orders (
    order_id            UUID        PRIMARY KEY,
    customer_id         TEXT        NOT NULL,
    status              TEXT        NOT NULL
        CHECK (status IN ('PENDING', 'PAYMENT_INITIATED', 'COMPLETED', 'FAILED')),
    total_cents         BIGINT      NOT NULL CHECK (total_cents > 0),
    currency            TEXT        NOT NULL,
    payment_method      TEXT        NOT NULL,
    payment_id          UUID        NULL,
    failure_reason      TEXT        NULL,
    -- A retried request with the same key returns this order (NULLs never conflict).
    idempotency_key     TEXT        NULL UNIQUE,
    -- What the request asked for, to tell a retry from a different request under the same key.
    request_fingerprint TEXT        NOT NULL,
    correlation_id      TEXT        NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX orders_customer_created_at ON orders (customer_id, created_at);

CREATE TABLE order_lines (
    order_id         UUID   NOT NULL REFERENCES orders (order_id),
    sku              TEXT   NOT NULL,
    quantity         INT    NOT NULL CHECK (quantity > 0),
    -- The price at the time of the order; the catalog may change later.
    unit_price_cents BIGINT NOT NULL,
    PRIMARY KEY (order_id, sku)
);
