//! User administration (`identity.user_admin_audit`): the audit of every change of a user's
//! role or status (who, why, from, to), and the row lock those changes take. The changes
//! themselves, with their audit rows and events, are the commands of
//! `trellis_commands::users` (role grants, reinstatements, suspensions by upheld disputes).
//!
//! Each change locks the user's row ([`lock`]) before it reads what it changes, and writes its
//! audit row after, so one user's audit rows are in the order their changes committed. The
//! dispute processor's shadow candidate relies on that (`shadow_disputes::gather_facts_as_of`).

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::identity::{AdminAction, Role, UserStatus};
use trellis_domain::{DisputeId, UserId};
use uuid::Uuid;

/// Who makes a change, for the audit.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    /// An admin's or a moderator's handle (API), an operator's name (`trellisctl`), or a
    /// process ([`DISPUTE_PROCESSOR`]).
    pub name: &'a str,
    /// The acting user, when a user acted through the API.
    pub user_id: Option<UserId>,
}

/// The actor of a suspension decided by the adjudication rules.
pub const DISPUTE_PROCESSOR: &str = "dispute-processor";

/// One audited change.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub user_id: Uuid,
    #[sqlx(try_from = "String")]
    pub action: AdminAction,
    /// A role (`grant_role`) or a status (`suspend`, `reinstate`), before and after.
    pub from_value: String,
    pub to_value: String,
    pub actor: String,
    pub actor_id: Option<Uuid>,
    pub reason: String,
    pub dispute_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub acted_at: OffsetDateTime,
}

const AUDIT_COLUMNS: &str = "id, user_id, action, from_value, to_value, actor, actor_id, reason, dispute_id, acted_at";

/// A user's role and status, as read under the row lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    pub role: Role,
    pub status: UserStatus,
}

/// Locks the user's row against any other change of it until the caller's transaction ends
/// (`FOR NO KEY UPDATE`: rows that merely reference the user, such as a new contact or a new
/// dispute against them, do not wait) and returns their role and status; `None` when there is
/// no such user. Whoever decides a dispute reads its target's role under this lock, so that no
/// role change can commit between that check and the decision's commit.
pub async fn lock(conn: &mut PgConnection, user: UserId) -> Result<Option<Locked>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(try_from = "String")]
        role: Role,
        #[sqlx(try_from = "String")]
        status: UserStatus,
    }
    let row: Option<Row> = sqlx::query_as("SELECT role, status FROM identity.users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(user.0)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|r| Locked { role: r.role, status: r.status }))
}

/// The audit row of a change the caller has just made under the user's row lock.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub user: UserId,
    pub action: AdminAction,
    /// A role (`grant_role`) or a status (`suspend`, `reinstate`), before and after.
    pub from: &'a str,
    pub to: &'a str,
    pub actor: &'a Actor<'a>,
    pub reason: &'a str,
    /// The upheld dispute of a suspension.
    pub dispute: Option<DisputeId>,
}

/// Writes the audit row of a change made in the caller's transaction, after the change.
pub async fn record(conn: &mut PgConnection, r: &Record<'_>) -> Result<AuditRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO identity.user_admin_audit (user_id, action, from_value, to_value, actor, actor_id, reason, dispute_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {AUDIT_COLUMNS}"
    ))
    .bind(r.user.0)
    .bind(r.action.as_str())
    .bind(r.from)
    .bind(r.to)
    .bind(r.actor.name)
    .bind(r.actor.user_id.map(|u| u.0))
    .bind(r.reason)
    .bind(r.dispute.map(|d| d.0))
    .fetch_one(conn)
    .await
}

/// The audited changes, newest first: of one user, or of every user.
pub async fn history(db: impl PgExecutor<'_>, user: Option<UserId>, limit: i64) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {AUDIT_COLUMNS} FROM identity.user_admin_audit WHERE ($1::uuid IS NULL OR user_id = $1)
         ORDER BY id DESC LIMIT $2"
    ))
    .bind(user.map(|u| u.0))
    .bind(limit)
    .fetch_all(db)
    .await
}
