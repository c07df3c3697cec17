SET lock_timeout = '5s';
SET statement_timeout = '60s';

DROP FUNCTION IF EXISTS search.find_users(bytea, interval, text, text, bigint, bigint);
