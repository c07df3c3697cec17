-- Change notifications for the API's in-process token cache (`trellis_api::token_cache`): on
-- channel `trellis_token_revoked`, `t:<token hash in hex>` when a token stops authenticating
-- other than by its clock (revoked, deleted while not revoked, its expiry or owner changed), and
-- `u:<user id>` when a user's status, role or password hash changes (every cached token of the
-- user goes). Notifications are sent at commit, only by transactions that commit.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE OR REPLACE FUNCTION identity.notify_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trellis_token_revoked', 't:' || encode(OLD.token_hash, 'hex'));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION identity.notify_user_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trellis_token_revoked', 'u:' || OLD.id::text);
    RETURN NULL;
END;
$$;

-- A token's last use (written by every activity flush) notifies nothing.
CREATE OR REPLACE TRIGGER tokens_notify_changed
    AFTER UPDATE OF revoked_at, expires_at, user_id, token_hash ON identity.tokens
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.user_id IS DISTINCT FROM NEW.user_id
          OR OLD.token_hash IS DISTINCT FROM NEW.token_hash)
    EXECUTE FUNCTION identity.notify_token_changed();

-- A revoked token notified when it was revoked: pruning it says nothing new.
CREATE OR REPLACE TRIGGER tokens_notify_deleted
    AFTER DELETE ON identity.tokens
    FOR EACH ROW
    WHEN (OLD.revoked_at IS NULL)
    EXECUTE FUNCTION identity.notify_token_changed();

CREATE OR REPLACE TRIGGER users_notify_changed
    AFTER UPDATE OF status, role, password_hash ON identity.users
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.role IS DISTINCT FROM NEW.role
          OR OLD.password_hash IS DISTINCT FROM NEW.password_hash)
    EXECUTE FUNCTION identity.notify_user_changed();

CREATE OR REPLACE TRIGGER users_notify_deleted
    AFTER DELETE ON identity.users
    FOR EACH ROW
    EXECUTE FUNCTION identity.notify_user_changed();
