-- A tombstone: the saga compensated (voided or refunded) an order before any charge of it
-- arrived. It holds the order's one row, so a ChargePayment arriving later (a redelivery, a
-- replayed dead letter) finds it and records no payment for an order that has already failed.
-- Tombstones carry no money (amount 0, no method) and are never shown as payments.
ALTER TABLE payments ADD COLUMN tombstone BOOLEAN NOT NULL DEFAULT false;
