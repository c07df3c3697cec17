SET lock_timeout = '5s';
SET statement_timeout = '60s';

DROP TABLE IF EXISTS shadow.search_checkpoint;
DROP TABLE IF EXISTS shadow.search_contacts;
DROP TABLE IF EXISTS shadow.search_directory;
