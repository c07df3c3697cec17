//! `ops.dlq_audit` and `ops.dlq_parked`: what on-call did to dead letters, and which of them
//! are parked.

use sqlx::PgExecutor;
use time::OffsetDateTime;
use uuid::Uuid;

pub struct NewAudit<'a> {
    pub id: Uuid,
    /// `replay`, `purge`, `park` or `unpark`.
    pub action: &'a str,
    pub actor: &'a str,
    pub reason: &'a str,
    pub selection: serde_json::Value,
    pub sequences: &'a [i64],
    pub dry_run: bool,
}

pub async fn start(db: impl PgExecutor<'_>, a: &NewAudit<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ops.dlq_audit (id, action, actor, reason, selection, sequences, dry_run)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(a.id)
    .bind(a.action)
    .bind(a.actor)
    .bind(a.reason)
    .bind(&a.selection)
    .bind(a.sequences)
    .bind(a.dry_run)
    .execute(db)
    .await?;
    Ok(())
}

/// Records how many of its dead letters an action has dealt with so far; returns who asked
/// for it to stop, if someone did.
pub async fn progress(db: impl PgExecutor<'_>, id: Uuid, done: i32) -> Result<Option<String>, sqlx::Error> {
    let stop: Option<(Option<String>,)> =
        sqlx::query_as("UPDATE ops.dlq_audit SET done = $2 WHERE id = $1 RETURNING cancel_requested_by")
            .bind(id)
            .bind(done)
            .fetch_optional(db)
            .await?;
    Ok(stop.and_then(|(by,)| by))
}

/// Asks a running action to stop (after the window it is sending). False when it is no longer
/// running.
pub async fn request_cancel(db: impl PgExecutor<'_>, id: Uuid, by: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE ops.dlq_audit SET cancel_requested_by = $2 WHERE id = $1 AND status = 'running' \
         AND cancel_requested_by IS NULL",
    )
    .bind(id)
    .bind(by)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records how it ended: `completed`, `stopped` (by a canary), `cancelled` or `failed`.
pub async fn finish(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: &str,
    outcome: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE ops.dlq_audit SET status = $2, outcome = $3, finished_at = now() WHERE id = $1")
        .bind(id)
        .bind(status)
        .bind(outcome)
        .execute(db)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: Uuid,
    pub action: String,
    pub actor: String,
    pub reason: String,
    pub selection: serde_json::Value,
    pub sequences: Vec<i64>,
    pub dry_run: bool,
    pub status: String,
    pub outcome: Option<serde_json::Value>,
    pub done: i32,
    pub cancel_requested_by: Option<String>,
    pub started_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
}

const COLUMNS: &str = "id, action, actor, reason, selection, sequences, dry_run, status, outcome, done, \
                       cancel_requested_by, started_at, finished_at";

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<AuditRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM ops.dlq_audit WHERE id = $1")).bind(id).fetch_optional(db).await
}

/// The latest actions, newest first.
pub async fn recent(db: impl PgExecutor<'_>, limit: i64) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM ops.dlq_audit ORDER BY started_at DESC LIMIT $1"))
        .bind(limit)
        .fetch_all(db)
        .await
}

/// The actions that touched one dead letter, oldest first.
pub async fn of_sequence(db: impl PgExecutor<'_>, sequence: i64) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM ops.dlq_audit WHERE sequences @> ARRAY[$1]::bigint[] ORDER BY started_at LIMIT 100"
    ))
    .bind(sequence)
    .fetch_all(db)
    .await
}

/// A parked dead letter.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Parked {
    pub sequence: i64,
    pub msg_id: String,
    pub consumer: String,
}

/// Every parked dead letter.
pub async fn parked(db: impl PgExecutor<'_>) -> Result<Vec<Parked>, sqlx::Error> {
    sqlx::query_as("SELECT sequence, msg_id, consumer FROM ops.dlq_parked").fetch_all(db).await
}

/// Parks dead letters (those already parked stay as they are). Returns how many were parked.
pub async fn park(db: impl PgExecutor<'_>, letters: &[Parked], audit_id: Uuid) -> Result<u64, sqlx::Error> {
    let sequences: Vec<i64> = letters.iter().map(|p| p.sequence).collect();
    let msg_ids: Vec<&str> = letters.iter().map(|p| p.msg_id.as_str()).collect();
    let consumers: Vec<&str> = letters.iter().map(|p| p.consumer.as_str()).collect();
    let done = sqlx::query(
        "INSERT INTO ops.dlq_parked (sequence, msg_id, consumer, audit_id)
         SELECT s, m, c, $4 FROM unnest($1::bigint[], $2::text[], $3::text[]) AS t(s, m, c)
         ON CONFLICT (sequence) DO UPDATE SET msg_id = EXCLUDED.msg_id, consumer = EXCLUDED.consumer,
             audit_id = EXCLUDED.audit_id, parked_at = now()
         WHERE ops.dlq_parked.msg_id <> EXCLUDED.msg_id",
    )
    .bind(&sequences)
    .bind(&msg_ids)
    .bind(&consumers)
    .bind(audit_id)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Unparks (or forgets, once purged or replayed) these DLQ sequences. Returns how many rows went.
pub async fn unpark(db: impl PgExecutor<'_>, sequences: &[i64]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM ops.dlq_parked WHERE sequence = ANY($1)").bind(sequences).execute(db).await?;
    Ok(done.rows_affected())
}

/// Records, while a replay goes on, that its canaries were processed without dying again.
pub async fn finish_canary(db: impl PgExecutor<'_>, id: Uuid, passed: usize) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE ops.dlq_audit SET outcome = jsonb_build_object('canaries_passed', $2::bigint) WHERE id = $1")
        .bind(id)
        .bind(passed as i64)
        .execute(db)
        .await?;
    Ok(())
}
