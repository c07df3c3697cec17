-- Sessions (docs/SECURITY.md "Sessions and idempotency"): when a bearer token was last used and
-- the client address it was issued to. A token unused for TOKEN_IDLE_TIMEOUT no longer
-- authenticates. `last_used_at` is written by the API's activity batches (at most once a
-- minute per token), never by the request that uses the token.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- now() is stable, so existing rows take the migration's time without a table rewrite: the
-- idle clock of every token issued before this migration starts with it.
ALTER TABLE identity.tokens ADD COLUMN IF NOT EXISTS last_used_at timestamptz DEFAULT now();
ALTER TABLE identity.tokens ADD COLUMN IF NOT EXISTS client_addr inet;
