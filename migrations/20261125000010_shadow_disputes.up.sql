-- The dispute processor's shadow candidate. The candidate judges each dispute on
-- the facts the primary judged it on: it reconstructs them from what PostgreSQL itself records
-- about visibility, so that a decision, a filing or a suspension committed after the primary
-- read its facts (the primary's own decisions among them) is not part of the candidate's input.
--   security.disputes.filed_xact         the transaction that filed the dispute
--   security.dispute_decisions.xact      the transaction that recorded the decision
--   security.dispute_decisions.facts_at  the rules' clock (automatic decisions only)
--   security.dispute_decisions.facts_snapshot
--                                        the MVCC snapshot of the statement that read the
--                                        batch's facts (automatic decisions only)
-- A row was in the primary's facts exactly when its transaction is visible in that snapshot
-- (pg_visible_in_snapshot). The columns are added nullable without a default (no rewrite); the
-- default then applies to new rows only, and older rows fall back to their timestamps.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE security.disputes ADD COLUMN IF NOT EXISTS filed_xact xid8;
ALTER TABLE security.disputes ALTER COLUMN filed_xact SET DEFAULT pg_current_xact_id();
ALTER TABLE security.dispute_decisions ADD COLUMN IF NOT EXISTS xact xid8;
ALTER TABLE security.dispute_decisions ALTER COLUMN xact SET DEFAULT pg_current_xact_id();
ALTER TABLE security.dispute_decisions ADD COLUMN IF NOT EXISTS facts_at timestamptz;
ALTER TABLE security.dispute_decisions ADD COLUMN IF NOT EXISTS facts_snapshot pg_snapshot;

-- The disputes whose filing the candidate received (its own consumer, a copy of
-- events.disputes.filed.>), until the comparer has compared (or given up on) each.
CREATE TABLE IF NOT EXISTS shadow.dispute_inputs (
    dispute_id uuid PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    compared_at timestamptz
);
CREATE INDEX IF NOT EXISTS dispute_inputs_uncompared_idx ON shadow.dispute_inputs (received_at)
    WHERE compared_at IS NULL;

-- The candidate's decisions: its only output, never applied.
CREATE TABLE IF NOT EXISTS shadow.dispute_decisions (
    dispute_id uuid PRIMARY KEY,
    -- upheld | dismissed | needs_review
    status text NOT NULL,
    rule text NOT NULL,
    rules_version text NOT NULL,
    reasons jsonb NOT NULL,
    -- the primary's decision it was compared with (security.dispute_decisions.id)
    primary_decision_id bigint NOT NULL,
    -- the clock of the facts it judged: the primary's
    facts_at timestamptz NOT NULL,
    judged_at timestamptz NOT NULL DEFAULT now()
);

-- Whether the transaction that wrote a row version (its 32-bit xmin) is visible in snapshot `s`:
-- for the tables that keep no transaction id of their own (score.user_scores). The xmin is
-- widened to the 64-bit xid8 that pg_visible_in_snapshot takes with the epoch of the current
-- transaction counter: every live row's xmin is less than 2^32 transactions old.
CREATE OR REPLACE FUNCTION shadow.xmin_visible_in(x xid, s pg_snapshot) RETURNS boolean
LANGUAGE sql STABLE STRICT AS $$
    SELECT pg_visible_in_snapshot(
        ((next.n - next.n % 4294967296) + x::text::bigint
            - CASE WHEN x::text::bigint >= next.n % 4294967296 THEN 4294967296 ELSE 0 END)::text::xid8,
        s)
    FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS n) AS next
$$;
