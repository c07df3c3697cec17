//! `security.disputes`.

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::disputes::{DisputeKind, DisputeStatus, Priority};
use trellis_domain::{DisputeId, UserId};
use uuid::Uuid;

use crate::page::Page;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DisputeRow {
    pub id: Uuid,
    pub reporter_id: Uuid,
    pub target_id: Uuid,
    pub kind: String,
    pub priority: i16,
    pub status: String,
    pub description: String,
    pub evidence: Option<String>,
    pub decision_rule: Option<String>,
    pub decision_reasons: Option<serde_json::Value>,
    pub rules_version: Option<String>,
    pub decided_by: Option<Uuid>,
    pub decision_note: Option<String>,
    pub decided_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

const COLUMNS: &str = "id, reporter_id, target_id, kind, priority, status, description, evidence, decision_rule,
    decision_reasons, rules_version, decided_by, decision_note, decided_at, created_at, updated_at";

pub struct NewDispute<'a> {
    pub id: DisputeId,
    pub reporter: UserId,
    pub target: UserId,
    pub kind: DisputeKind,
    pub description: &'a str,
    pub evidence: Option<&'a str>,
}

pub async fn insert(conn: &mut PgConnection, d: &NewDispute<'_>) -> Result<DisputeRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO security.disputes (id, reporter_id, target_id, kind, priority, description, evidence)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    ))
    .bind(d.id.0)
    .bind(d.reporter.0)
    .bind(d.target.0)
    .bind(d.kind.as_str())
    .bind(d.kind.priority().rank())
    .bind(d.description)
    .bind(d.evidence)
    .fetch_one(conn)
    .await
}

pub async fn get(db: impl PgExecutor<'_>, id: DisputeId) -> Result<Option<DisputeRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM security.disputes WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(db)
        .await
}

/// Locks the dispute row for a decision.
pub async fn get_for_update(conn: &mut PgConnection, id: DisputeId) -> Result<Option<DisputeRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM security.disputes WHERE id = $1 FOR UPDATE"))
        .bind(id.0)
        .fetch_optional(conn)
        .await
}

/// Disputes filed by `reporter`, newest first.
pub async fn list_by_reporter(
    db: impl PgExecutor<'_>,
    reporter: UserId,
    before: Option<Uuid>,
    limit: usize,
) -> Result<Page<DisputeRow>, sqlx::Error> {
    let rows: Vec<DisputeRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM security.disputes WHERE reporter_id = $1 AND ($2::uuid IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3"
    ))
    .bind(reporter.0)
    .bind(before)
    .bind(limit as i64 + 1)
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |r| r.id))
}

/// The moderation queue key: priority, then age, then id.
pub type QueueKey = (i16, OffsetDateTime, Uuid);

/// Disputes for moderators, by priority then age, optionally filtered.
pub async fn list_queue(
    db: impl PgExecutor<'_>,
    status: Option<DisputeStatus>,
    priority: Option<Priority>,
    after: Option<QueueKey>,
    limit: usize,
) -> Result<Page<DisputeRow>, sqlx::Error> {
    let (after_priority, after_created, after_id) = match after {
        Some((p, c, i)) => (Some(p), Some(c), Some(i)),
        None => (None, None, None),
    };
    let rows: Vec<DisputeRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM security.disputes
         WHERE ($1::text IS NULL OR status = $1) AND ($2::smallint IS NULL OR priority = $2)
           AND ($3::smallint IS NULL OR (priority, created_at, id) > ($3, $4, $5))
         ORDER BY priority, created_at, id LIMIT $6"
    ))
    .bind(status.map(DisputeStatus::as_str))
    .bind(priority.map(Priority::rank))
    .bind(after_priority)
    .bind(after_created)
    .bind(after_id)
    .bind(limit as i64 + 1)
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |r| (r.priority, r.created_at, r.id)))
}

pub struct Decision<'a> {
    pub status: DisputeStatus,
    pub rule: &'a str,
    pub reasons: serde_json::Value,
    pub rules_version: &'a str,
    pub decided_by: Option<UserId>,
    pub note: Option<&'a str>,
}

pub async fn record_decision(
    conn: &mut PgConnection,
    id: DisputeId,
    d: &Decision<'_>,
) -> Result<DisputeRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE security.disputes SET status = $2, decision_rule = $3, decision_reasons = $4, rules_version = $5,
             decided_by = $6, decision_note = $7, decided_at = now(), updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id.0)
    .bind(d.status.as_str())
    .bind(d.rule)
    .bind(&d.reasons)
    .bind(d.rules_version)
    .bind(d.decided_by.map(|u| u.0))
    .bind(d.note)
    .fetch_one(conn)
    .await
}

/// Applies what an upheld dispute does to its target, in the caller's transaction, and
/// returns the events that describe it:
/// impersonation and harassment suspend the target and revoke their tokens; spam hides them
/// from directory search; incorrect information has no effect beyond the decision.
pub async fn apply_upheld_effects(
    conn: &mut PgConnection,
    dispute: DisputeId,
    kind: DisputeKind,
    target: UserId,
) -> Result<Vec<trellis_domain::events::EventPayload>, sqlx::Error> {
    use trellis_domain::events::{EventPayload, UserSuspended};
    match kind {
        DisputeKind::Impersonation | DisputeKind::Harassment => {
            let was_active: Option<bool> =
                sqlx::query_scalar("SELECT status = 'active' FROM identity.users WHERE id = $1 FOR UPDATE")
                    .bind(target.0)
                    .fetch_optional(&mut *conn)
                    .await?;
            crate::identity::suspend(conn, target).await?;
            Ok(if was_active == Some(true) {
                vec![EventPayload::UserSuspended(UserSuspended {
                    user_id: target,
                    reason: format!("upheld {} dispute", kind.as_str()),
                    dispute_id: Some(dispute),
                })]
            } else {
                Vec::new()
            })
        }
        DisputeKind::Spam => {
            sqlx::query(
                "INSERT INTO security.hidden_users (user_id, dispute_id) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(target.0)
            .bind(dispute.0)
            .execute(conn)
            .await?;
            Ok(Vec::new())
        }
        DisputeKind::IncorrectInfo => Ok(Vec::new()),
    }
}

/// Disputes pending now, and those of them that have been pending for longer than `for_at_least`:
/// when the latter exceeds a depth, the queue has been deeper than it for that whole time.
pub async fn pending_depth(
    db: impl PgExecutor<'_>,
    for_at_least: std::time::Duration,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE created_at < now() - make_interval(secs => $1))
         FROM security.disputes WHERE status = 'pending'",
    )
    .bind(for_at_least.as_secs_f64())
    .fetch_one(db)
    .await
}
