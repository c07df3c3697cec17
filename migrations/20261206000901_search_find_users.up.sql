-- User search over the read model in one statement that also authenticates the caller, as a
-- function so that its plan is the generic one on every call: the statement's plan does not
-- depend on the query text (each tier reads a bounded number of entries whatever the
-- planner estimates), but prepared from the client the plan cache keeps planning it anew for
-- every text (a custom plan looks cheaper), and planning it costs more than running it.
-- `trellis_store::search::indexed_users_for_token` documents the tiers and their bounds.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE OR REPLACE FUNCTION search.find_users(
    p_token_hash bytea, p_idle_timeout interval, p_handle text, p_query text, p_need bigint,
    p_handle_range_cap bigint)
RETURNS TABLE (principal_id uuid, id uuid, handle text, display_name text, verified boolean, score integer,
               rank integer)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
-- A parallel worker takes milliseconds to start, which this query would wait for even when the
-- branch it was started for does not run.
SET max_parallel_workers_per_gather = 0
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH p AS (SELECT u.id AS principal_id
                       FROM identity.tokens t JOIN identity.users u ON u.id = t.user_id
                       WHERE t.token_hash = p_token_hash AND t.revoked_at IS NULL AND t.expires_at > now() AND t.last_used_at > now() - p_idle_timeout AND u.status = 'active'),
            -- How many documents have the prefix, counted up to the cap in the handle index
            -- alone (hidden and inactive ones too: this only chooses how to read the best).
            prefixed AS (SELECT count(*) AS n FROM (
                SELECT FROM search.directory d WHERE d.handle ~>=~ p_handle AND d.handle ~<~ (p_handle || chr(1114111))
                -- In the index's order, so that the scan stops at the cap (a bitmap scan would not).
                ORDER BY d.handle USING ~<~ LIMIT p_handle_range_cap + 1) x),
            handle_hits AS MATERIALIZED (
                (SELECT d.user_id, d.score, d.handle FROM search.directory d
                 WHERE (SELECT n FROM prefixed) <= p_handle_range_cap AND d.handle ~>=~ p_handle AND d.handle ~<~ (p_handle || chr(1114111))
                   AND d.status = 'active' AND NOT d.hidden
                 ORDER BY d.handle = p_handle DESC, d.score DESC NULLS LAST, d.handle LIMIT p_need)
                UNION ALL
                (SELECT d.user_id, d.score, d.handle FROM search.directory d
                 WHERE (SELECT n FROM prefixed) > p_handle_range_cap AND d.handle = p_handle AND d.status = 'active' AND NOT d.hidden)
                UNION ALL
                -- `left(...) = p_handle` is no index condition: this walks the score order.
                (SELECT d.user_id, d.score, d.handle FROM search.directory d
                 WHERE (SELECT n FROM prefixed) > p_handle_range_cap AND d.status = 'active' AND NOT d.hidden
                   AND left(d.handle, char_length(p_handle)) = p_handle AND d.handle <> p_handle
                 ORDER BY d.score DESC NULLS LAST, d.handle LIMIT p_need)),
            t AS (SELECT t.word, t.i FROM unnest(search.name_words(p_query)) WITH ORDINALITY AS t (word, i)
                  WHERE char_length(t.word) >= 2 AND (SELECT count(*) FROM handle_hits) < p_need),
            keys AS (
                SELECT t.i, t.word, t.word AS variant FROM t WHERE char_length(t.word) >= 3 AND t.word !~ '[0-9]'
                UNION
                SELECT t.i, t.word, left(t.word, g - 1) || substr(t.word, g + 1)
                FROM t, generate_series(1, char_length(t.word)) g
                WHERE char_length(t.word) >= 3 AND t.word !~ '[0-9]'),
            expansions AS MATERIALIZED (
                SELECT t.i, n.term::text AS term
                FROM t, LATERAL (SELECT term FROM search.name_terms
                                 WHERE term >= t.word COLLATE "C" AND term < (t.word || chr(1114111)) COLLATE "C"
                                   AND starts_with(term, t.word)) n
                UNION
                SELECT k.i, v.term::text
                FROM keys k JOIN search.name_term_variants v ON v.variant = k.variant COLLATE "C"
                WHERE search.within_one_edit(v.term, k.word)),
            per_word AS (SELECT t.i, array_remove(array_agg(e.term), NULL) AS terms
                         FROM t LEFT JOIN expansions e ON e.i = t.i GROUP BY t.i),
            driving AS (SELECT w.i FROM per_word w
                        WHERE NOT EXISTS (SELECT 1 FROM per_word z WHERE cardinality(z.terms) = 0)
                        ORDER BY cardinality(w.terms), w.i LIMIT 1),
            name_hits AS (
                SELECT DISTINCT m.user_id
                FROM driving dw JOIN expansions e ON e.i = dw.i,
                     LATERAL (SELECT p.user_id FROM search.name_postings p
                              WHERE p.term = e.term AND NOT starts_with(p.handle, p_handle)
                                AND NOT EXISTS (SELECT 1 FROM per_word o
                                                WHERE o.i <> dw.i AND NOT (p.words && o.terms))
                              ORDER BY p.score DESC NULLS LAST, p.handle LIMIT p_need) m),
            hits AS (
                SELECT d.user_id AS id, d.handle, d.display_name, d.verified, d.score,
                       CASE WHEN d.handle = p_handle THEN 0 ELSE 1 END AS rank
                FROM handle_hits h JOIN search.directory d ON d.user_id = h.user_id
                UNION ALL
                SELECT d.user_id, d.handle, d.display_name, d.verified, d.score, 2
                FROM name_hits n JOIN search.directory d ON d.user_id = n.user_id)
            SELECT p.principal_id, h.id, h.handle, h.display_name, h.verified, h.score, h.rank
            FROM p LEFT JOIN LATERAL (SELECT * FROM hits ORDER BY rank, score DESC NULLS LAST, handle LIMIT p_need) h ON true
            ORDER BY h.rank, h.score DESC NULLS LAST, h.handle;
END;
$$;
