-- Cutover flags: which side executes each processor, and every change to them.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS ops.feature_flags (
    name text PRIMARY KEY,
    value text NOT NULL CONSTRAINT feature_flags_value CHECK (value IN ('monolith', 'worker', 'shadow')),
    -- the executor before the last change: in `shadow`, the primary
    previous_value text CONSTRAINT feature_flags_previous_value
        CHECK (previous_value IN ('monolith', 'worker', 'shadow')),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL DEFAULT 'migration'
);
INSERT INTO ops.feature_flags (name, value)
VALUES ('score.executor', 'worker'), ('search.executor', 'worker'), ('dispute.executor', 'worker')
ON CONFLICT (name) DO NOTHING;

CREATE TABLE IF NOT EXISTS ops.feature_flag_audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    from_value text NOT NULL,
    to_value text NOT NULL,
    actor text NOT NULL,
    reason text NOT NULL,
    forced boolean NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS feature_flag_audit_name_idx ON ops.feature_flag_audit (name, changed_at);
