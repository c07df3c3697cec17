//! `ops.dlq_audit`: what on-call did to dead letters.

use sqlx::PgExecutor;
use uuid::Uuid;

pub struct NewAudit<'a> {
    pub id: Uuid,
    /// `replay` or `purge`.
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

/// Records how it ended: `completed`, `stopped` (e.g. by a canary) or `failed`.
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
    pub sequences: Vec<i64>,
    pub dry_run: bool,
    pub status: String,
    pub outcome: Option<serde_json::Value>,
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<AuditRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, action, actor, reason, sequences, dry_run, status, outcome FROM ops.dlq_audit WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}
