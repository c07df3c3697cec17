//! `contacts.contacts`: the directed "owner vouches for contact" edges of the trust graph.

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_domain::identity::Role;
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

/// Adds the edge or updates its label, in one statement, and says which it did.
pub async fn upsert(
    db: impl PgExecutor<'_>,
    owner: UserId,
    contact: UserId,
    label: &str,
) -> Result<(Upsert, ContactRow), sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        contact: ContactRow,
        outcome: String,
    }
    let row: Row = sqlx::query_as(
        "WITH old AS (
             SELECT label FROM contacts.contacts WHERE owner_id = $1 AND contact_id = $2
         ), up AS (
             INSERT INTO contacts.contacts AS c (owner_id, contact_id, label) VALUES ($1, $2, $3)
             ON CONFLICT (owner_id, contact_id) DO UPDATE SET label = EXCLUDED.label,
                 updated_at = CASE WHEN c.label IS DISTINCT FROM EXCLUDED.label THEN now() ELSE c.updated_at END
             RETURNING c.contact_id, c.label, c.created_at, c.updated_at, (c.xmax = 0) AS inserted
         )
         SELECT up.contact_id, u.handle, u.display_name, up.label, up.created_at, up.updated_at,
                CASE WHEN up.inserted THEN 'created'
                     WHEN (SELECT label FROM old) IS DISTINCT FROM up.label THEN 'updated'
                     ELSE 'unchanged' END AS outcome
         FROM up JOIN identity.users u ON u.id = up.contact_id",
    )
    .bind(owner.0)
    .bind(contact.0)
    .bind(label)
    .fetch_one(db)
    .await?;
    let outcome = match row.outcome.as_str() {
        "created" => Upsert::Created,
        "updated" => Upsert::Updated,
        _ => Upsert::Unchanged,
    };
    Ok((outcome, row.contact))
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

/// The contacts of the user who holds the live token `token_hash`, ordered by contact id,
/// after `after`; `None` when the token does not authenticate an active user.
///
/// Authentication and the page are one statement: this is the API's hottest read, and a round
/// trip saved here is a third of its database work.
pub async fn list_for_token(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    idle_timeout: std::time::Duration,
    after: Option<Uuid>,
    limit: usize,
) -> Result<Option<(crate::identity::Principal, Page<ContactRow>)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        user_id: Uuid,
        #[sqlx(try_from = "String")]
        role: Role,
        live_for_secs: f64,
        contact_id: Option<Uuid>,
        handle: Option<String>,
        display_name: Option<String>,
        label: Option<String>,
        created_at: Option<OffsetDateTime>,
        updated_at: Option<OffsetDateTime>,
    }
    // The nil UUID is below every id, so the first page needs no special case and the range
    // scan on the primary key (owner_id, contact_id) serves every page.
    let rows: Vec<Row> = sqlx::query_as(concat!(
        "SELECT p.user_id, p.role, p.live_for_secs,
                c.contact_id, c.handle, c.display_name, c.label, c.created_at, c.updated_at
         FROM (SELECT u.id AS user_id, u.role, ",
        crate::identity::live_for!("t", "$4"),
        " AS live_for_secs
               FROM identity.tokens t JOIN identity.users u ON u.id = t.user_id
               WHERE t.token_hash = $1 AND ",
        crate::identity::live_token!("t", "$4"),
        " AND u.status = 'active') p
         LEFT JOIN LATERAL (
             SELECT c.contact_id, u.handle, u.display_name, c.label, c.created_at, c.updated_at
             FROM contacts.contacts c JOIN identity.users u ON u.id = c.contact_id
             WHERE c.owner_id = p.user_id AND c.contact_id > $2
             ORDER BY c.contact_id LIMIT $3) c ON true
         ORDER BY c.contact_id"
    ))
    .bind(token_hash)
    .bind(after.unwrap_or(Uuid::nil()))
    .bind(limit as i64 + 1)
    .bind(idle_timeout)
    .fetch_all(db)
    .await?;
    let Some(first) = rows.first() else { return Ok(None) };
    let principal =
        crate::identity::Principal { user_id: first.user_id, role: first.role, live_for_secs: first.live_for_secs };
    let contacts: Vec<ContactRow> = rows
        .into_iter()
        .filter_map(|r| {
            Some(ContactRow {
                contact_id: r.contact_id?,
                handle: r.handle?,
                display_name: r.display_name?,
                label: r.label?,
                created_at: r.created_at?,
                updated_at: r.updated_at?,
            })
        })
        .collect();
    Ok(Some((principal, Page::from_rows(contacts, limit, |r| r.contact_id))))
}

/// The contacts of `owner`, ordered by contact id, after `after`: the page of
/// [`list_for_token`] for a caller already authenticated (by the API's token cache).
pub async fn list_for_owner(
    db: impl PgExecutor<'_>,
    owner: UserId,
    after: Option<Uuid>,
    limit: usize,
) -> Result<Page<ContactRow>, sqlx::Error> {
    let rows: Vec<ContactRow> = sqlx::query_as(
        "SELECT c.contact_id, u.handle, u.display_name, c.label, c.created_at, c.updated_at
         FROM contacts.contacts c JOIN identity.users u ON u.id = c.contact_id
         WHERE c.owner_id = $1 AND c.contact_id > $2
         ORDER BY c.contact_id LIMIT $3",
    )
    .bind(owner.0)
    .bind(after.unwrap_or(Uuid::nil()))
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
