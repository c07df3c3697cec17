-- The dispute processor: an append-only record of every dispute decision (automatic or by a
-- moderator). `security.disputes` keeps the current decision only; a needs_review hand-off
-- (R5) later overwritten by a moderator stays here, with its reasons and rules version.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS security.dispute_decisions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dispute_id uuid NOT NULL REFERENCES security.disputes (id),
    -- upheld | dismissed | needs_review
    status text NOT NULL,
    -- R1 … R5, or moderator
    rule text NOT NULL,
    rules_version text NOT NULL,
    reasons jsonb NOT NULL,
    decided_by uuid REFERENCES identity.users (id),
    note text,
    decided_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS dispute_decisions_dispute_idx ON security.dispute_decisions (dispute_id, id);
-- trellis_dispute_auto_adjudication_ratio reads the last hour.
CREATE INDEX IF NOT EXISTS dispute_decisions_decided_at_idx ON security.dispute_decisions (decided_at);
