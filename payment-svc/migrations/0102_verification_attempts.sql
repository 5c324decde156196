-- A verification records its attempt before it asks the provider, outside any transaction:
-- attempt_key is the idempotency key the provider sees, kept for every later try of the same
-- payment (a retried verification, the deadline's void), which therefore settles the same
-- attempt and never charges twice.
ALTER TABLE payments
    ADD COLUMN attempt_key        UUID,
    ADD COLUMN attempt_started_at TIMESTAMPTZ;
