SET lock_timeout = '5s';
SET statement_timeout = '60s';

DROP TABLE IF EXISTS shadow.scores;
DROP TABLE IF EXISTS shadow.score_runs;
ALTER TABLE score.runs DROP COLUMN IF EXISTS input_digest;
