SET lock_timeout = '5s';
SET statement_timeout = '60s';

DROP TRIGGER IF EXISTS users_notify_deleted ON identity.users;
DROP TRIGGER IF EXISTS users_notify_changed ON identity.users;
DROP TRIGGER IF EXISTS tokens_notify_deleted ON identity.tokens;
DROP TRIGGER IF EXISTS tokens_notify_changed ON identity.tokens;
DROP FUNCTION IF EXISTS identity.notify_user_changed();
DROP FUNCTION IF EXISTS identity.notify_token_changed();
