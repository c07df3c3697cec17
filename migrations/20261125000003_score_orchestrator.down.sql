SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE score.runs DROP COLUMN IF EXISTS algorithm;
DROP TABLE IF EXISTS score.scheduler;
