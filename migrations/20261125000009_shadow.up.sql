-- Shadow parity: every comparison of a candidate's output with the primary's for
-- the same input. Each processor's candidate writes its own outputs to tables of this schema;
-- this table is what `trellisctl parity` reports and the promotion gate reads.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE SCHEMA IF NOT EXISTS shadow;

CREATE TABLE IF NOT EXISTS shadow.comparisons (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- score | search | dispute
    processor text NOT NULL CONSTRAINT comparisons_processor CHECK (processor IN ('score', 'search', 'dispute')),
    -- the input: a dispute id, a document, a run
    key text NOT NULL,
    result text NOT NULL CONSTRAINT comparisons_result CHECK (result IN ('matched', 'mismatched', 'missing')),
    -- inputs this row stands for (a score run's matched users are one row)
    count bigint NOT NULL DEFAULT 1 CONSTRAINT comparisons_count CHECK (count > 0),
    -- [{field, primary, candidate}]: what differs, or why an output is missing
    diffs jsonb NOT NULL DEFAULT '[]',
    compared_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS comparisons_processor_idx ON shadow.comparisons (processor, compared_at);
