-- Reverses the foundation: this drops every table and so every row. Run it only to undo a
-- fresh install, never against data that must be kept.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

DROP TABLE IF EXISTS ops.idempotency_keys;
DROP TRIGGER IF EXISTS outbox_notify ON ops.outbox;
DROP FUNCTION IF EXISTS ops.notify_outbox();
DROP TABLE IF EXISTS ops.outbox;
DROP TABLE IF EXISTS score.user_scores;
DROP TABLE IF EXISTS score.runs;
DROP TABLE IF EXISTS security.hidden_users;
DROP TABLE IF EXISTS security.disputes;
DROP TABLE IF EXISTS circles.members;
DROP TABLE IF EXISTS circles.circles;
DROP TABLE IF EXISTS contacts.contacts;
DROP TABLE IF EXISTS identity.tokens;
DROP TABLE IF EXISTS identity.users;

DROP SCHEMA IF EXISTS ops;
DROP SCHEMA IF EXISTS search;
DROP SCHEMA IF EXISTS score;
DROP SCHEMA IF EXISTS security;
DROP SCHEMA IF EXISTS circles;
DROP SCHEMA IF EXISTS contacts;
DROP SCHEMA IF EXISTS identity;
