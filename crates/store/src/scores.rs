//! `score.user_scores` and `score.runs`.

use sqlx::PgExecutor;
use time::OffsetDateTime;
use trellis_domain::UserId;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserScoreRow {
    pub user_id: Uuid,
    pub trust: f64,
    pub score: i32,
    pub run_id: Uuid,
    pub computed_at: OffsetDateTime,
}

pub async fn get(db: impl PgExecutor<'_>, user: UserId) -> Result<Option<UserScoreRow>, sqlx::Error> {
    sqlx::query_as("SELECT user_id, trust, score, run_id, computed_at FROM score.user_scores WHERE user_id = $1")
        .bind(user.0)
        .fetch_optional(db)
        .await
}
