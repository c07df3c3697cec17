//! The search read model (`search.directory`, `search.contacts`, `search.checkpoint`): the
//! set-based projection that the search projector and `trellisctl search rebuild` share.
//!
//! Every function re-reads the *current* state of the documents it is given from the base
//! tables, so applying it for an event is idempotent and the order of events does not matter:
//! an event only says "this document is dirty".
//!
//! Concurrent projections of the same document (several replicas, a rebuild while the
//! projector runs) are serialised by transaction-level advisory locks taken by [`lock`] before
//! anything is read: without them, a transaction that read an older state could commit its
//! upsert after one that read a newer state and leave the stale document behind.

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use trellis_domain::identity::UserStatus;
use uuid::Uuid;

/// The advisory lock class of search documents (first key of the two-key form).
const LOCK_CLASS: i32 = 0x5EA4;
/// Lock slots per document kind: bounds the locks one transaction holds (the lock table is
/// shared and small); a collision only serialises two unrelated documents.
const LOCK_SLOTS: i32 = 1024;

/// Users per rebuild batch.
pub const REBUILD_BATCH: i64 = 10_000;

/// How a directory document is built from the base tables, for the users `$1`: the one
/// definition that the projection's upsert ([`project_users`]) and the shadow candidate
/// ([`directory_documents`]) share. `$extra` appends select-list items after the document's
/// columns (the upsert's `projected_at`), so the projection runs the statement it always ran,
/// without a subquery in between.
///
/// A suspended user's document has no score. The score orchestrator keeps scores of active
/// users only: its next run deletes a suspended user's score without an event (no
/// `scores.updated` names a score that is gone), so a document that kept the score it had when
/// the suspension was projected would keep it forever, where a rebuild has none. The user's
/// status, on the other hand, changes only with an event (`identity.user_suspended`,
/// `identity.user_reinstated`), which re-projects the document.
macro_rules! directory_documents_sql {
    ($($extra:literal)?) => {
        concat!(
            "SELECT u.id AS user_id, u.handle, u.display_name, u.verified,
                    CASE WHEN u.status = 'active' THEN s.score END AS score, u.status,
                    h.user_id IS NOT NULL AS hidden",
            $($extra,)?
            "
         FROM identity.users u
         LEFT JOIN score.user_scores s ON s.user_id = u.id
         LEFT JOIN security.hidden_users h ON h.user_id = u.id
         WHERE u.id = ANY($1)"
        )
    };
}

/// How the contact documents of the owners `$1` are built from the base tables: one per
/// contact, with the contact's handle and display name, the owner's label, the owner's circles
/// the contact is in (sorted by name) and the text contact search matches. Shared like
/// `directory_documents_sql!` ([`project_contacts`], [`contact_documents`]).
macro_rules! contact_documents_sql {
    ($($extra:literal)?) => {
        concat!(
            "SELECT cur.owner_id, cur.contact_id, cur.handle, cur.display_name, cur.label, cur.circles,
                lower(cur.handle || ' ' || cur.display_name || ' ' || cur.label || ' ' || array_to_string(cur.circles, ' '))
                    AS search_text",
            $($extra,)?
            "
         FROM (
             SELECT c.owner_id, c.contact_id, u.handle, u.display_name, c.label,
                    coalesce((SELECT array_agg(ci.name ORDER BY ci.name)
                              FROM circles.members m JOIN circles.circles ci ON ci.id = m.circle_id
                              WHERE m.owner_id = c.owner_id AND m.user_id = c.contact_id), '{}') AS circles
             FROM contacts.contacts c JOIN identity.users u ON u.id = c.contact_id
             WHERE c.owner_id = ANY($1)
         ) cur"
        )
    };
}

/// A directory document: what user search reads of one user. Serialised (without the id) as
/// the shadow comparison sees it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct DirectoryDocument {
    #[serde(skip)]
    pub user_id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub verified: bool,
    /// `None` for an unscored or a suspended user.
    pub score: Option<i32>,
    #[sqlx(try_from = "String")]
    pub status: UserStatus,
    pub hidden: bool,
}

/// A contact document: what contact search reads of one owner's contact. Serialised (without
/// the ids) as the shadow comparison sees it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct ContactDocument {
    #[serde(skip)]
    pub owner_id: Uuid,
    #[serde(skip)]
    pub contact_id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub label: String,
    pub circles: Vec<String>,
    pub search_text: String,
}

/// The directory documents of `user_ids` as the base tables have them now (none for an id
/// that is not a user).
pub async fn directory_documents(
    conn: &mut PgConnection,
    user_ids: &[Uuid],
) -> Result<Vec<DirectoryDocument>, sqlx::Error> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(directory_documents_sql!()).bind(user_ids).fetch_all(conn).await
}

/// The contact documents of `owner_ids` as the base tables have them now.
pub async fn contact_documents(
    conn: &mut PgConnection,
    owner_ids: &[Uuid],
) -> Result<Vec<ContactDocument>, sqlx::Error> {
    if owner_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(contact_documents_sql!()).bind(owner_ids).fetch_all(conn).await
}

/// Takes the advisory locks of the directory documents of `users` and the contact documents
/// of `owners`, in one statement and in key order (so two projections cannot deadlock). Call
/// it first in the projection's transaction; the locks are released at commit or rollback.
pub async fn lock(conn: &mut PgConnection, users: &[Uuid], owners: &[Uuid]) -> Result<(), sqlx::Error> {
    lock_class(conn, LOCK_CLASS, users, owners).await
}

/// [`lock`] in the advisory lock class `class` (the shadow candidate's documents have their own,
/// so that it never waits for the primary's projection, nor the primary for it).
pub(crate) async fn lock_class(
    conn: &mut PgConnection,
    class: i32,
    users: &[Uuid],
    owners: &[Uuid],
) -> Result<(), sqlx::Error> {
    if users.is_empty() && owners.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock($3, k))
         FROM (SELECT DISTINCT k FROM (
                 SELECT (abs(hashtextextended(id::text, 0)) % $4)::int AS k FROM unnest($1::uuid[]) id
                 UNION ALL
                 SELECT $4 + (abs(hashtextextended(id::text, 0)) % $4)::int FROM unnest($2::uuid[]) id) keys
               ORDER BY k) ordered",
    )
    .bind(users)
    .bind(owners)
    .bind(class)
    .bind(LOCK_SLOTS)
    .execute(conn)
    .await?;
    Ok(())
}

/// Upserts the directory documents of `user_ids` from `identity.users`, `score.user_scores`
/// and `security.hidden_users`, deletes those of ids that no longer exist, and keeps the name
/// postings of the documents that changed in step. Returns the documents written or deleted
/// (unchanged documents are not rewritten).
///
/// One statement writes the directory and returns, for each document it wrote or deleted, what
/// its postings are made of before and after: the postings are rewritten only for documents
/// whose searchable name changed (the display name, score or handle of an active, not hidden
/// document), and they are built from the written rows, not from a second read of
/// `search.directory`. A document new to the directory still has its postings deleted first:
/// the directory may have been emptied without them (a truncation before a rebuild).
pub async fn project_users(conn: &mut PgConnection, user_ids: &[Uuid]) -> Result<u64, sqlx::Error> {
    if user_ids.is_empty() {
        return Ok(0);
    }
    // `old` reads the documents as they were before this statement (every part of a statement
    // sees the same snapshot), by key: `unnest` joined on the primary key, never a predicate
    // on `status` / `hidden` that `directory_rank_idx` (partial on them) could serve, which
    // the planner, unsure of the table's size, may scan whole.
    let changed: Vec<ChangedDocument> = sqlx::query_as(
        concat!(
            "WITH old AS (
                 SELECT d.user_id, d.handle, d.display_name, d.score, d.status = 'active' AND NOT d.hidden AS searchable
                 FROM unnest($1::uuid[]) AS i (id) JOIN search.directory d ON d.user_id = i.id),
             gone AS (
                 DELETE FROM search.directory d
                 WHERE d.user_id = ANY($1) AND NOT EXISTS (SELECT 1 FROM identity.users u WHERE u.id = d.user_id)
                 RETURNING d.user_id),
             written AS (
                 INSERT INTO search.directory AS d (user_id, handle, display_name, verified, score, status, hidden, projected_at)\n",
            directory_documents_sql!(", now()"),
            "
                 ON CONFLICT (user_id) DO UPDATE SET
                     handle = EXCLUDED.handle, display_name = EXCLUDED.display_name, verified = EXCLUDED.verified,
                     score = EXCLUDED.score, status = EXCLUDED.status, hidden = EXCLUDED.hidden, projected_at = now()
                 WHERE (d.handle, d.display_name, d.verified, d.score, d.status, d.hidden)
                       IS DISTINCT FROM (EXCLUDED.handle, EXCLUDED.display_name, EXCLUDED.verified, EXCLUDED.score,
                                         EXCLUDED.status, EXCLUDED.hidden)
                 RETURNING d.user_id, d.handle, d.display_name, d.score, d.status = 'active' AND NOT d.hidden AS searchable),
             changed AS (
                 SELECT user_id, NULL::text AS handle, NULL::text AS display_name, NULL::integer AS score,
                        false AS searchable
                 FROM gone
                 UNION ALL
                 SELECT user_id, handle, display_name, score, searchable FROM written)
         SELECT c.user_id, c.handle, c.display_name, c.score, c.searchable,
                NOT (coalesce(o.searchable, false) = c.searchable
                     AND (NOT c.searchable
                          OR (o.handle, o.display_name, o.score) IS NOT DISTINCT FROM (c.handle, c.display_name, c.score)))
                    AS postings_changed
         FROM changed c LEFT JOIN old o ON o.user_id = c.user_id"
        ),
    )
    .bind(user_ids)
    .fetch_all(&mut *conn)
    .await?;
    let stale: Vec<Uuid> = changed.iter().filter(|c| c.postings_changed).map(|c| c.user_id).collect();
    delete_name_postings(conn, &stale).await?;
    let fresh: Vec<&ChangedDocument> = changed.iter().filter(|c| c.postings_changed && c.searchable).collect();
    insert_name_postings(conn, &fresh).await?;
    Ok(changed.len() as u64)
}

/// A directory document that [`project_users`] wrote or deleted: its searchable name as
/// written (`searchable` false for a deleted, suspended or hidden one) and whether its postings
/// change.
#[derive(Debug, sqlx::FromRow)]
struct ChangedDocument {
    user_id: Uuid,
    handle: Option<String>,
    display_name: Option<String>,
    score: Option<i32>,
    searchable: bool,
    postings_changed: bool,
}

/// Deletes the name postings of `user_ids`.
async fn delete_name_postings(conn: &mut PgConnection, user_ids: &[Uuid]) -> Result<(), sqlx::Error> {
    if user_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM search.name_postings WHERE user_id = ANY($1)").bind(user_ids).execute(&mut *conn).await?;
    Ok(())
}

/// Inserts the name postings of `documents` (searchable ones, whose postings are gone or were
/// never written), and adds words never seen before to the term dictionary, with their
/// one-deletion variants when they have no digit. A document's words are split once and
/// deduplicated within the document (one posting per word and document): the documents are
/// distinct, so no sort of every posting's columns is needed.
async fn insert_name_postings(conn: &mut PgConnection, documents: &[&ChangedDocument]) -> Result<(), sqlx::Error> {
    if documents.is_empty() {
        return Ok(());
    }
    let user_ids: Vec<Uuid> = documents.iter().map(|d| d.user_id).collect();
    let handles: Vec<&str> = documents.iter().map(|d| d.handle.as_deref().unwrap_or_default()).collect();
    let names: Vec<&str> = documents.iter().map(|d| d.display_name.as_deref().unwrap_or_default()).collect();
    let scores: Vec<Option<i32>> = documents.iter().map(|d| d.score).collect();
    sqlx::query(
        "WITH postings AS (
             INSERT INTO search.name_postings (term, user_id, score, handle, words)
             SELECT w.term, d.user_id, d.score, d.handle, n.words
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::integer[]) AS d (user_id, handle, display_name, score),
                  LATERAL (SELECT search.name_words(d.display_name) AS words) n,
                  LATERAL (SELECT DISTINCT t.term FROM unnest(n.words) AS t (term) WHERE char_length(t.term) >= 2) w
             RETURNING term),
         new_terms AS (
             INSERT INTO search.name_terms (term) SELECT DISTINCT term FROM postings
             ON CONFLICT (term) DO NOTHING
             RETURNING term)
         INSERT INTO search.name_term_variants (variant, term)
         SELECT DISTINCT v.variant, t.term
         FROM new_terms t,
              LATERAL (SELECT t.term AS variant
                       UNION
                       SELECT left(t.term, i - 1) || substr(t.term, i + 1)
                       FROM generate_series(1, char_length(t.term)) i) v
         WHERE t.term !~ '[0-9]'
         ON CONFLICT (variant, term) DO NOTHING",
    )
    .bind(&user_ids)
    .bind(&handles)
    .bind(&names)
    .bind(&scores)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Replaces the contact documents of `owner_ids`: one per contact, with the contact's handle
/// and display name, the owner's label and the owner's circles the contact is in (sorted by
/// name); documents of contacts that are gone are deleted. Returns the rows written or deleted.
pub async fn project_contacts(conn: &mut PgConnection, owner_ids: &[Uuid]) -> Result<u64, sqlx::Error> {
    if owner_ids.is_empty() {
        return Ok(0);
    }
    let deleted = sqlx::query(
        "DELETE FROM search.contacts sc
         WHERE sc.owner_id = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM contacts.contacts c
                           WHERE c.owner_id = sc.owner_id AND c.contact_id = sc.contact_id)",
    )
    .bind(owner_ids)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let written = sqlx::query(
        concat!(
            "INSERT INTO search.contacts AS sc (owner_id, contact_id, handle, display_name, label, circles, search_text, projected_at)\n",
            contact_documents_sql!(", now()"),
            "
         ON CONFLICT (owner_id, contact_id) DO UPDATE SET
             handle = EXCLUDED.handle, display_name = EXCLUDED.display_name, label = EXCLUDED.label,
             circles = EXCLUDED.circles, search_text = EXCLUDED.search_text, projected_at = now()
         WHERE (sc.handle, sc.display_name, sc.label, sc.circles, sc.search_text)
               IS DISTINCT FROM (EXCLUDED.handle, EXCLUDED.display_name, EXCLUDED.label, EXCLUDED.circles,
                                 EXCLUDED.search_text)"
        ),
    )
    .bind(owner_ids)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(deleted + written)
}

/// The owners whose contact documents show any of `user_ids` (they have them as a contact):
/// a change of a user's handle or display name makes these owners' documents dirty.
pub async fn owners_showing(conn: &mut PgConnection, user_ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT DISTINCT owner_id FROM contacts.contacts WHERE contact_id = ANY($1)")
        .bind(user_ids)
        .fetch_all(conn)
        .await
}

/// Moves the checkpoint forward (never back): the newest applied event time and stream
/// sequence, and `updated_at = now()`.
pub async fn advance_checkpoint(
    conn: &mut PgConnection,
    last_event_at: OffsetDateTime,
    last_stream_sequence: i64,
) -> Result<(), sqlx::Error> {
    advance_checkpoint_in(conn, "search.checkpoint", last_event_at, last_stream_sequence).await
}

/// [`advance_checkpoint`] of a checkpoint table of the same shape (the shadow candidate's).
pub(crate) async fn advance_checkpoint_in(
    conn: &mut PgConnection,
    table: &'static str,
    last_event_at: OffsetDateTime,
    last_stream_sequence: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE {table} SET
             last_event_at = GREATEST(last_event_at, $1),
             last_stream_sequence = GREATEST(last_stream_sequence, $2),
             updated_at = now()
         WHERE id = 1"
    ))
    .bind(last_event_at)
    .bind(last_stream_sequence)
    .execute(conn)
    .await?;
    Ok(())
}

/// The checkpoint row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Checkpoint {
    pub last_event_at: Option<OffsetDateTime>,
    pub last_stream_sequence: Option<i64>,
    pub updated_at: Option<OffsetDateTime>,
}

pub async fn checkpoint(conn: &mut PgConnection) -> Result<Checkpoint, sqlx::Error> {
    checkpoint_in(conn, "search.checkpoint").await
}

/// [`checkpoint`] of a checkpoint table of the same shape (the shadow candidate's).
pub(crate) async fn checkpoint_in(conn: &mut PgConnection, table: &'static str) -> Result<Checkpoint, sqlx::Error> {
    sqlx::query_as(&format!("SELECT last_event_at, last_stream_sequence, updated_at FROM {table} WHERE id = 1"))
        .fetch_one(conn)
        .await
}

/// Seconds since the checkpoint was last written (`None` before the first write).
pub async fn checkpoint_age_seconds(pool: &PgPool) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM clock_timestamp() - updated_at)::float8 FROM search.checkpoint WHERE id = 1",
    )
    .fetch_one(pool)
    .await
}

/// Where a rebuild stands, after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildProgress {
    /// Users whose documents were rebuilt so far.
    pub users_done: u64,
    /// Users when the rebuild started (users registered since may make `users_done` larger).
    pub users_total: u64,
    /// Rows written or deleted so far.
    pub rows_changed: u64,
}

/// Rebuilds the whole read model from the base tables, in batches of [`REBUILD_BATCH`] users
/// (keyset by id), each in a transaction of its own that takes the same document locks as the
/// projector, so search keeps answering and concurrent projections stay correct. Documents of
/// users that no longer exist are deleted at the end. The checkpoint is left as it is. Ends
/// equal to what the incremental projection produces.
/// Which documents a rebuild projects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildScope {
    /// Directory and contact documents.
    All,
    /// Directory documents (and their name postings) only.
    Directory,
    /// Contact documents only.
    Contacts,
}

pub async fn rebuild(
    pool: &PgPool,
    scope: RebuildScope,
    mut progress: impl FnMut(RebuildProgress),
) -> Result<RebuildProgress, sqlx::Error> {
    let directory = scope != RebuildScope::Contacts;
    let contacts = scope != RebuildScope::Directory;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM identity.users").fetch_one(pool).await?;
    let mut state = RebuildProgress { users_done: 0, users_total: total.max(0) as u64, rows_changed: 0 };
    let mut after = Uuid::nil();
    loop {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM identity.users WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after)
            .bind(REBUILD_BATCH)
            .fetch_all(pool)
            .await?;
        let Some(last) = ids.last() else { break };
        after = *last;
        let mut tx = pool.begin().await?;
        lock(&mut tx, if directory { &ids } else { &[] }, if contacts { &ids } else { &[] }).await?;
        if directory {
            state.rows_changed += project_users(&mut tx, &ids).await?;
        }
        if contacts {
            state.rows_changed += project_contacts(&mut tx, &ids).await?;
        }
        tx.commit().await?;
        state.users_done += ids.len() as u64;
        progress(state);
    }
    if directory {
        let mut tx = pool.begin().await?;
        let gone: Vec<Uuid> = sqlx::query_scalar(
            "DELETE FROM search.directory d WHERE NOT EXISTS (SELECT 1 FROM identity.users u WHERE u.id = d.user_id)
             RETURNING d.user_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        delete_name_postings(&mut tx, &gone).await?;
        tx.commit().await?;
        state.rows_changed += gone.len() as u64;
    }
    if contacts {
        state.rows_changed += sqlx::query(
            "DELETE FROM search.contacts sc WHERE NOT EXISTS (SELECT 1 FROM identity.users u WHERE u.id = sc.owner_id)",
        )
        .execute(pool)
        .await?
        .rows_affected();
    }
    progress(state);
    Ok(state)
}
