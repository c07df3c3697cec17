//! `ops.idempotency_keys`: the stored responses of authenticated mutations sent with an
//! `Idempotency-Key`.
//!
//! A key is taken, its request processed and its response stored in one transaction: if the
//! process or its connection dies first, all three roll back together and nothing is left "in
//! progress". While that transaction runs, a transaction-level advisory lock on the key tells a
//! concurrent duplicate that the key is busy, without making it wait.

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredKey {
    pub method: String,
    /// SHA-256 of the path and query; `None` on keys stored before paths were hashed.
    pub path_hash: Option<Vec<u8>>,
    pub request_hash: Vec<u8>,
    /// `None` only on a key a previous version committed before processing its request.
    pub status: Option<i16>,
    pub response_headers: Option<serde_json::Value>,
    pub response_body: Option<Vec<u8>>,
}

/// The key a request asks for.
#[derive(Debug, Clone, Copy)]
pub struct KeyRequest<'a> {
    /// The authenticated user's id.
    pub principal: &'a str,
    pub key: &'a str,
    pub method: &'a str,
    pub path_hash: &'a [u8],
    /// SHA-256 over method, path and body: the same key with another request is refused.
    pub request_hash: &'a [u8],
    pub expires_at: OffsetDateTime,
    /// How long a key a previous version committed "in progress" (before it processed the
    /// request) holds before a retry takes it over: the longest a request can run.
    pub lease: Duration,
}

/// What happened when a request tried to take its key.
#[derive(Debug)]
pub enum Taken {
    /// The key is the request's, in the caller's transaction: the caller processes the request,
    /// stores the response with [`complete`] and commits, all in that transaction.
    Started,
    /// Another request with this key is running.
    Busy,
    /// The key was used before: its stored request and response.
    Existing(StoredKey),
}

/// Takes `request`'s key in the transaction `conn` is in. An expired key is replaced as if it
/// were new.
pub async fn take(conn: &mut PgConnection, request: &KeyRequest<'_>) -> Result<Taken, sqlx::Error> {
    let (locked, started): (bool, bool) = sqlx::query_as(
        "WITH lock AS (
             SELECT pg_try_advisory_xact_lock(hashtextextended($1 || E'\\n' || $2, 0)) AS got
         ), taken AS (
             INSERT INTO ops.idempotency_keys (principal, key, method, path_hash, request_hash, expires_at)
             SELECT $1, $2, $3, $4, $5, $6 FROM lock WHERE lock.got
             ON CONFLICT (principal, key) DO UPDATE SET method = EXCLUDED.method, path = DEFAULT,
                 path_hash = EXCLUDED.path_hash, request_hash = EXCLUDED.request_hash, status = NULL,
                 response_headers = NULL, response_body = NULL, created_at = now(), expires_at = EXCLUDED.expires_at
             WHERE ops.idempotency_keys.expires_at <= now()
                OR (ops.idempotency_keys.status IS NULL AND ops.idempotency_keys.created_at <= now() - $7::interval)
             RETURNING 1
         )
         SELECT lock.got, EXISTS (SELECT 1 FROM taken) FROM lock",
    )
    .bind(request.principal)
    .bind(request.key)
    .bind(request.method)
    .bind(request.path_hash)
    .bind(request.request_hash)
    .bind(request.expires_at)
    .bind(request.lease)
    .fetch_one(&mut *conn)
    .await?;
    if !locked {
        return Ok(Taken::Busy);
    }
    if started {
        return Ok(Taken::Started);
    }
    match find(&mut *conn, request.principal, request.key).await? {
        Some(stored) if stored.status.is_some() => Ok(Taken::Existing(stored)),
        // A previous version's key, still within its lease; or gone since (pruned): busy for
        // this attempt either way.
        _ => Ok(Taken::Busy),
    }
}

/// The stored key, if any.
pub async fn find(db: impl PgExecutor<'_>, principal: &str, key: &str) -> Result<Option<StoredKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT method, path_hash, request_hash, status, response_headers, response_body
         FROM ops.idempotency_keys WHERE principal = $1 AND key = $2",
    )
    .bind(principal)
    .bind(key)
    .fetch_optional(db)
    .await
}

/// Stores the response of a key taken with [`take`], in the same transaction.
pub async fn complete(
    conn: &mut PgConnection,
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
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes up to `batch` expired keys; returns how many.
pub async fn prune_expired(db: impl PgExecutor<'_>, batch: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM ops.idempotency_keys WHERE (principal, key) IN (
             SELECT principal, key FROM ops.idempotency_keys WHERE expires_at <= now() LIMIT $1)",
    )
    .bind(batch)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// The table's live rows as the statistics count them: exact between vacuums (every insert and
/// delete is counted), an estimate right after one, and free to read at any size.
pub async fn stored_keys(db: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE((SELECT n_live_tup FROM pg_stat_user_tables
                          WHERE schemaname = 'ops' AND relname = 'idempotency_keys'), 0)",
    )
    .fetch_one(db)
    .await
}
