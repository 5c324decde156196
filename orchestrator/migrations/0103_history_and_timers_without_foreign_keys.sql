-- A saga's history rows and timers are written only by the statement that writes the saga row
-- itself (orchestrator/src/store.rs), and sagas are never deleted: the foreign keys checked
-- what that statement already guarantees, at the cost of a lookup of the saga row per history
-- row and per timer written (about nine per saga).
ALTER TABLE saga_history DROP CONSTRAINT IF EXISTS saga_history_saga_id_fkey;
ALTER TABLE saga_timers DROP CONSTRAINT IF EXISTS saga_timers_saga_id_fkey;
