-- A refused reservation is recorded too: a RELEASED tombstone (no lines, no deadline) with the
-- kind of refusal and its reason in release_reason. A ReserveInventory sent again for the order
-- (a step timer, an operator's retry) then replies the same refusal, instead of holding stock,
-- freed meanwhile, for a saga that has already failed.
ALTER TABLE reservations ADD COLUMN refusal TEXT CHECK (refusal IN ('OUT_OF_STOCK', 'UNKNOWN_SKU'));
