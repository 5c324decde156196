-- Units written off (damaged, lost): they leave the available units for good.
ALTER TABLE stock ADD COLUMN written_off BIGINT NOT NULL DEFAULT 0 CHECK (written_off >= 0);

CREATE TABLE stock_write_offs (
    id                 BIGSERIAL   PRIMARY KEY,
    sku                TEXT        NOT NULL REFERENCES stock (sku),
    quantity           BIGINT      NOT NULL CHECK (quantity > 0),
    reason             TEXT        NOT NULL,
    released_order_ids UUID[]      NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
