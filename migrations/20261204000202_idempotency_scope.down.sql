-- The default of `path` stays: the previous version writes the column itself, and rows the
-- newer version wrote keep their ''.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE ops.idempotency_keys DROP COLUMN IF EXISTS path_hash;
