SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE score.runs DROP COLUMN IF EXISTS linked_trace_ids;
ALTER TABLE score.runs DROP COLUMN IF EXISTS trace_id;
ALTER TABLE score.scheduler DROP COLUMN IF EXISTS pending_linked_trace_ids;
ALTER TABLE score.scheduler DROP COLUMN IF EXISTS pending_trace_id;
