SET lock_timeout = '5s';
SET statement_timeout = '10min';

-- squawk-ignore require-concurrent-index-deletion
DROP INDEX IF EXISTS search.directory_rank_idx;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS directory_display_name_trgm_idx
    ON search.directory USING gin (lower(display_name) gin_trgm_ops);
DROP TABLE IF EXISTS search.name_term_variants;
DROP TABLE IF EXISTS search.name_terms;
DROP TABLE IF EXISTS search.name_postings;
DROP FUNCTION IF EXISTS search.within_one_edit(text, text);
DROP FUNCTION IF EXISTS search.name_words(text);
