//! `ops.idempotency_keys`: stored responses of mutations sent with an `Idempotency-Key`.

use sqlx::PgPool;
use time::OffsetDateTime;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredKey {
    pub method: String,
    pub path: String,
    pub request_hash: Vec<u8>,
    pub status: Option<i16>,
    pub response_headers: Option<serde_json::Value>,
    pub response_body: Option<Vec<u8>>,
    pub created_at: OffsetDateTime,
}

/// What happened when a request tried to take a key.
pub enum Begin {
    /// The key is new: the caller processes the request and then calls [`complete`].
    Started,
    /// The key exists (completed, in progress, or for another request).
    Existing(StoredKey),
}

pub async fn begin(
    pool: &PgPool,
    principal: &str,
    key: &str,
    method: &str,
    path: &str,
    request_hash: &[u8],
    expires_at: OffsetDateTime,
) -> Result<Begin, sqlx::Error> {
    // An expired key is replaced as if it were new.
    let inserted = sqlx::query(
        "INSERT INTO ops.idempotency_keys (principal, key, method, path, request_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (principal, key) DO UPDATE SET method = EXCLUDED.method, path = EXCLUDED.path,
             request_hash = EXCLUDED.request_hash, status = NULL, response_headers = NULL,
             response_body = NULL, created_at = now(), expires_at = EXCLUDED.expires_at
         WHERE ops.idempotency_keys.expires_at <= now()",
    )
    .bind(principal)
    .bind(key)
    .bind(method)
    .bind(path)
    .bind(request_hash)
    .bind(expires_at)
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Begin::Started);
    }
    let existing: StoredKey = sqlx::query_as(
        "SELECT method, path, request_hash, status, response_headers, response_body, created_at
         FROM ops.idempotency_keys WHERE principal = $1 AND key = $2",
    )
    .bind(principal)
    .bind(key)
    .fetch_one(pool)
    .await?;
    Ok(Begin::Existing(existing))
}

pub async fn complete(
    pool: &PgPool,
    principal: &str,
    key: &str,
    status: u16,
    headers: &serde_json::Value,
    body: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE ops.idempotency_keys SET status = $3, response_headers = $4, response_body = $5
         WHERE principal = $1 AND key = $2",
    )
    .bind(principal)
    .bind(key)
    .bind(status as i16)
    .bind(headers)
    .bind(body)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets a key whose request failed on the server's side, so that the client may retry it.
pub async fn abandon(pool: &PgPool, principal: &str, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM ops.idempotency_keys WHERE principal = $1 AND key = $2 AND status IS NULL")
        .bind(principal)
        .bind(key)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn prune_expired(pool: &PgPool, batch: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM ops.idempotency_keys WHERE (principal, key) IN (
             SELECT principal, key FROM ops.idempotency_keys WHERE expires_at <= now() LIMIT $1)",
    )
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
