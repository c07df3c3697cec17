-- Idempotency keys belong to authenticated users (`principal` is the user id; anonymous
-- requests keep no key) and keep a SHA-256 of the request path instead of the path, which a
-- client could make as long as the body limit. The API no longer writes `path`: its default
-- fills it for the rows it inserts, and the previous version, which still reads it during a
-- rolling upgrade, finds a string there.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE ops.idempotency_keys ADD COLUMN IF NOT EXISTS path_hash bytea;
ALTER TABLE ops.idempotency_keys ALTER COLUMN path SET DEFAULT '';
