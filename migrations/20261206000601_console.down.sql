SET lock_timeout = '5s';
SET statement_timeout = '60s';

DROP TABLE IF EXISTS ops.dlq_parked;
ALTER TABLE ops.dlq_audit DROP COLUMN IF EXISTS cancel_requested_by;
ALTER TABLE ops.dlq_audit DROP COLUMN IF EXISTS done;
DELETE FROM ops.dlq_audit WHERE action IN ('park', 'unpark');
ALTER TABLE ops.dlq_audit DROP CONSTRAINT IF EXISTS dlq_audit_action_check;
-- NOT VALID: every row left satisfies it (the rows it would refuse are gone above); the
-- constraint holds for every new row.
ALTER TABLE ops.dlq_audit ADD CONSTRAINT dlq_audit_action_check CHECK (action IN ('replay', 'purge')) NOT VALID;
UPDATE identity.users SET role = 'user' WHERE role IN ('operator', 'read_only_operator');
ALTER TABLE identity.users DROP CONSTRAINT IF EXISTS users_role_check;
ALTER TABLE identity.users ADD CONSTRAINT users_role_check
    CHECK (role IN ('user', 'moderator', 'admin')) NOT VALID;
