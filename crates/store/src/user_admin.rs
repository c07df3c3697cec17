//! User administration (`identity.user_admin_audit`): every change of a user's role or status,
//! made in one transaction with its audit row (who, why, from, to) and its event, written
//! through the outbox. This is the one path for these changes: `POST
//! /v1/admin/users/{user}/reinstate` and `trellisctl users reinstate` both call [`reinstate`],
//! `trellisctl users grant-role` calls [`grant_role`], and an upheld dispute's suspension is
//! recorded by [`record_suspension`] (from `disputes::apply_upheld_effects`).
//!
//! Each change locks the user's row before it reads what it changes, and writes its audit row
//! after, so one user's audit rows are in the order their changes committed. The dispute
//! processor's shadow candidate relies on that (`disputes::gather_facts` with `as_of`).

use sqlx::{PgConnection, PgExecutor, PgPool};
use time::OffsetDateTime;
use trellis_domain::events::{Event, EventPayload, RoleGranted, UserRef};
use trellis_domain::identity::{AdminReason, Role};
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
    /// `grant_role`, `suspend` or `reinstate`.
    pub action: String,
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

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no such user")]
    UnknownUser,
    #[error("the user is {0}, not suspended: there is nothing to reinstate")]
    NotSuspended(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A user's role and status, as read under the row lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    pub role: Role,
    /// `active` or `suspended`.
    pub status: String,
}

/// Locks the user's row against any other change of it until the caller's transaction ends
/// (`FOR NO KEY UPDATE`: rows that merely reference the user, such as a new contact or a new
/// dispute against them, do not wait) and returns their role and status; `None` when there is
/// no such user. Whoever decides a dispute reads its target's role under this lock, so that no
/// role change can commit between that check and the decision's commit.
pub async fn lock(conn: &mut PgConnection, user: UserId) -> Result<Option<Locked>, sqlx::Error> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT role, status FROM identity.users WHERE id = $1 FOR NO KEY UPDATE")
            .bind(user.0)
            .fetch_optional(conn)
            .await?;
    row.map(|(role, status)| {
        let role = role.parse::<Role>().map_err(|e| sqlx::Error::Decode(e.into()))?;
        Ok(Locked { role, status })
    })
    .transpose()
}

/// The audit row of a change the caller has just made under the user's row lock.
struct Record<'a> {
    user: UserId,
    action: &'static str,
    from: &'a str,
    to: &'a str,
    actor: &'a Actor<'a>,
    reason: &'a str,
    dispute: Option<DisputeId>,
}

async fn insert_audit(conn: &mut PgConnection, r: &Record<'_>) -> Result<AuditRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO identity.user_admin_audit (user_id, action, from_value, to_value, actor, actor_id, reason, dispute_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {AUDIT_COLUMNS}"
    ))
    .bind(r.user.0)
    .bind(r.action)
    .bind(r.from)
    .bind(r.to)
    .bind(r.actor.name)
    .bind(r.actor.user_id.map(|u| u.0))
    .bind(r.reason)
    .bind(r.dispute.map(|d| d.0))
    .fetch_one(conn)
    .await
}

/// Reinstates a suspended user, in one transaction: the status (back to `active`), the audit
/// row and the `identity.user_reinstated` event. Their tokens stay revoked (the suspension
/// revoked them): they sign in again. A dispute that suspended them stays upheld, and a user
/// hidden from search by an upheld spam dispute stays hidden: reinstatement undoes a
/// suspension, nothing else.
pub async fn reinstate(
    pool: &PgPool,
    user: UserId,
    actor: &Actor<'_>,
    reason: &AdminReason,
) -> Result<AuditRow, AdminError> {
    let mut tx = pool.begin().await?;
    let locked = lock(&mut tx, user).await?.ok_or(AdminError::UnknownUser)?;
    if locked.status != "suspended" {
        return Err(AdminError::NotSuspended(locked.status));
    }
    crate::identity::reinstate(&mut tx, user).await?;
    let record = Record {
        user,
        action: "reinstate",
        from: "suspended",
        to: "active",
        actor,
        reason: reason.as_str(),
        dispute: None,
    };
    let row = insert_audit(&mut tx, &record).await?;
    let event = Event::new(&EventPayload::UserReinstated(UserRef { user_id: user }), actor.user_id, row.acted_at);
    crate::outbox::insert(&mut tx, &[event]).await?;
    tx.commit().await?;
    Ok(row)
}

/// Gives a user a role, in one transaction: the role, the audit row and the
/// `identity.role_granted` event. `None` when the user already has it: nothing is changed and
/// nothing recorded.
pub async fn grant_role(
    pool: &PgPool,
    user: UserId,
    role: Role,
    actor: &Actor<'_>,
    reason: &AdminReason,
) -> Result<Option<AuditRow>, AdminError> {
    let mut tx = pool.begin().await?;
    let locked = lock(&mut tx, user).await?.ok_or(AdminError::UnknownUser)?;
    if locked.role == role {
        return Ok(None);
    }
    crate::identity::set_role(&mut tx, user, role.as_str()).await?;
    let record = Record {
        user,
        action: "grant_role",
        from: locked.role.as_str(),
        to: role.as_str(),
        actor,
        reason: reason.as_str(),
        dispute: None,
    };
    let row = insert_audit(&mut tx, &record).await?;
    let payload = EventPayload::RoleGranted(RoleGranted { user_id: user, role: role.as_str().into() });
    crate::outbox::insert(&mut tx, &[Event::new(&payload, actor.user_id, row.acted_at)]).await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// Records the suspension of an active user by an upheld dispute, in the caller's transaction,
/// which has locked the user's row and suspended them (the caller writes the event).
pub(crate) async fn record_suspension(
    conn: &mut PgConnection,
    user: UserId,
    actor: &Actor<'_>,
    reason: &str,
    dispute: DisputeId,
) -> Result<AuditRow, sqlx::Error> {
    let record =
        Record { user, action: "suspend", from: "active", to: "suspended", actor, reason, dispute: Some(dispute) };
    insert_audit(conn, &record).await
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
