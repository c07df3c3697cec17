//! `contacts.contacts`: the directed "owner vouches for contact" edges of the trust graph.

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::UserId;
use uuid::Uuid;

use crate::page::Page;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ContactRow {
    pub contact_id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub label: String,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// Whether an upsert created the edge or changed its label (or did neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Created,
    Updated,
    Unchanged,
}

/// Adds the edge, or updates its label. Returns what happened and the row as it now is.
pub async fn upsert(
    conn: &mut PgConnection,
    owner: UserId,
    contact: UserId,
    label: &str,
) -> Result<(Upsert, ContactRow), sqlx::Error> {
    // xmax = 0 tells an inserted row from an updated one; the WHERE skips no-op updates.
    let change: Option<(bool,)> = sqlx::query_as(
        "INSERT INTO contacts.contacts (owner_id, contact_id, label) VALUES ($1, $2, $3)
         ON CONFLICT (owner_id, contact_id) DO UPDATE SET label = EXCLUDED.label, updated_at = now()
             WHERE contacts.contacts.label IS DISTINCT FROM EXCLUDED.label
         RETURNING (xmax = 0)",
    )
    .bind(owner.0)
    .bind(contact.0)
    .bind(label)
    .fetch_optional(&mut *conn)
    .await?;
    let outcome = match change {
        Some((true,)) => Upsert::Created,
        Some((false,)) => Upsert::Updated,
        None => Upsert::Unchanged,
    };
    let row = get(&mut *conn, owner, contact).await?.ok_or(sqlx::Error::RowNotFound)?;
    Ok((outcome, row))
}

pub async fn get(db: impl PgExecutor<'_>, owner: UserId, contact: UserId) -> Result<Option<ContactRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.contact_id, u.handle, u.display_name, c.label, c.created_at, c.updated_at
         FROM contacts.contacts c JOIN identity.users u ON u.id = c.contact_id
         WHERE c.owner_id = $1 AND c.contact_id = $2",
    )
    .bind(owner.0)
    .bind(contact.0)
    .fetch_optional(db)
    .await
}

pub async fn remove(conn: &mut PgConnection, owner: UserId, contact: UserId) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM contacts.contacts WHERE owner_id = $1 AND contact_id = $2")
        .bind(owner.0)
        .bind(contact.0)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The owner's contacts ordered by contact id, after `after`.
pub async fn list(
    db: impl PgExecutor<'_>,
    owner: UserId,
    after: Option<Uuid>,
    limit: usize,
) -> Result<Page<ContactRow>, sqlx::Error> {
    let rows: Vec<ContactRow> = sqlx::query_as(
        "SELECT c.contact_id, u.handle, u.display_name, c.label, c.created_at, c.updated_at
         FROM contacts.contacts c JOIN identity.users u ON u.id = c.contact_id
         WHERE c.owner_id = $1 AND ($2::uuid IS NULL OR c.contact_id > $2)
         ORDER BY c.contact_id LIMIT $3",
    )
    .bind(owner.0)
    .bind(after)
    .bind(limit as i64 + 1)
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |r| r.contact_id))
}

pub async fn exists(db: impl PgExecutor<'_>, owner: UserId, contact: UserId) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM contacts.contacts WHERE owner_id = $1 AND contact_id = $2)")
        .bind(owner.0)
        .bind(contact.0)
        .fetch_one(db)
        .await
}
