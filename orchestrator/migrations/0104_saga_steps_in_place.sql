-- A saga's steps update its row in place. PostgreSQL updates a row without touching its
-- indexes (a HOT update) only when no indexed column changes and its page has room; `state`
-- was in two indexes (one by state, and the unfinished sagas' predicate), so every step wrote
-- an entry into each of the table's five indexes. The indexes now read `outcome`, which
-- changes once, when the saga ends, and half of each page is left for a row's next versions.
--
-- Listing sagas by state: unfinished states through `sagas_unfinished`, FAILED through
-- `sagas_failed`, COMPLETED (most rows) through `sagas_created`, filtered.
ALTER TABLE sagas SET (fillfactor = 50);
ALTER TABLE sagas ADD COLUMN outcome TEXT
    GENERATED ALWAYS AS (CASE WHEN state IN ('COMPLETED', 'FAILED') THEN state END) STORED;
DROP INDEX sagas_state_created;
DROP INDEX sagas_unfinished;
CREATE INDEX sagas_unfinished ON sagas (created_at DESC, saga_id DESC) WHERE outcome IS NULL;
CREATE INDEX sagas_failed ON sagas (created_at DESC, saga_id DESC) WHERE outcome = 'FAILED';

-- A history row is found by its saga and version, its primary key now; the serial id
-- served nothing but an index of its own, written at every step.
ALTER TABLE saga_history DROP COLUMN id;
ALTER TABLE saga_history DROP CONSTRAINT saga_history_saga_id_version_key,
    ADD PRIMARY KEY (saga_id, version);
