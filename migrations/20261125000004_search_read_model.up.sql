-- The search read model, kept fresh by the search projector from change events.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- Trigram indexes make name search tolerant of a typo.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- One document per user.
CREATE TABLE IF NOT EXISTS search.directory (
    user_id uuid PRIMARY KEY,
    handle text NOT NULL,
    display_name text NOT NULL,
    verified boolean NOT NULL,
    score integer,
    -- active | suspended
    status text NOT NULL,
    -- set when a spam dispute against the user is upheld
    hidden boolean NOT NULL DEFAULT false,
    projected_at timestamptz NOT NULL DEFAULT now()
);
-- Exact handle and handle prefix (byte order, so LIKE 'q%' can use it).
CREATE INDEX IF NOT EXISTS directory_handle_idx ON search.directory (handle text_pattern_ops);
-- Typo-tolerant name search.
CREATE INDEX IF NOT EXISTS directory_display_name_trgm_idx ON search.directory USING gin (lower(display_name) gin_trgm_ops);

-- Per owner: each contact with the owner's label and the names of the owner's circles they are in.
CREATE TABLE IF NOT EXISTS search.contacts (
    owner_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    handle text NOT NULL,
    display_name text NOT NULL,
    label text NOT NULL,
    circles text[] NOT NULL DEFAULT '{}',
    -- handle, display name, label and circle names, lower-cased: what contact search matches
    search_text text NOT NULL,
    projected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, contact_id)
);
CREATE INDEX IF NOT EXISTS contacts_search_text_trgm_idx ON search.contacts USING gin (search_text gin_trgm_ops);

-- Where the projection stands: the last applied event's time and stream sequence.
CREATE TABLE IF NOT EXISTS search.checkpoint (
    id smallint PRIMARY KEY CONSTRAINT checkpoint_single_row CHECK (id = 1),
    last_event_at timestamptz,
    last_stream_sequence bigint,
    updated_at timestamptz
);
INSERT INTO search.checkpoint (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
