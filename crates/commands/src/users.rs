//! User administration: every change of a user's role, status or verification, each with its
//! event, and (role and status) its row in `identity.user_admin_audit`.
//!
//! The one path for these changes: `POST /v1/admin/users/{user}/reinstate` and `trellisctl
//! users reinstate` both call [`reinstate`], `trellisctl users grant-role` calls [`grant_role`],
//! `trellisctl users verify` calls [`set_verified`], and an upheld dispute's suspension is
//! [`suspend`] (from `disputes::apply_decision`, for a moderator's decision and the processor's
//! alike). Each locks the user's row ([`trellis_store::user_admin::lock`]) before it reads what
//! it changes, and writes its audit row after.

use sqlx::PgConnection;
use time::OffsetDateTime;
use trellis_domain::disputes::DisputeKind;
use trellis_domain::events::{EventPayload, RoleGranted, UserRef, UserSuspended};
use trellis_domain::identity::{AdminAction, AdminReason, Role, UserStatus};
use trellis_domain::{DisputeId, UserId};
use trellis_store::identity::UserRow;
use trellis_store::user_admin::{Actor, AuditRow, Record};

use crate::Emitted;

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no such user")]
    UnknownUser,
    #[error("the user is {}, not suspended: there is nothing to reinstate", .0.as_str())]
    NotSuspended(UserStatus),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Reinstates a suspended user: the status (back to `active`), the audit row and
/// `identity.user_reinstated` (caused by `actor`, at the audit's time). Their tokens stay
/// revoked (the suspension revoked them): they sign in again. A dispute that suspended them
/// stays upheld, and a user hidden from search by an upheld spam dispute stays hidden:
/// reinstatement undoes a suspension, nothing else.
pub async fn reinstate(
    tx: &mut PgConnection,
    user: UserId,
    actor: &Actor<'_>,
    reason: &AdminReason,
) -> Result<Emitted<AuditRow>, AdminError> {
    let locked = trellis_store::user_admin::lock(&mut *tx, user).await?.ok_or(AdminError::UnknownUser)?;
    if locked.status != UserStatus::Suspended {
        return Err(AdminError::NotSuspended(locked.status));
    }
    trellis_store::identity::set_status(&mut *tx, user, UserStatus::Active).await?;
    let record = Record {
        user,
        action: AdminAction::Reinstate,
        from: UserStatus::Suspended.as_str(),
        to: UserStatus::Active.as_str(),
        actor,
        reason: reason.as_str(),
        dispute: None,
    };
    let row = trellis_store::user_admin::record(tx, &record).await?;
    let at = row.acted_at;
    Ok(Emitted::new(row).with(&EventPayload::UserReinstated(UserRef { user_id: user }), actor.user_id, at))
}

/// Gives a user a role: the role, the audit row and `identity.role_granted`. `None` (and no
/// event) when the user already has it: nothing is changed and nothing recorded.
pub async fn grant_role(
    tx: &mut PgConnection,
    user: UserId,
    role: Role,
    actor: &Actor<'_>,
    reason: &AdminReason,
) -> Result<Emitted<Option<AuditRow>>, AdminError> {
    let locked = trellis_store::user_admin::lock(&mut *tx, user).await?.ok_or(AdminError::UnknownUser)?;
    if locked.role == role {
        return Ok(Emitted::new(None));
    }
    trellis_store::identity::set_role(&mut *tx, user, role).await?;
    let record = Record {
        user,
        action: AdminAction::GrantRole,
        from: locked.role.as_str(),
        to: role.as_str(),
        actor,
        reason: reason.as_str(),
        dispute: None,
    };
    let row = trellis_store::user_admin::record(tx, &record).await?;
    let at = row.acted_at;
    let payload = EventPayload::RoleGranted(RoleGranted { user_id: user, role });
    Ok(Emitted::new(Some(row)).with(&payload, actor.user_id, at))
}

/// Marks a user verified (`identity.user_verified`) or not (`identity.user_unverified`).
pub async fn set_verified(tx: &mut PgConnection, user: UserId, verified: bool) -> Result<Emitted<UserRow>, AdminError> {
    let row = trellis_store::identity::set_verified(tx, user, verified).await?.ok_or(AdminError::UnknownUser)?;
    let payload = if verified {
        EventPayload::UserVerified(UserRef { user_id: user })
    } else {
        EventPayload::UserUnverified(UserRef { user_id: user })
    };
    Ok(Emitted::new(row).with(&payload, None, OffsetDateTime::now_utc()))
}

/// Suspends the target of an upheld `kind` dispute and revokes every token they hold, with the
/// audit row (`actor`, `why`) and `identity.user_suspended`. A user who is suspended already is
/// left as they are: nothing is recorded and no event is caused.
pub(crate) async fn suspend(
    tx: &mut PgConnection,
    user: UserId,
    actor: &Actor<'_>,
    why: &str,
    dispute: DisputeId,
    kind: DisputeKind,
) -> Result<Emitted, sqlx::Error> {
    let Some(locked) = trellis_store::user_admin::lock(&mut *tx, user).await? else { return Ok(Emitted::none()) };
    if locked.status != UserStatus::Active {
        return Ok(Emitted::none());
    }
    trellis_store::identity::set_status(&mut *tx, user, UserStatus::Suspended).await?;
    trellis_store::identity::revoke_all_tokens(&mut *tx, user).await?;
    let record = Record {
        user,
        action: AdminAction::Suspend,
        from: UserStatus::Active.as_str(),
        to: UserStatus::Suspended.as_str(),
        actor,
        reason: why,
        dispute: Some(dispute),
    };
    trellis_store::user_admin::record(tx, &record).await?;
    let payload = EventPayload::UserSuspended(UserSuspended {
        user_id: user,
        reason: format!("upheld {} dispute", kind.as_str()),
        dispute_id: Some(dispute),
    });
    Ok(Emitted::none().with(&payload, actor.user_id, OffsetDateTime::now_utc()))
}
