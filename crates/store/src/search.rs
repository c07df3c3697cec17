//! User search over the base tables (`identity.users` and the scores).

use sqlx::{PgConnection, PgExecutor, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserHit {
    pub id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub verified: bool,
    pub score: Option<i32>,
    /// 0 exact handle, 1 handle prefix, 2 name match.
    pub rank: i32,
}

/// Searchable users of the base tables: active and not hidden.
const BASE_USERS: &str = "SELECT u.id, u.handle, u.display_name, u.verified, s.score
    FROM identity.users u LEFT JOIN score.user_scores s ON s.user_id = u.id
    WHERE u.status = 'active' AND NOT EXISTS (SELECT 1 FROM security.hidden_users h WHERE h.user_id = u.id)";

/// The same users in the read model, which the search projector keeps.
const INDEXED_USERS: &str = "SELECT d.user_id AS id, d.handle, d.display_name, d.verified, d.score
    FROM search.directory d WHERE d.status = 'active' AND NOT d.hidden";

/// Where a user search reads its documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Documents {
    /// The base tables (the fallback when the read model lags).
    Base,
    /// The search read model.
    Index,
}

/// Active, not hidden users matching `q`, in rank order, from `offset`, at most `limit`:
/// 1. the exact handle;
/// 2. handles starting with `q`;
/// 3. display names whose words match every word of `q` (words of 2 characters or more): a
///    name word matches a query word that is its prefix or, from 3 characters and when neither
///    has a digit, within one edit of it (substitution, insertion, deletion or adjacent
///    transposition);
///
/// and higher score first (unscored last), then handle, within each. A user appears once, in
/// the first tier they match. Both [`Documents`] go through the same tiers and the same term
/// expansion, so they differ only in freshness.
///
/// **Cost.** Every tier reads at most `offset + limit` documents in rank order rather than
/// every match: the name tier reads `offset + limit` postings per expanded word from
/// `search.name_postings` (kept in score order); the handle tier either walks the score-ordered
/// `directory_rank_idx` until enough handles match (a common prefix) or range-scans the handle
/// index and sorts the few (a rare one), as the planner's histogram of handles decides. Over
/// [`Documents::Base`] the tiers scan the base tables: that is the fallback's price.
pub async fn users(
    pool: &PgPool,
    documents: Documents,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<UserHit>, sqlx::Error> {
    let need = offset.saturating_add(limit);
    let mut conn = pool.acquire().await?;
    let lowered = q.to_lowercase();
    let prefix = format!("{}%", escape_like(&lowered));
    let source = match documents {
        Documents::Base => BASE_USERS,
        Documents::Index => INDEXED_USERS,
    };
    // The exact handle, then the best `need` other handles with the prefix. The inner LIMIT
    // reads only ids, scores and handles, so the planner can walk the score order index-only
    // and stop early; the full documents are fetched for `need + 1` rows.
    let mut hits: Vec<UserHit> = sqlx::query_as(&format!(
        "SELECT c.id, c.handle, c.display_name, c.verified, c.score, CASE WHEN c.handle = $1 THEN 0 ELSE 1 END AS rank
         FROM ((SELECT e.id FROM ({source}) e WHERE e.handle = $1)
               UNION ALL
               (SELECT p.id FROM ({source}) p WHERE p.handle LIKE $2 AND p.handle <> $1
                ORDER BY p.score DESC NULLS LAST, p.handle LIMIT $3)) best
         JOIN ({source}) c ON c.id = best.id
         ORDER BY rank, c.score DESC NULLS LAST, c.handle LIMIT $3"
    ))
    // Planned for each query's own prefix: a cached generic plan knows no prefix, so it walks
    // the score order for every one, and a rare prefix then reads the whole index (300 ms).
    .persistent(false)
    .bind(&lowered)
    .bind(&prefix)
    .bind(need)
    .fetch_all(&mut *conn)
    .await?;
    if (hits.len() as i64) < need {
        let rest = need - hits.len() as i64;
        hits.extend(match documents {
            Documents::Index => indexed_name_matches(&mut conn, q, &prefix, rest).await?,
            Documents::Base => base_name_matches(&mut conn, q, &prefix, rest).await?,
        });
    }
    Ok(hits.into_iter().skip(usize::try_from(offset).unwrap_or(usize::MAX)).collect())
}

/// Handle-prefix matches the handle tier range-scans at most: up to this many it sorts them by
/// score; past it, the prefix is common enough that walking the score order finds the best
/// `offset + limit` of them within about `limit × documents ÷ HANDLE_RANGE_CAP` entries.
pub const HANDLE_RANGE_CAP: i64 = 2000;

/// [`users`] over the read model in one statement that also authenticates the caller: `None`
/// when `token_hash` is not a live token of an active user, else the caller's id and the hits (the
/// same tiers, order and expansion as [`users`]). `handle_range_cap` is [`HANDLE_RANGE_CAP`]
/// but in tests, which lower it to take the score-order walk with a few documents.
///
/// One statement with a plan that does not depend on the query text (the function runs it with
/// its generic plan: planning it for each text cost more than running it): the handle tier
/// counts at most [`HANDLE_RANGE_CAP`]` + 1` matches of the prefix in the handle index and
/// sorts them when there are no more, else walks the score-ordered `directory_rank_idx`, so
/// neither a rare nor a common prefix reads more than its bound whatever the planner
/// estimates; the name tier runs only when the handle tier leaves room, and reads the best
/// `offset + limit` postings of each expansion of the query word with the fewest expansions.
pub async fn indexed_users_for_token(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    idle_timeout: std::time::Duration,
    q: &str,
    offset: i64,
    limit: i64,
    handle_range_cap: i64,
) -> Result<Option<(Uuid, Vec<UserHit>)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        principal_id: Uuid,
        id: Option<Uuid>,
        handle: Option<String>,
        display_name: Option<String>,
        verified: Option<bool>,
        score: Option<i32>,
        rank: Option<i32>,
    }
    let need = offset.saturating_add(limit);
    // The statement is `search.find_users` (migration `20261206000901_search_find_users`): a
    // function, so that it runs with the generic plan every time.
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT principal_id, id, handle, display_name, verified, score, rank
         FROM search.find_users($1, $2, $3, $4, $5, $6)",
    )
    .bind(token_hash)
    .bind(idle_timeout)
    .bind(q.to_lowercase())
    .bind(q)
    .bind(need)
    .bind(handle_range_cap)
    .fetch_all(db)
    .await?;
    let Some(first) = rows.first() else { return Ok(None) };
    let caller = first.principal_id;
    let hits = rows
        .into_iter()
        .filter_map(|r| {
            Some(UserHit {
                id: r.id?,
                handle: r.handle?,
                display_name: r.display_name?,
                verified: r.verified?,
                score: r.score,
                rank: r.rank?,
            })
        })
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        .collect();
    Ok(Some((caller, hits)))
}

/// The words of `$1` that name search matches (as `search.name_words` splits a display name,
/// 2 characters or more), numbered from 1.
const QUERY_WORDS: &str = "SELECT t.word, t.i FROM unnest(search.name_words($1)) WITH ORDINALITY AS t (word, i)
    WHERE char_length(t.word) >= 2";

/// A query word matches a name word that it is a prefix of or, from 3 characters and when
/// neither has a digit (a number one digit off is another number), that is within one edit of
/// it: over the base tables, this predicate on every document.
const WORD_MATCHES: &str = "starts_with(w, t.word)
    OR (char_length(t.word) >= 3 AND t.word !~ '[0-9]' AND w !~ '[0-9]' AND search.within_one_edit(w, t.word))";

/// The name tier over the base tables: every document's words are matched against the words
/// of `q` (none: no name matches).
async fn base_name_matches(
    conn: &mut PgConnection,
    q: &str,
    handle_prefix: &str,
    limit: i64,
) -> Result<Vec<UserHit>, sqlx::Error> {
    sqlx::query_as(&format!(
        "WITH t AS ({QUERY_WORDS})
         SELECT c.id, c.handle, c.display_name, c.verified, c.score, 2 AS rank
         FROM ({BASE_USERS}) c
         WHERE EXISTS (SELECT 1 FROM t) AND c.handle NOT LIKE $2
           AND NOT EXISTS (SELECT 1 FROM t
                           WHERE NOT EXISTS (SELECT 1 FROM unnest(search.name_words(c.display_name)) w
                                             WHERE char_length(w) >= 2 AND ({WORD_MATCHES})))
         ORDER BY c.score DESC NULLS LAST, c.handle LIMIT $3"
    ))
    .bind(q)
    .bind(handle_prefix)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
}

/// The name tier over the read model. Each query word is first expanded to the indexed name
/// words it matches (the same match as [`WORD_MATCHES`], found through `search.name_terms` by
/// prefix and `search.name_term_variants` by one-deletion keys); the word with the fewest
/// expansions then drives a read of the best `limit` postings of each of its expansions, and
/// the other words filter inside that read.
async fn indexed_name_matches(
    conn: &mut PgConnection,
    q: &str,
    handle_prefix: &str,
    limit: i64,
) -> Result<Vec<UserHit>, sqlx::Error> {
    // One row per query word (no term), then one per expansion: by prefix (a range of the
    // byte-ordered dictionary) and by one-deletion keys checked with `search.within_one_edit`.
    let rows: Vec<(i64, Option<String>)> = sqlx::query_as(&format!(
        "WITH t AS ({QUERY_WORDS}),
         keys AS (
             SELECT t.i, t.word, t.word AS variant FROM t WHERE char_length(t.word) >= 3 AND t.word !~ '[0-9]'
             UNION
             SELECT t.i, t.word, left(t.word, g - 1) || substr(t.word, g + 1)
             FROM t, generate_series(1, char_length(t.word)) g
             WHERE char_length(t.word) >= 3 AND t.word !~ '[0-9]')
         SELECT t.i, NULL::text FROM t
         UNION ALL
         SELECT t.i, n.term::text
         FROM t, LATERAL (SELECT term FROM search.name_terms
                          WHERE term >= t.word COLLATE \"C\" AND term < (t.word || chr(1114111)) COLLATE \"C\"
                            AND starts_with(term, t.word)) n
         UNION ALL
         SELECT k.i, v.term::text
         FROM keys k JOIN search.name_term_variants v ON v.variant = k.variant COLLATE \"C\"
         WHERE search.within_one_edit(v.term, k.word)"
    ))
    .bind(q)
    .fetch_all(&mut *conn)
    .await?;
    let mut by_word: std::collections::BTreeMap<i64, Vec<String>> = std::collections::BTreeMap::new();
    for (i, term) in rows {
        let terms = by_word.entry(i).or_default();
        terms.extend(term);
    }
    if by_word.is_empty() {
        return Ok(Vec::new());
    }
    let mut expansions: Vec<Vec<String>> = by_word.into_values().collect();
    for terms in &mut expansions {
        terms.sort_unstable();
        terms.dedup();
    }
    if expansions.iter().any(Vec::is_empty) {
        return Ok(Vec::new());
    }
    expansions.sort_by_key(Vec::len);
    let (driving, others) = expansions.split_first().expect("at least one word");
    // Per expansion of the driving word, its best `limit` postings: a user among the overall
    // best `limit` is among the best `limit` of every word they match, so the union holds the
    // answer. Every other query word must have one of its expansions among the user's words.
    sqlx::query_as(
        "SELECT d.user_id AS id, d.handle, d.display_name, d.verified, d.score, 2 AS rank
         FROM (SELECT DISTINCT p.user_id
               FROM unnest($1::text[]) AS t (term),
                    LATERAL (SELECT p.user_id FROM search.name_postings p
                             WHERE p.term = t.term AND p.handle NOT LIKE $2
                               AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements($4::jsonb) o (terms)
                                               WHERE NOT (p.words && ARRAY(SELECT jsonb_array_elements_text(o.terms))))
                             ORDER BY p.score DESC NULLS LAST, p.handle LIMIT $3) p) best
         JOIN search.directory d ON d.user_id = best.user_id
         ORDER BY d.score DESC NULLS LAST, d.handle LIMIT $3",
    )
    .bind(driving)
    .bind(handle_prefix)
    .bind(limit)
    .bind(serde_json::to_value(others).expect("strings serialise"))
    .fetch_all(&mut *conn)
    .await
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// What decides between the read model and the base tables.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Freshness {
    /// `occurred_at` of the newest event the projection applied.
    pub last_event_at: Option<OffsetDateTime>,
    /// When the projection last applied anything.
    pub checkpoint_updated_at: Option<OffsetDateTime>,
    /// `occurred_at` of the newest event written (the outbox is the record of every event).
    pub newest_event_at: Option<OffsetDateTime>,
    pub directory_empty: bool,
    pub users_exist: bool,
}

pub async fn freshness(db: impl PgExecutor<'_>) -> Result<Freshness, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.last_event_at, c.updated_at AS checkpoint_updated_at,
                (SELECT created_at FROM ops.outbox ORDER BY seq DESC LIMIT 1) AS newest_event_at,
                NOT EXISTS (SELECT 1 FROM search.directory) AS directory_empty,
                EXISTS (SELECT 1 FROM identity.users) AS users_exist
         FROM search.checkpoint c WHERE c.id = 1",
    )
    .fetch_one(db)
    .await
}

impl Freshness {
    /// How far the projection is behind the newest event (zero when it has applied it).
    pub fn lag(&self) -> time::Duration {
        match (self.newest_event_at, self.last_event_at) {
            (None, _) => time::Duration::ZERO,
            (Some(_), None) => time::Duration::MAX,
            (Some(newest), Some(applied)) => (newest - applied).max(time::Duration::ZERO),
        }
    }

    /// Whether search should answer from the read model.
    pub fn index_usable(&self, max_lag: std::time::Duration) -> bool {
        !(self.directory_empty && self.users_exist) && self.lag() <= max_lag
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ContactHit {
    pub contact_id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub label: String,
    pub circles: Vec<String>,
}

/// One owner's contact documents in the read model.
const INDEXED_CONTACTS: &str = "SELECT contact_id, handle, display_name, label, circles, search_text
    FROM search.contacts WHERE owner_id = $1";

/// The same documents built from the base tables.
const BASE_CONTACTS: &str = "SELECT x.*,
        lower(x.handle || ' ' || x.display_name || ' ' || x.label || ' ' || array_to_string(x.circles, ' ')) AS search_text
    FROM (SELECT c.contact_id, u.handle, u.display_name, c.label,
                 COALESCE(array_agg(ci.name ORDER BY ci.name) FILTER (WHERE ci.name IS NOT NULL), '{}') AS circles
          FROM contacts.contacts c JOIN identity.users u ON u.id = c.contact_id
          LEFT JOIN circles.members m ON m.owner_id = c.owner_id AND m.user_id = c.contact_id
          LEFT JOIN circles.circles ci ON ci.id = m.circle_id
          WHERE c.owner_id = $1
          GROUP BY c.contact_id, u.handle, u.display_name, c.label) x";

/// The owner's contacts whose handle, name, label or circle names contain `q`, from the read model.
pub async fn index_contacts(
    db: impl PgExecutor<'_>,
    owner: Uuid,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<ContactHit>, sqlx::Error> {
    matching_contacts(db, INDEXED_CONTACTS, owner, q, offset, limit).await
}

/// The same over the base tables.
pub async fn contacts(
    db: impl PgExecutor<'_>,
    owner: Uuid,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<ContactHit>, sqlx::Error> {
    matching_contacts(db, BASE_CONTACTS, owner, q, offset, limit).await
}

async fn matching_contacts(
    db: impl PgExecutor<'_>,
    documents: &str,
    owner: Uuid,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<ContactHit>, sqlx::Error> {
    let contains = format!("%{}%", escape_like(&q.to_lowercase()));
    sqlx::query_as(&format!(
        "SELECT d.contact_id, d.handle, d.display_name, d.label, d.circles FROM ({documents}) d
         WHERE d.search_text LIKE $2 ORDER BY d.handle OFFSET $3 LIMIT $4"
    ))
    .bind(owner)
    .bind(&contains)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await
}
