SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE identity.tokens DROP COLUMN IF EXISTS client_addr;
ALTER TABLE identity.tokens DROP COLUMN IF EXISTS last_used_at;
