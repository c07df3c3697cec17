SET lock_timeout = '5s';
SET statement_timeout = '60s';

DROP FUNCTION IF EXISTS shadow.xmin_visible_in(xid, pg_snapshot);
DROP TABLE IF EXISTS shadow.dispute_decisions;
DROP TABLE IF EXISTS shadow.dispute_inputs;
ALTER TABLE security.dispute_decisions DROP COLUMN IF EXISTS facts_snapshot;
ALTER TABLE security.dispute_decisions DROP COLUMN IF EXISTS facts_at;
ALTER TABLE security.dispute_decisions DROP COLUMN IF EXISTS xact;
ALTER TABLE security.disputes DROP COLUMN IF EXISTS filed_xact;
