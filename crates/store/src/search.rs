//! User search over the base tables (`identity.users` and the scores).

use sqlx::PgExecutor;
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

/// Active users whose handle equals or starts with `q`, or whose display name contains it,
/// ranked exact handle, then prefix, then name, then higher score. `offset` pages.
pub async fn users(db: impl PgExecutor<'_>, q: &str, offset: i64, limit: i64) -> Result<Vec<UserHit>, sqlx::Error> {
    let lowered = q.to_lowercase();
    let like = format!("{}%", escape_like(&lowered));
    let contains = format!("%{}%", escape_like(&lowered));
    sqlx::query_as(
        "SELECT u.id, u.handle, u.display_name, u.verified, s.score,
                CASE WHEN u.handle = $1 THEN 0 WHEN u.handle LIKE $2 THEN 1 ELSE 2 END AS rank
         FROM identity.users u LEFT JOIN score.user_scores s ON s.user_id = u.id
         WHERE u.status = 'active'
           AND NOT EXISTS (SELECT 1 FROM security.hidden_users h WHERE h.user_id = u.id)
           AND (u.handle LIKE $2 OR lower(u.display_name) LIKE $3)
         ORDER BY rank, s.score DESC NULLS LAST, u.handle
         OFFSET $4 LIMIT $5",
    )
    .bind(&lowered)
    .bind(&like)
    .bind(&contains)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}
