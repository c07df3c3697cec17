//! Accounts: registration and profile changes (`identity.users`).

use sqlx::PgConnection;
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_domain::events::{EventPayload, ProfileUpdated, UserRegistered};
use trellis_domain::identity::{DisplayName, Email, Handle};
use trellis_store::identity::{NewUser, UserRow};

use crate::Emitted;

/// A new account, validated; its password already hashed.
#[derive(Debug, Clone, Copy)]
pub struct NewAccount<'a> {
    pub id: UserId,
    pub handle: &'a Handle,
    pub display_name: &'a DisplayName,
    pub email: &'a Email,
    pub password_hash: &'a str,
}

/// Why an account was not created.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the handle is taken")]
    HandleTaken,
    #[error("the e-mail address is registered")]
    EmailTaken,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Creates the account: `identity.user_registered`, caused by the new user.
pub async fn register(tx: &mut PgConnection, r: &NewAccount<'_>) -> Result<Emitted<UserRow>, RegisterError> {
    let new = NewUser {
        id: r.id,
        handle: r.handle.as_str(),
        display_name: r.display_name.as_str(),
        email: r.email.as_str(),
        password_hash: r.password_hash,
    };
    let user = trellis_store::identity::insert_user(tx, &new).await.map_err(|e| {
        match trellis_store::violated_constraint(&e) {
            Some("users_handle_key") => RegisterError::HandleTaken,
            Some("users_email_key") => RegisterError::EmailTaken,
            _ => e.into(),
        }
    })?;
    let payload = EventPayload::UserRegistered(UserRegistered {
        user_id: r.id,
        handle: user.handle.clone(),
        display_name: user.display_name.clone(),
    });
    Ok(Emitted::new(user).with(&payload, Some(r.id), OffsetDateTime::now_utc()))
}

/// What a user changes of their own account (at least one of them); the caller has checked
/// their current password for a new e-mail address or password, and hashed the new password.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProfileChange<'a> {
    pub display_name: Option<&'a DisplayName>,
    pub email: Option<&'a Email>,
    pub password_hash: Option<&'a str>,
}

/// Why a profile change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("the e-mail address belongs to another account")]
    EmailUnavailable,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Changes the user's profile: `identity.profile_updated` (with the new display name, and
/// whether the e-mail address changed, never the address). A new e-mail address or password
/// signs out every other session: every token of the user but `keep_token` (the one the change
/// was made with) is revoked.
pub async fn update_profile(
    tx: &mut PgConnection,
    user: UserId,
    change: &ProfileChange<'_>,
    keep_token: &[u8],
) -> Result<Emitted<UserRow>, ProfileError> {
    let stored = trellis_store::identity::ProfileChange {
        display_name: change.display_name.map(DisplayName::as_str),
        email: change.email.map(Email::as_str),
        password_hash: change.password_hash,
    };
    let row = trellis_store::identity::update_profile(&mut *tx, user, &stored).await.map_err(|e| {
        match trellis_store::violated_constraint(&e) {
            Some("users_email_key") => ProfileError::EmailUnavailable,
            _ => e.into(),
        }
    })?;
    if change.email.is_some() || change.password_hash.is_some() {
        trellis_store::identity::revoke_other_tokens(&mut *tx, user, keep_token).await?;
    }
    let payload = EventPayload::ProfileUpdated(ProfileUpdated {
        user_id: user,
        display_name: change.display_name.map(|d| d.as_str().to_owned()),
        email_changed: change.email.is_some(),
    });
    Ok(Emitted::new(row).with(&payload, Some(user), OffsetDateTime::now_utc()))
}
