-- Every change of a user's role or status, with who made it and why: role grants
-- (`trellisctl users grant-role`), suspensions (an upheld dispute of a suspending kind, decided
-- by the rules or by a moderator) and reinstatements (`POST /v1/admin/users/{user}/reinstate`,
-- `trellisctl users reinstate`). A row is written in the transaction that makes the change,
-- while that transaction holds the user's row lock, so one user's rows are in the order their
-- changes committed (by id). `xact` is that transaction: the dispute processor's shadow
-- candidate reads a user's role and status as a past snapshot saw them (the earliest change
-- that snapshot did not see says what was there before it).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS identity.user_admin_audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES identity.users (id),
    action text NOT NULL
        CONSTRAINT user_admin_audit_action_check CHECK (action IN ('grant_role', 'suspend', 'reinstate')),
    -- a role (grant_role) or a status (suspend, reinstate): before and after
    from_value text NOT NULL,
    to_value text NOT NULL,
    -- an admin's or a moderator's handle (API), the operator's name (trellisctl), or
    -- `dispute-processor` (a rule's decision)
    actor text NOT NULL,
    -- the acting user, when a user acted through the API
    actor_id uuid REFERENCES identity.users (id),
    reason text NOT NULL,
    -- the upheld dispute behind a suspension
    dispute_id uuid,
    xact xid8 NOT NULL DEFAULT pg_current_xact_id(),
    acted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS user_admin_audit_user_idx ON identity.user_admin_audit (user_id, id);
CREATE INDEX IF NOT EXISTS user_admin_audit_acted_at_idx ON identity.user_admin_audit (acted_at);
