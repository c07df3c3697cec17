-- Foundation: one schema per domain and the core tables (docs/design/contracts.md §2).
-- Every table here is new, so the indexes are built inside this migration's transaction.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE SCHEMA IF NOT EXISTS identity;
CREATE SCHEMA IF NOT EXISTS contacts;
CREATE SCHEMA IF NOT EXISTS circles;
CREATE SCHEMA IF NOT EXISTS security;
CREATE SCHEMA IF NOT EXISTS score;
CREATE SCHEMA IF NOT EXISTS search;
CREATE SCHEMA IF NOT EXISTS ops;

CREATE TABLE IF NOT EXISTS identity.users (
    id uuid PRIMARY KEY,
    -- stored lower-case; unique case-insensitively by construction
    handle text NOT NULL CONSTRAINT users_handle_key UNIQUE,
    display_name text NOT NULL,
    email text NOT NULL CONSTRAINT users_email_key UNIQUE,
    password_hash text NOT NULL,
    role text NOT NULL DEFAULT 'user' CONSTRAINT users_role_check CHECK (role IN ('user', 'moderator', 'admin')),
    status text NOT NULL DEFAULT 'active' CONSTRAINT users_status_check CHECK (status IN ('active', 'suspended')),
    verified boolean NOT NULL DEFAULT false,
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS identity.tokens (
    -- SHA-256 of the bearer token; the token itself is never stored
    token_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES identity.users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX IF NOT EXISTS tokens_user_id_idx ON identity.tokens (user_id);

CREATE TABLE IF NOT EXISTS contacts.contacts (
    owner_id uuid NOT NULL REFERENCES identity.users (id),
    contact_id uuid NOT NULL REFERENCES identity.users (id),
    label text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, contact_id),
    CONSTRAINT contacts_not_self CHECK (owner_id <> contact_id)
);
CREATE INDEX IF NOT EXISTS contacts_contact_id_idx ON contacts.contacts (contact_id);

CREATE TABLE IF NOT EXISTS circles.circles (
    id uuid PRIMARY KEY,
    owner_id uuid NOT NULL REFERENCES identity.users (id),
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS circles_owner_name_key ON circles.circles (owner_id, lower(name));

CREATE TABLE IF NOT EXISTS circles.members (
    circle_id uuid NOT NULL REFERENCES circles.circles (id) ON DELETE CASCADE,
    owner_id uuid NOT NULL,
    user_id uuid NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (circle_id, user_id),
    -- a member must be one of the owner's contacts; removing the contact removes the membership
    CONSTRAINT members_contact_fkey FOREIGN KEY (owner_id, user_id)
        REFERENCES contacts.contacts (owner_id, contact_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS members_owner_user_idx ON circles.members (owner_id, user_id);

CREATE TABLE IF NOT EXISTS security.disputes (
    id uuid PRIMARY KEY,
    reporter_id uuid NOT NULL REFERENCES identity.users (id),
    target_id uuid NOT NULL REFERENCES identity.users (id),
    kind text NOT NULL CONSTRAINT disputes_kind_check
        CHECK (kind IN ('impersonation', 'harassment', 'spam', 'incorrect_info')),
    -- 0 = P0 (most urgent) … 3 = P3
    priority smallint NOT NULL CONSTRAINT disputes_priority_check CHECK (priority BETWEEN 0 AND 3),
    status text NOT NULL DEFAULT 'pending' CONSTRAINT disputes_status_check
        CHECK (status IN ('pending', 'upheld', 'dismissed', 'needs_review')),
    description text NOT NULL,
    evidence text,
    decision_rule text,
    decision_reasons jsonb,
    rules_version text,
    decided_by uuid REFERENCES identity.users (id),
    decision_note text,
    decided_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT disputes_not_self CHECK (reporter_id <> target_id)
);
CREATE INDEX IF NOT EXISTS disputes_reporter_idx ON security.disputes (reporter_id, id);
CREATE INDEX IF NOT EXISTS disputes_target_kind_idx ON security.disputes (target_id, kind, created_at);
CREATE INDEX IF NOT EXISTS disputes_queue_idx ON security.disputes (status, priority, created_at, id);

-- users hidden from directory search by an upheld spam dispute
CREATE TABLE IF NOT EXISTS security.hidden_users (
    user_id uuid PRIMARY KEY REFERENCES identity.users (id),
    dispute_id uuid NOT NULL REFERENCES security.disputes (id),
    hidden_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS score.runs (
    id uuid PRIMARY KEY,
    trigger text NOT NULL,
    requested_by uuid,
    status text NOT NULL,
    host text,
    users bigint,
    edges bigint,
    iterations integer,
    residual double precision,
    scores_changed bigint,
    load_ms bigint,
    compute_ms bigint,
    write_ms bigint,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
);

-- A derived read model, rewritten a million rows at a time by the score orchestrator, which
-- keeps it consistent itself (only active users, removed when they are not): no foreign keys,
-- whose per-row checks would double the write phase.
CREATE TABLE IF NOT EXISTS score.user_scores (
    user_id uuid PRIMARY KEY,
    trust double precision NOT NULL,
    score integer NOT NULL CONSTRAINT user_scores_score_check CHECK (score BETWEEN 0 AND 1000),
    run_id uuid NOT NULL,
    computed_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS ops.outbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the event id; also the Nats-Msg-Id, so JetStream drops a re-sent duplicate
    id uuid NOT NULL CONSTRAINT outbox_id_key UNIQUE,
    subject text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
-- the relay's work list: small, because published rows leave it
CREATE INDEX IF NOT EXISTS outbox_unpublished_idx ON ops.outbox (seq) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_published_at_idx ON ops.outbox (published_at) WHERE published_at IS NOT NULL;

-- Wakes relays on commit; polling remains the fallback when a notification is missed.
CREATE OR REPLACE FUNCTION ops.notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trellis_outbox', '');
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER outbox_notify AFTER INSERT ON ops.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION ops.notify_outbox();

CREATE TABLE IF NOT EXISTS ops.idempotency_keys (
    -- the caller: a user id, or 'anonymous' for unauthenticated requests
    principal text NOT NULL,
    key text NOT NULL,
    method text NOT NULL,
    path text NOT NULL,
    -- SHA-256 over method, path and body: the same key with another request is a 422
    request_hash bytea NOT NULL,
    -- NULL while the first request is still being processed
    status smallint,
    response_headers jsonb,
    response_body bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (principal, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at_idx ON ops.idempotency_keys (expires_at);
