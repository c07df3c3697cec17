//! `identity.user_activity`: when each user was last seen, for the daily-active-users gauge;
//! and when each token was last used (`identity.tokens.last_used_at`), for its idle timeout.

use sqlx::PgExecutor;

/// Records that these tokens authenticated requests just now: the tokens' `last_used_at` (a
/// token used within the last minute is left alone) and the activity of the users whose token
/// is still live (a row touched within the last hour is left alone), in one statement. A busy user
/// costs at most one token write a minute and one activity write an hour. Tokens another
/// transaction is changing (a revocation) are skipped rather than waited for. Returns the activity
/// rows written.
pub async fn record_token_use(db: impl PgExecutor<'_>, token_hashes: &[Vec<u8>]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "WITH used AS (
             UPDATE identity.tokens SET last_used_at = now()
             WHERE token_hash IN (
                 SELECT token_hash FROM identity.tokens
                 WHERE token_hash = ANY($1) AND last_used_at < now() - interval '1 minute'
                 ORDER BY token_hash
                 FOR UPDATE SKIP LOCKED)
         )
         INSERT INTO identity.user_activity (user_id, last_active_at)
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
