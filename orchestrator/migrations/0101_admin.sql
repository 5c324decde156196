-- What operators read through the admin API.

-- ListSagas pages newest first by (created_at, saga_id), whatever the filters.
CREATE INDEX sagas_created ON sagas (created_at DESC, saga_id DESC);
-- The few sagas an operator looks for among many finished ones.
CREATE INDEX sagas_needs_operator ON sagas (created_at DESC) WHERE needs_operator;
CREATE INDEX sagas_unfinished ON sagas (created_at DESC) WHERE state NOT IN ('COMPLETED', 'FAILED');

-- The reason an operator gave for a transition they caused (RetrySaga, AbortSaga).
ALTER TABLE saga_history ADD COLUMN operator_reason TEXT;
