//! The search projector's shadow candidate's tables (`shadow.search_directory`,
//! `shadow.search_contacts`, `shadow.search_checkpoint`) and what its comparer reads beside
//! them: the read model's documents, its checkpoint and the outbox's publishing front.
//!
//! A candidate document is built by the same SELECT as the read model's (see
//! [`crate::search_model::directory_documents`]); each row keeps the stream sequence of the last
//! event that made the candidate re-read it (`through_sequence`), a `version` raised at every
//! re-read, and the last version the comparer settled.

use std::fmt;

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::search_model::{ContactDocument, DirectoryDocument};

/// The advisory lock class of the candidate's documents: not the read model's, so the candidate
/// never waits for the primary's projection (nor the primary for the candidate).
const LOCK_CLASS: i32 = 0x5EA5;

/// Takes the candidate's locks of the directory documents of `users` and the contact documents
/// of `owners` (like [`crate::search_model::lock`], in a class of their own): concurrent
/// candidate batches serialise per document, so the stored copy is the one read last.
pub async fn lock(conn: &mut PgConnection, users: &[Uuid], owners: &[Uuid]) -> Result<(), sqlx::Error> {
    crate::search_model::lock_class(conn, LOCK_CLASS, users, owners).await
}

/// The contact documents (owner, contact) that show any of `user_ids`: those a change of their
/// handle or display name makes dirty (per document, where the projection re-reads whole owners).
pub async fn contacts_showing(conn: &mut PgConnection, user_ids: &[Uuid]) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as("SELECT owner_id, contact_id FROM contacts.contacts WHERE contact_id = ANY($1)")
        .bind(user_ids)
        .fetch_all(conn)
        .await
}

/// The contacts of `owner_ids` that the candidate has a document row for (present or not).
pub async fn contact_keys(conn: &mut PgConnection, owner_ids: &[Uuid]) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    if owner_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as("SELECT owner_id, contact_id FROM shadow.search_contacts WHERE owner_id = ANY($1)")
        .bind(owner_ids)
        .fetch_all(conn)
        .await
}

/// One document as the candidate re-read it: its JSON (`None`: it does not exist) and the stream
/// sequence of the event that made it re-read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Written<K> {
    pub key: K,
    pub document: Option<Value>,
    pub sequence: i64,
}

/// Writes re-read directory documents: the document, `through_sequence` raised to the event's
/// sequence (never lowered), a new version. Keys must be distinct.
pub async fn write_directory(conn: &mut PgConnection, rows: &[Written<Uuid>]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.key).collect();
    let documents: Vec<Option<Value>> = rows.iter().map(|r| r.document.clone()).collect();
    let sequences: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
    sqlx::query(
        "INSERT INTO shadow.search_directory AS t (user_id, document, through_sequence)
         SELECT * FROM UNNEST($1::uuid[], $2::jsonb[], $3::bigint[])
         ON CONFLICT (user_id) DO UPDATE SET
             document = EXCLUDED.document,
             through_sequence = GREATEST(t.through_sequence, EXCLUDED.through_sequence),
             version = t.version + 1,
             written_at = now()",
    )
    .bind(&ids)
    .bind(&documents)
    .bind(&sequences)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes re-read contact documents (keys: owner, contact), like [`write_directory`].
pub async fn write_contacts(conn: &mut PgConnection, rows: &[Written<(Uuid, Uuid)>]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let owners: Vec<Uuid> = rows.iter().map(|r| r.key.0).collect();
    let contacts: Vec<Uuid> = rows.iter().map(|r| r.key.1).collect();
    let documents: Vec<Option<Value>> = rows.iter().map(|r| r.document.clone()).collect();
    let sequences: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
    sqlx::query(
        "INSERT INTO shadow.search_contacts AS t (owner_id, contact_id, document, through_sequence)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::jsonb[], $4::bigint[])
         ON CONFLICT (owner_id, contact_id) DO UPDATE SET
             document = EXCLUDED.document,
             through_sequence = GREATEST(t.through_sequence, EXCLUDED.through_sequence),
             version = t.version + 1,
             written_at = now()",
    )
    .bind(&owners)
    .bind(&contacts)
    .bind(&documents)
    .bind(&sequences)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the candidate's checkpoint forward (never back).
pub async fn advance_checkpoint(
    conn: &mut PgConnection,
    last_event_at: OffsetDateTime,
    last_stream_sequence: i64,
) -> Result<(), sqlx::Error> {
    crate::search_model::advance_checkpoint_in(conn, CHECKPOINT, last_event_at, last_stream_sequence).await
}

/// The candidate's checkpoint row.
pub async fn checkpoint(conn: &mut PgConnection) -> Result<crate::search_model::Checkpoint, sqlx::Error> {
    crate::search_model::checkpoint_in(conn, CHECKPOINT).await
}

const CHECKPOINT: &str = "shadow.search_checkpoint";

/// Deletes the documents written before `before` (an earlier shadow period's: the candidate did
/// not follow the events in between, so they are no evidence of this one).
pub async fn prune(pool: &PgPool, before: OffsetDateTime) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    for table in ["shadow.search_directory", "shadow.search_contacts"] {
        deleted += sqlx::query(&format!("DELETE FROM {table} WHERE written_at < $1"))
            .bind(before)
            .execute(pool)
            .await?
            .rows_affected();
    }
    Ok(deleted)
}

/// A search document: a user's directory document, or an owner's contact document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocKey {
    Directory(Uuid),
    Contact { owner: Uuid, contact: Uuid },
}

impl fmt::Display for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DocKey::Directory(user) => write!(f, "directory/{user}"),
            DocKey::Contact { owner, contact } => write!(f, "contacts/{owner}/{contact}"),
        }
    }
}

/// One candidate document version beside the read model's document of the same key, as one
/// snapshot has them (`None`: no document).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub key: DocKey,
    pub version: i64,
    pub through_sequence: i64,
    pub written_at: OffsetDateTime,
    pub candidate: Option<Value>,
    pub primary: Option<Value>,
}

/// What a comparer round reads first in its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// The database's clock, after the snapshot was taken.
    pub clock: OffsetDateTime,
    /// The read model's checkpoint: the highest stream sequence the primary has applied (not a
    /// floor: batches may commit out of order).
    pub primary_checkpoint: i64,
    /// The newest outbox row visible (0 when none): every event whose change the snapshot
    /// shows has an outbox row at or below it.
    pub outbox_newest: i64,
    /// The oldest outbox row not published yet, if any.
    pub outbox_oldest_unpublished: Option<i64>,
}

/// Reads the [`Marks`]; the first statement of a REPEATABLE READ transaction, whose snapshot it
/// takes.
pub async fn marks(conn: &mut PgConnection) -> Result<Marks, sqlx::Error> {
    let (clock, primary_checkpoint, outbox_newest, outbox_oldest_unpublished): (
        OffsetDateTime,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    ) = sqlx::query_as(
        "SELECT clock_timestamp(),
                (SELECT last_stream_sequence FROM search.checkpoint WHERE id = 1),
                (SELECT max(seq) FROM ops.outbox),
                (SELECT min(seq) FROM ops.outbox WHERE published_at IS NULL)",
    )
    .fetch_one(conn)
    .await?;
    Ok(Marks {
        clock,
        primary_checkpoint: primary_checkpoint.unwrap_or(0),
        outbox_newest: outbox_newest.unwrap_or(0),
        outbox_oldest_unpublished,
    })
}

#[derive(sqlx::FromRow)]
struct ShadowRow {
    owner_id: Option<Uuid>,
    user_id: Uuid,
    version: i64,
    through_sequence: i64,
    written_at: OffsetDateTime,
    document: Option<Value>,
}

impl ShadowRow {
    fn key(&self) -> DocKey {
        match self.owner_id {
            Some(owner) => DocKey::Contact { owner, contact: self.user_id },
            None => DocKey::Directory(self.user_id),
        }
    }
}

/// Unsettled candidate document versions written since `since`, lowest `through_sequence`
/// first, without the versions in `exclude`, each with the read model's document.
pub async fn unsettled(
    conn: &mut PgConnection,
    since: OffsetDateTime,
    exclude: &[(DocKey, i64)],
    limit: i64,
) -> Result<Vec<Pair>, sqlx::Error> {
    let (dir_ids, dir_versions, owners, contacts, contact_versions) = split_versions(exclude);
    let directory: Vec<ShadowRow> = sqlx::query_as(
        "SELECT NULL::uuid AS owner_id, user_id, version, through_sequence, written_at, document
         FROM shadow.search_directory
         WHERE version > settled_version AND written_at >= $1
           AND (user_id, version) NOT IN (SELECT * FROM UNNEST($2::uuid[], $3::bigint[]))
         ORDER BY through_sequence LIMIT $4",
    )
    .bind(since)
    .bind(&dir_ids)
    .bind(&dir_versions)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let contact_rows: Vec<ShadowRow> = sqlx::query_as(
        "SELECT owner_id, contact_id AS user_id, version, through_sequence, written_at, document
         FROM shadow.search_contacts
         WHERE version > settled_version AND written_at >= $1
           AND (owner_id, contact_id, version) NOT IN (SELECT * FROM UNNEST($2::uuid[], $3::uuid[], $4::bigint[]))
         ORDER BY through_sequence LIMIT $5",
    )
    .bind(since)
    .bind(&owners)
    .bind(&contacts)
    .bind(&contact_versions)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    with_primary(conn, directory.into_iter().chain(contact_rows).collect()).await
}

/// The candidate's current versions of `keys` (absent keys are left out), each with the read
/// model's document.
pub async fn current(conn: &mut PgConnection, keys: &[DocKey]) -> Result<Vec<Pair>, sqlx::Error> {
    let (dir_ids, owners, contacts) = split(keys.iter());
    let mut rows: Vec<ShadowRow> = Vec::new();
    if !dir_ids.is_empty() {
        rows.extend(
            sqlx::query_as::<_, ShadowRow>(
                "SELECT NULL::uuid AS owner_id, user_id, version, through_sequence, written_at, document
                 FROM shadow.search_directory WHERE user_id = ANY($1)",
            )
            .bind(&dir_ids)
            .fetch_all(&mut *conn)
            .await?,
        );
    }
    if !owners.is_empty() {
        rows.extend(
            sqlx::query_as::<_, ShadowRow>(
                "SELECT owner_id, contact_id AS user_id, version, through_sequence, written_at, document
                 FROM shadow.search_contacts
                 WHERE (owner_id, contact_id) IN (SELECT * FROM UNNEST($1::uuid[], $2::uuid[]))",
            )
            .bind(&owners)
            .bind(&contacts)
            .fetch_all(&mut *conn)
            .await?,
        );
    }
    with_primary(conn, rows).await
}

/// Pairs each candidate row with the read model's document of its key, read with the same
/// column list and serialised through the same type as the candidate's.
async fn with_primary(conn: &mut PgConnection, rows: Vec<ShadowRow>) -> Result<Vec<Pair>, sqlx::Error> {
    let keys: Vec<DocKey> = rows.iter().map(ShadowRow::key).collect();
    let (dir_ids, owners, contacts) = split(keys.iter());
    let mut primary = std::collections::HashMap::new();
    if !dir_ids.is_empty() {
        let docs: Vec<DirectoryDocument> = sqlx::query_as(
            "SELECT user_id, handle, display_name, verified, score, status, hidden
             FROM search.directory WHERE user_id = ANY($1)",
        )
        .bind(&dir_ids)
        .fetch_all(&mut *conn)
        .await?;
        for d in docs {
            primary.insert(DocKey::Directory(d.user_id), to_json(&d)?);
        }
    }
    if !owners.is_empty() {
        let docs: Vec<ContactDocument> = sqlx::query_as(
            "SELECT owner_id, contact_id, handle, display_name, label, circles, search_text
             FROM search.contacts
             WHERE (owner_id, contact_id) IN (SELECT * FROM UNNEST($1::uuid[], $2::uuid[]))",
        )
        .bind(&owners)
        .bind(&contacts)
        .fetch_all(&mut *conn)
        .await?;
        for d in docs {
            primary.insert(DocKey::Contact { owner: d.owner_id, contact: d.contact_id }, to_json(&d)?);
        }
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let key = r.key();
            Pair {
                key,
                version: r.version,
                through_sequence: r.through_sequence,
                written_at: r.written_at,
                candidate: r.document,
                primary: primary.remove(&key),
            }
        })
        .collect())
}

/// A document as JSON, as the comparison sees it (its key left out).
pub fn to_json(document: &impl serde::Serialize) -> Result<Value, sqlx::Error> {
    serde_json::to_value(document).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// Marks `versions` settled (compared, recorded missing, or dropped) unless a version as new
/// was already settled (by another comparer); returns those this call settled. Run it in the
/// transaction that records their comparisons, so each version is recorded once.
pub async fn settle(conn: &mut PgConnection, versions: &[(DocKey, i64)]) -> Result<Vec<(DocKey, i64)>, sqlx::Error> {
    let (dir_ids, dir_versions, owners, contacts, contact_versions) = split_versions(versions);
    let mut settled = Vec::new();
    if !dir_ids.is_empty() {
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "UPDATE shadow.search_directory t SET settled_version = k.version
             FROM UNNEST($1::uuid[], $2::bigint[]) AS k (user_id, version)
             WHERE t.user_id = k.user_id AND t.settled_version < k.version
             RETURNING t.user_id, k.version",
        )
        .bind(&dir_ids)
        .bind(&dir_versions)
        .fetch_all(&mut *conn)
        .await?;
        settled.extend(rows.into_iter().map(|(id, v)| (DocKey::Directory(id), v)));
    }
    if !owners.is_empty() {
        let rows: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(
            "UPDATE shadow.search_contacts t SET settled_version = k.version
             FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[]) AS k (owner_id, contact_id, version)
             WHERE t.owner_id = k.owner_id AND t.contact_id = k.contact_id AND t.settled_version < k.version
             RETURNING t.owner_id, t.contact_id, k.version",
        )
        .bind(&owners)
        .bind(&contacts)
        .bind(&contact_versions)
        .fetch_all(&mut *conn)
        .await?;
        settled.extend(rows.into_iter().map(|(owner, contact, v)| (DocKey::Contact { owner, contact }, v)));
    }
    Ok(settled)
}

/// Candidate document versions not settled yet (written since `since`).
pub async fn unsettled_count(pool: &PgPool, since: OffsetDateTime) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM shadow.search_directory WHERE version > settled_version AND written_at >= $1)
              + (SELECT count(*) FROM shadow.search_contacts WHERE version > settled_version AND written_at >= $1)",
    )
    .bind(since)
    .fetch_one(pool)
    .await
}

fn split<'a>(keys: impl Iterator<Item = &'a DocKey>) -> (Vec<Uuid>, Vec<Uuid>, Vec<Uuid>) {
    let (mut dir_ids, mut owners, mut contacts) = (Vec::new(), Vec::new(), Vec::new());
    for key in keys {
        match *key {
            DocKey::Directory(id) => dir_ids.push(id),
            DocKey::Contact { owner, contact } => {
                owners.push(owner);
                contacts.push(contact);
            }
        }
    }
    (dir_ids, owners, contacts)
}

type SplitVersions = (Vec<Uuid>, Vec<i64>, Vec<Uuid>, Vec<Uuid>, Vec<i64>);

fn split_versions(versions: &[(DocKey, i64)]) -> SplitVersions {
    let mut out: SplitVersions = Default::default();
    for (key, version) in versions {
        match *key {
            DocKey::Directory(id) => {
                out.0.push(id);
                out.1.push(*version);
            }
            DocKey::Contact { owner, contact } => {
                out.2.push(owner);
                out.3.push(contact);
                out.4.push(*version);
            }
        }
    }
    out
}
