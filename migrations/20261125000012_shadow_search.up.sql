-- The search projector's shadow candidate: while `search.executor` says `shadow`, the
-- candidate side projects its own copy of the events into these tables, never into `search.*`.
-- Documents keep only what a search query reads of `search.directory` / `search.contacts`, as JSON
-- (NULL: the document does not exist, e.g. a removed contact), and what the comparer needs to compare
-- each version with the read model's document on the same input (docs/workers/search-projector.md).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS shadow.search_directory (
    user_id uuid PRIMARY KEY,
    -- the candidate's directory document; NULL when the user does not exist
    document jsonb,
    -- the stream sequence of the last event that made the candidate re-read this document
    through_sequence bigint NOT NULL,
    -- one more at every re-read by the candidate
    version bigint NOT NULL DEFAULT 1,
    -- the last version the comparer settled (compared, recorded missing, or dropped)
    settled_version bigint NOT NULL DEFAULT 0,
    written_at timestamptz NOT NULL DEFAULT now()
);
-- The comparer's work list: versions not settled yet.
CREATE INDEX IF NOT EXISTS search_directory_unsettled_idx
    ON shadow.search_directory (through_sequence) WHERE version > settled_version;

CREATE TABLE IF NOT EXISTS shadow.search_contacts (
    owner_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    -- the candidate's contact document; NULL when the owner no longer has this contact
    document jsonb,
    through_sequence bigint NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    settled_version bigint NOT NULL DEFAULT 0,
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, contact_id)
);
CREATE INDEX IF NOT EXISTS search_contacts_unsettled_idx
    ON shadow.search_contacts (through_sequence) WHERE version > settled_version;

-- The candidate's own checkpoint: the newest event it applied (time and stream sequence).
CREATE TABLE IF NOT EXISTS shadow.search_checkpoint (
    id smallint PRIMARY KEY CONSTRAINT search_checkpoint_single_row CHECK (id = 1),
    last_event_at timestamptz,
    last_stream_sequence bigint,
    updated_at timestamptz
);
INSERT INTO shadow.search_checkpoint (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
