-- Name search that never visits every match: an inverted index of name words whose postings
-- are kept in score order, so the best `k` documents of a word are the first `k` index
-- entries. Full-text and trigram GIN indexes find matches but cannot return them in score
-- order: a ranked query over them sorts every match (885 ms at p99 for a common first name
-- over 1,000,000 users). See docs/BENCHMARKS.md and crates/store/src/search.rs.
SET lock_timeout = '5s';
SET statement_timeout = '10min';

-- The words of a display name, as name search matches them: lower-cased, split on anything
-- that is not a letter or digit. The API tokenises queries with the same function.
CREATE OR REPLACE FUNCTION search.name_words(name text) RETURNS text[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN array_remove(regexp_split_to_array(lower(name), '[^[:alnum:]]+'), '');

-- Whether two words are at most one edit apart: a substitution, an insertion, a deletion or a
-- swap of two adjacent characters (optimal string alignment distance ≤ 1).
CREATE OR REPLACE FUNCTION search.within_one_edit(a text, b text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    la integer := char_length(a);
    lb integer := char_length(b);
    i integer := 1;
BEGIN
    IF a = b THEN
        RETURN true;
    END IF;
    IF abs(la - lb) > 1 THEN
        RETURN false;
    END IF;
    -- i: the first position where the words differ.
    WHILE i <= least(la, lb) AND substr(a, i, 1) = substr(b, i, 1) LOOP
        i := i + 1;
    END LOOP;
    IF la = lb THEN
        RETURN substr(a, i + 1) = substr(b, i + 1)
            OR (substr(a, i, 1) = substr(b, i + 1, 1) AND substr(a, i + 1, 1) = substr(b, i, 1)
                AND substr(a, i + 2) = substr(b, i + 2));
    ELSIF la > lb THEN
        RETURN substr(a, i + 1) = substr(b, i);
    ELSE
        RETURN substr(a, i) = substr(b, i + 1);
    END IF;
END
$$;

-- One posting per (searchable user, word of their display name): active and not hidden
-- users only. `words` (all the document's words) lets a query of several words filter inside
-- the index. Byte order ("C") so that prefixes can range-scan.
CREATE TABLE IF NOT EXISTS search.name_postings (
    term text COLLATE "C" NOT NULL,
    user_id uuid NOT NULL,
    score integer,
    handle text NOT NULL,
    words text[] NOT NULL,
    PRIMARY KEY (term, user_id)
);
-- A word's documents best first: what ranked name search reads, `k` entries per word.
CREATE INDEX IF NOT EXISTS name_postings_rank_idx
    ON search.name_postings (term, score DESC NULLS LAST, handle) INCLUDE (user_id, words);
-- What the projection replaces when a document changes.
CREATE INDEX IF NOT EXISTS name_postings_user_idx ON search.name_postings (user_id);

-- Every word ever indexed (insert-only: a word without postings only costs a lookup), for
-- prefix expansion of a query word.
CREATE TABLE IF NOT EXISTS search.name_terms (
    term text COLLATE "C" PRIMARY KEY
);
-- Typo tolerance (one edit) for words without digits (a number one digit off is another
-- number): each word under itself and every one-character deletion of it.
-- Two words within one edit (substitution, insertion, deletion or adjacent transposition)
-- share a key, so a query word's own keys find every candidate; the API keeps those truly
-- within one edit.
CREATE TABLE IF NOT EXISTS search.name_term_variants (
    variant text COLLATE "C" NOT NULL,
    term text COLLATE "C" NOT NULL,
    PRIMARY KEY (variant, term)
);

-- Postings and terms of the documents projected so far.
INSERT INTO search.name_postings (term, user_id, score, handle, words)
SELECT DISTINCT w.term, d.user_id, d.score, d.handle, search.name_words(d.display_name)
FROM search.directory d, unnest(search.name_words(d.display_name)) AS w (term)
WHERE d.status = 'active' AND NOT d.hidden AND char_length(w.term) >= 2
ON CONFLICT (term, user_id) DO NOTHING;
INSERT INTO search.name_terms (term) SELECT DISTINCT term FROM search.name_postings ON CONFLICT (term) DO NOTHING;
INSERT INTO search.name_term_variants (variant, term)
SELECT DISTINCT v.variant, t.term
FROM search.name_terms t,
     LATERAL (SELECT t.term AS variant
              UNION
              SELECT left(t.term, i - 1) || substr(t.term, i + 1) FROM generate_series(1, char_length(t.term)) i) v
WHERE t.term !~ '[0-9]'
ON CONFLICT (variant, term) DO NOTHING;

-- search.directory is the projector's own read model: these two statements block only its
-- writes (the projection pauses; search keeps answering from the table), for the seconds an
-- index build over the directory takes. sqlx runs a migration as one multi-statement query, in
-- which PostgreSQL refuses CONCURRENTLY even with `-- no-transaction`.
-- Name search no longer reads the trigram index (contact search keeps its own).
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX IF EXISTS search.directory_display_name_trgm_idx;
-- The handle-prefix tier, best first: a common prefix reads this in score order (index only)
-- and stops after `k` matches; a rare one range-scans `directory_handle_idx` and sorts the few.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS directory_rank_idx
    ON search.directory (score DESC NULLS LAST, handle) INCLUDE (user_id) WHERE status = 'active' AND NOT hidden;
