-- Stock per SKU. Every unit is in exactly one bucket: free to reserve (available), held by a
-- reservation (reserved) or sold (committed).
CREATE TABLE stock (
    sku        TEXT        PRIMARY KEY,
    available  BIGINT      NOT NULL CHECK (available >= 0),
    reserved   BIGINT      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    committed  BIGINT      NOT NULL DEFAULT 0 CHECK (committed >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One reservation per order. A RELEASED row with no lines is a tombstone: the order was
-- released before it was reserved, so a late ReserveInventory must hold nothing.
CREATE TABLE reservations (
    reservation_id UUID        PRIMARY KEY,
    order_id       UUID        NOT NULL UNIQUE,
    status         TEXT        NOT NULL CHECK (status IN ('RESERVED', 'COMMITTED', 'RELEASED')),
    -- NULL for tombstones, which never held anything.
    expires_at     TIMESTAMPTZ,
    release_reason TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The expiry sweep reads only live reservations, oldest deadline first.
CREATE INDEX reservations_expiry ON reservations (expires_at) WHERE status = 'RESERVED';

CREATE TABLE reservation_lines (
    reservation_id UUID   NOT NULL REFERENCES reservations (reservation_id) ON DELETE CASCADE,
    sku            TEXT   NOT NULL REFERENCES stock (sku),
    quantity       BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (reservation_id, sku)
);

-- Audit trail of SetStock: who restocked or wrote off what is answered from here.
CREATE TABLE stock_adjustments (
    id               BIGSERIAL   PRIMARY KEY,
    sku              TEXT        NOT NULL REFERENCES stock (sku),
    -- NULL when the adjustment created the SKU.
    available_before BIGINT,
    available_after  BIGINT      NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The catalog of order-svc sells these SKUs.
INSERT INTO stock (sku, available) VALUES
    ('SKU-KEYBOARD', 1000),
    ('SKU-MOUSE', 1000),
    ('SKU-MONITOR', 1000),
    ('SKU-HEADSET', 1000),
    ('SKU-WEBCAM', 1000);
