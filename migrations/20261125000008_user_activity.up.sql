-- When each user was last seen by the API, at a resolution of an hour: the source of the
-- daily-active-users gauge (a stage trigger). The API batches what it saw in memory and
-- writes it here once a minute, so a request costs no write.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS identity.user_activity (
    user_id uuid PRIMARY KEY REFERENCES identity.users (id),
    last_active_at timestamptz NOT NULL
);
-- The gauge counts the rows of the last 24 hours: an index range scan.
CREATE INDEX IF NOT EXISTS user_activity_last_active_at_idx ON identity.user_activity (last_active_at);
