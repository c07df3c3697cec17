-- The W3C trace context of the span that wrote each outbox row (the HTTP request's outbox
-- write, or a worker's process span), written in the same transaction as the row. The relay
-- copies it into the `traceparent` and `tracestate` NATS headers, so that the workers' spans
-- join the request's trace. NULL for rows written outside any span and for rows written before
-- this migration.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE ops.outbox ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE ops.outbox ADD COLUMN IF NOT EXISTS tracestate text;
