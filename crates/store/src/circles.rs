//! `circles.circles` and `circles.members`.

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::{CircleId, UserId};
use uuid::Uuid;

use crate::page::Page;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CircleRow {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub member_count: i64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberRow {
    pub user_id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub added_at: OffsetDateTime,
}

const CIRCLE_SELECT: &str = "SELECT c.id, c.owner_id, c.name, c.created_at, c.updated_at,
    (SELECT count(*) FROM circles.members m WHERE m.circle_id = c.id) AS member_count
    FROM circles.circles c";

pub async fn insert(
    conn: &mut PgConnection,
    id: CircleId,
    owner: UserId,
    name: &str,
) -> Result<CircleRow, sqlx::Error> {
    sqlx::query("INSERT INTO circles.circles (id, owner_id, name) VALUES ($1, $2, $3)")
        .bind(id.0)
        .bind(owner.0)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    get(conn, owner, id).await?.ok_or(sqlx::Error::RowNotFound)
}

/// The circle if `owner` owns it. Another owner's circle is indistinguishable from a missing one.
pub async fn get(db: impl PgExecutor<'_>, owner: UserId, id: CircleId) -> Result<Option<CircleRow>, sqlx::Error> {
    sqlx::query_as(&format!("{CIRCLE_SELECT} WHERE c.id = $1 AND c.owner_id = $2"))
        .bind(id.0)
        .bind(owner.0)
        .fetch_optional(db)
        .await
}

pub async fn list(
    db: impl PgExecutor<'_>,
    owner: UserId,
    after: Option<Uuid>,
    limit: usize,
) -> Result<Page<CircleRow>, sqlx::Error> {
    let rows: Vec<CircleRow> = sqlx::query_as(&format!(
        "{CIRCLE_SELECT} WHERE c.owner_id = $1 AND ($2::uuid IS NULL OR c.id > $2) ORDER BY c.id LIMIT $3"
    ))
    .bind(owner.0)
    .bind(after)
    .bind(limit as i64 + 1)
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |r| r.id))
}

pub async fn rename(
    conn: &mut PgConnection,
    owner: UserId,
    id: CircleId,
    name: &str,
) -> Result<Option<CircleRow>, sqlx::Error> {
    let done = sqlx::query("UPDATE circles.circles SET name = $3, updated_at = now() WHERE id = $1 AND owner_id = $2")
        .bind(id.0)
        .bind(owner.0)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    get(conn, owner, id).await
}

pub async fn delete(conn: &mut PgConnection, owner: UserId, id: CircleId) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM circles.circles WHERE id = $1 AND owner_id = $2")
        .bind(id.0)
        .bind(owner.0)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Adds `user` to the circle; `false` if they were already a member.
pub async fn add_member(
    conn: &mut PgConnection,
    owner: UserId,
    id: CircleId,
    user: UserId,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO circles.members (circle_id, owner_id, user_id) VALUES ($1, $2, $3)
         ON CONFLICT (circle_id, user_id) DO NOTHING",
    )
    .bind(id.0)
    .bind(owner.0)
    .bind(user.0)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn remove_member(conn: &mut PgConnection, id: CircleId, user: UserId) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM circles.members WHERE circle_id = $1 AND user_id = $2")
        .bind(id.0)
        .bind(user.0)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Takes `user` out of every circle of `owner`; returns those circles.
pub async fn remove_from_all_circles(
    conn: &mut PgConnection,
    owner: UserId,
    user: UserId,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("DELETE FROM circles.members WHERE owner_id = $1 AND user_id = $2 RETURNING circle_id")
        .bind(owner.0)
        .bind(user.0)
        .fetch_all(conn)
        .await
}

/// Members of a circle ordered by user id, after `after`.
pub async fn members(
    db: impl PgExecutor<'_>,
    id: CircleId,
    after: Option<Uuid>,
    limit: usize,
) -> Result<Page<MemberRow>, sqlx::Error> {
    let rows: Vec<MemberRow> = sqlx::query_as(
        "SELECT m.user_id, u.handle, u.display_name, m.added_at FROM circles.members m
         JOIN identity.users u ON u.id = m.user_id
         WHERE m.circle_id = $1 AND ($2::uuid IS NULL OR m.user_id > $2) ORDER BY m.user_id LIMIT $3",
    )
    .bind(id.0)
    .bind(after)
    .bind(limit as i64 + 1)
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |r| r.user_id))
}
