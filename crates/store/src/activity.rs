//! `identity.user_activity`: when each user was last seen, for the daily-active-users gauge.

use sqlx::PgExecutor;

/// Marks the users behind these token hashes (live tokens only) as active now. A row already
/// touched within the last hour is left alone, so a busy user costs at most one row write an
/// hour. Returns the rows written.
pub async fn record_by_token_hashes(db: impl PgExecutor<'_>, token_hashes: &[Vec<u8>]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO identity.user_activity (user_id, last_active_at)
         SELECT DISTINCT t.user_id, now() FROM identity.tokens t
         WHERE t.token_hash = ANY($1) AND t.revoked_at IS NULL AND t.expires_at > now()
         ORDER BY t.user_id
         ON CONFLICT (user_id) DO UPDATE SET last_active_at = excluded.last_active_at
         WHERE identity.user_activity.last_active_at < excluded.last_active_at - interval '1 hour'",
    )
    .bind(token_hashes)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Users seen by the API in the last 24 hours.
pub async fn daily_active_users(db: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM identity.user_activity WHERE last_active_at > now() - interval '24 hours'")
        .fetch_one(db)
        .await
}
