-- A timer whose step fails is set aside, not retried at once: how many times in a row it
-- failed (its next delay doubles each time) and the last error, for operators.
ALTER TABLE saga_timers
    ADD COLUMN failures   INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN last_error TEXT;
