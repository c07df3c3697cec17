-- The on-call console: the roles that may use it, and parked dead letters.
--
-- `operator` runs the console (dead letters, cutover flags, score runs); `read_only_operator`
-- sees everything it shows and changes nothing (enforced by the API on every action).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- The wider checks are added NOT VALID here (a brief lock) and validated by the next
-- migration, in a transaction of its own (reads and writes go on meanwhile). Each check is
-- dropped and added again wider in this one transaction: no client ever sees the table without
-- it, and every value it allowed is still allowed.
-- squawk-ignore ban-drop-constraint
ALTER TABLE identity.users DROP CONSTRAINT IF EXISTS users_role_check;
ALTER TABLE identity.users ADD CONSTRAINT users_role_check
    CHECK (role IN ('user', 'moderator', 'admin', 'operator', 'read_only_operator')) NOT VALID;

-- Parking and unparking are audited like replays and purges.
-- squawk-ignore ban-drop-constraint
ALTER TABLE ops.dlq_audit DROP CONSTRAINT IF EXISTS dlq_audit_action_check;
ALTER TABLE ops.dlq_audit ADD CONSTRAINT dlq_audit_action_check
    CHECK (action IN ('replay', 'purge', 'park', 'unpark')) NOT VALID;

-- A long action's progress (how many of `sequences` are done), written as it goes, so that any
-- API process can show it; and a request to stop it, which the process running it reads
-- between windows.
ALTER TABLE ops.dlq_audit ADD COLUMN IF NOT EXISTS done integer NOT NULL DEFAULT 0;
ALTER TABLE ops.dlq_audit ADD COLUMN IF NOT EXISTS cancel_requested_by text;

-- Dead letters kept in the DLQ but out of the replayable set: a replay or purge by filter
-- skips them until they are unparked. A dead letter is named by its DLQ sequence and its
-- message id (`dlq-<stream>-<sequence>`), so that a row left by a DLQ stream that was recreated
-- does not park the new stream's message of the same sequence.
CREATE TABLE IF NOT EXISTS ops.dlq_parked (
    sequence bigint PRIMARY KEY,
    msg_id text NOT NULL,
    consumer text NOT NULL,
    audit_id uuid NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now()
);
