-- Validates the wider checks the previous migration added NOT VALID, in a transaction of its
-- own: VALIDATE CONSTRAINT takes a lock that lets reads and writes go on.
SET lock_timeout = '5s';
SET statement_timeout = '10min';

ALTER TABLE identity.users VALIDATE CONSTRAINT users_role_check;
ALTER TABLE ops.dlq_audit VALIDATE CONSTRAINT dlq_audit_action_check;
