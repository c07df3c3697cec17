-- Audit of what on-call did to dead letters: every replay and purge, who, why, which
-- sequences, and how it ended.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS ops.dlq_audit (
    id uuid PRIMARY KEY,
    -- replay | purge
    action text NOT NULL CONSTRAINT dlq_audit_action_check CHECK (action IN ('replay', 'purge')),
    actor text NOT NULL,
    reason text NOT NULL,
    -- the filters as given, for the record
    selection jsonb NOT NULL,
    -- DLQ stream sequences acted on
    sequences bigint[] NOT NULL,
    dry_run boolean NOT NULL DEFAULT false,
    -- running | completed | stopped | failed
    status text NOT NULL DEFAULT 'running',
    outcome jsonb,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS dlq_audit_started_at_idx ON ops.dlq_audit (started_at);
