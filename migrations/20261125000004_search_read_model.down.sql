SET lock_timeout = '5s';
SET statement_timeout = '60s';

DROP TABLE IF EXISTS search.checkpoint;
DROP TABLE IF EXISTS search.contacts;
DROP TABLE IF EXISTS search.directory;
-- pg_trgm stays: other objects of the database may use it.
