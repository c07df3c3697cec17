SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE ops.outbox DROP COLUMN IF EXISTS tracestate;
ALTER TABLE ops.outbox DROP COLUMN IF EXISTS traceparent;
