-- The trace of the request that triggered a score run (`trace_id`, 32 hex digits) and those of
-- the requests that were coalesced into it (`linked_trace_ids`), so that on-call can go from a
-- run to the requests behind it. The scheduler keeps them for the pending request until a run
-- takes it. NULL for runs no traced request asked for (the schedule, start-up) and older runs.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE score.scheduler ADD COLUMN IF NOT EXISTS pending_trace_id text;
ALTER TABLE score.scheduler ADD COLUMN IF NOT EXISTS pending_linked_trace_ids text[];
ALTER TABLE score.runs ADD COLUMN IF NOT EXISTS trace_id text;
ALTER TABLE score.runs ADD COLUMN IF NOT EXISTS linked_trace_ids text[];
