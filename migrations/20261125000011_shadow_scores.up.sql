-- The score orchestrator's shadow candidate: the digest of every run's input, so
-- that a candidate's run is compared with the primary run computed from the same input, and the
-- candidate's own runs and scores, which nothing but the comparison reads.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- trellis_domain::score::InputDigest of the run's input; NULL for runs made before digests.
ALTER TABLE score.runs ADD COLUMN IF NOT EXISTS input_digest bigint;

CREATE TABLE IF NOT EXISTS shadow.score_runs (
    id uuid PRIMARY KEY,
    -- the scores.run_requested event the run served
    request_id uuid,
    status text NOT NULL CONSTRAINT score_runs_status CHECK (status IN ('succeeded', 'failed')),
    -- the candidate's rules
    algorithm text NOT NULL,
    host text NOT NULL,
    input_digest bigint,
    users bigint,
    edges bigint,
    error text,
    -- the start of the snapshot's transaction: every request made before it is served by it
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    -- how the run was settled (each run is compared once): compared with primary_run_id;
    -- missing (no primary run on the same input within the wait); period_ended (its shadow
    -- period ended before it was compared: not counted)
    comparison text CONSTRAINT score_runs_comparison CHECK (comparison IN ('compared', 'missing', 'period_ended')),
    compared_at timestamptz,
    primary_run_id uuid,
    -- the largest relative difference of trust among the users whose outputs matched
    max_trust_difference float8
);
-- The comparer's queue: succeeded runs not compared yet.
CREATE INDEX IF NOT EXISTS score_runs_uncompared_idx ON shadow.score_runs (started_at)
    WHERE compared_at IS NULL AND status = 'succeeded';

-- A candidate run's scores, until the run is compared (then its comparisons are the record).
CREATE TABLE IF NOT EXISTS shadow.scores (
    run_id uuid NOT NULL REFERENCES shadow.score_runs (id) ON DELETE CASCADE,
    user_id uuid NOT NULL,
    trust float8 NOT NULL,
    score integer NOT NULL,
    PRIMARY KEY (run_id, user_id)
);
