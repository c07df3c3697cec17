//! Accounts and sessions: `/v1/users`, `/v1/sessions`, `/v1/me`.

use axum::Extension;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use trellis_commands::Emitted;
use trellis_commands::identity::{NewAccount, ProfileChange, ProfileError, RegisterError};
use trellis_domain::identity::{DisplayName, Email, Handle, LOGIN_MAX_LEN, Password, UserStatus, canonical_login};
use trellis_domain::{UserId, ValidationErrors};
use trellis_runtime::config::Secret;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::auth::{self, Principal, TokenRequest};
use crate::client_address::ClientAddress;
use crate::error::{ApiError, ApiResult, Json, Path, Problem, Query};
use crate::ratelimit::AccountKey;
use crate::read_replicas::{AnonymousWrite, Reader};
use crate::routes::{list, page, resolve_user};
use crate::token_cache::Evict;
use crate::unit_of_work::UnitOfWork;
use crate::views::{List, Me, PageParams, PublicUser, SessionView};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login, sign_out_everywhere))
        .routes(routes!(logout))
        .routes(routes!(list_sessions))
        .routes(routes!(get_me, update_me))
        .routes(routes!(get_user))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Registration {
    pub handle: String,
    pub display_name: String,
    pub email: String,
    #[schema(value_type = String, format = Password)]
    pub password: Secret,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    pub user: Me,
    /// Bearer token for `Authorization: Bearer …`.
    pub token: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Registers a user and signs them in.
///
/// Anyone may call it. It is rate-limited per client address (`REGISTRATION_RATE_PER_ADDRESS`
/// per hour) and for everyone together (`REGISTRATION_RATE_GLOBAL` per minute), answering 429
/// with `Retry-After`; it checks that the handle and e-mail address are free before it hashes
/// the password, and the hashing waits for a slot (`PASSWORD_HASH_CONCURRENCY`, with a queue of
/// `PASSWORD_HASH_QUEUE`), answering 503 with `Retry-After` when none is free. A taken handle is
/// `handle-taken` (handles are public); a taken e-mail address is the generic
/// `registration-refused`, which does not say that the address has an account.
/// `Idempotency-Key` is ignored here: a client that lost the response signs in with the
/// password it chose (a second registration is a 409).
#[utoipa::path(post, path = "/v1/users", tag = "identity", request_body = Registration,
    responses((status = 201, body = Registered), (status = 409, body = Problem), (status = 422, body = Problem),
        (status = 429, body = Problem), (status = 503, body = Problem)))]
async fn register(
    State(state): State<AppState>,
    client: ClientAddress,
    work: UnitOfWork,
    Json(body): Json<Registration>,
) -> ApiResult<Response> {
    let mut errors = ValidationErrors::default();
    let handle = errors.check(Handle::parse(&body.handle));
    let display_name = errors.check(DisplayName::parse(&body.display_name));
    let email = errors.check(Email::parse(&body.email));
    let password = errors.check(Password::parse(body.password.expose()));
    let (Some(handle), Some(display_name), Some(email), Some(password)) = (handle, display_name, email, password)
    else {
        return Err(errors.into());
    };
    state.limiters.check_registration(client).map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })?;
    let taken = trellis_store::identity::taken(&state.pool, handle.as_str(), email.as_str()).await?;
    if taken.handle {
        return Err(handle_taken());
    }
    if taken.email {
        return Err(registration_refused());
    }
    let password_hash = state.hashing.hash_password(password).await?;
    let id = UserId::new();
    let mut tx = work.begin().await?;
    let account =
        NewAccount { id, handle: &handle, display_name: &display_name, email: &email, password_hash: &password_hash };
    let registered = trellis_commands::identity::register(&mut tx, &account).await.map_err(|e| match e {
        RegisterError::HandleTaken => handle_taken(),
        RegisterError::EmailTaken => registration_refused(),
        RegisterError::Database(e) => e.into(),
    })?;
    let token = TokenRequest { user: id, client_addr: client.ip(), checked_password_hash: None };
    let issued = auth::issue_token(&mut tx, &state.config, &token)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("the user just registered was refused a token")))?;
    let user = work.finish(tx, registered).await?;
    let location = format!("/v1/users/{id}");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Extension(AnonymousWrite),
        Json(Registered { user: user.into(), token: issued.token, expires_at: issued.expires_at }),
    )
        .into_response())
}

fn handle_taken() -> ApiError {
    ApiError::conflict("handle-taken", "that handle is already taken")
}

/// The one answer for an e-mail address that is already registered: it names neither the
/// address nor an account.
fn registration_refused() -> ApiError {
    ApiError::conflict(
        "registration-refused",
        "these details cannot be used to register; if you have an account, sign in or reset its password",
    )
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Login {
    /// Handle or e-mail address, at most 254 characters.
    pub login: String,
    #[schema(value_type = String, format = Password)]
    pub password: Secret,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    pub user_id: uuid::Uuid,
    pub token: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Signs in with a handle or e-mail and a password.
///
/// Anyone may call it. In order: a `login` longer than 254 characters is a 422; the client
/// address's allowance (`LOGIN_RATE_PER_ADDRESS` per minute) is checked, then the account's
/// (`LOGIN_RATE_PER_ACCOUNT` per minute: the user's when the login names one, so that a handle
/// and an e-mail address of one user share it; the login name's otherwise), each answering 429
/// with `Retry-After`; the password check waits for a hashing slot and answers 503 with
/// `Retry-After` when none is free. Each sign-in issues a new token; a user holding
/// `TOKENS_PER_USER` live tokens (20) loses the oldest. `Idempotency-Key` is ignored here: every
/// request is a sign-in with all its checks, never a replay.
#[utoipa::path(post, path = "/v1/sessions", tag = "identity", request_body = Login,
    responses((status = 201, body = Session), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem), (status = 503, body = Problem)))]
async fn login(
    State(state): State<AppState>,
    client: ClientAddress,
    work: UnitOfWork,
    Json(body): Json<Login>,
) -> ApiResult<Response> {
    // Bounded before anything else looks at it: the login becomes a limiter key and a query.
    if body.login.chars().count() > LOGIN_MAX_LEN {
        return Err(trellis_domain::FieldError::new("login", "too_long", "must be at most 254 characters").into());
    }
    let login = canonical_login(&body.login);
    if login.is_empty() {
        return Err(trellis_domain::FieldError::new("login", "required", "must not be empty").into());
    }
    // A refused address inserts no account key.
    state
        .limiters
        .login_address
        .check(&client)
        .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })?;
    // The password check's slot comes before the account lookup: when hashing is saturated, a
    // sign-in flood is answered 503 without a query each.
    let slot = state.hashing.reserve().await?;
    let found = trellis_store::identity::find_credentials(&state.pool, &login).await?;
    let account = match &found {
        Some((user, _)) => AccountKey::User(user.id),
        None => AccountKey::login(&login),
    };
    state
        .limiters
        .login_account
        .check(&account)
        .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })?;
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    let valid = state.hashing.verify_password_in(slot, body.password.into_exposed(), hash.clone()).await?;
    let user = match user {
        Some(user) if valid => user,
        _ => return Err(ApiError::Unauthenticated),
    };
    if user.status != UserStatus::Active {
        return Err(ApiError::Forbidden("this account is suspended"));
    }
    let user_id = UserId(user.id);
    // The reads and the password check above hold no connection (a sign-in never holds an
    // idempotency key, so its unit of work begins only now). The token is issued only if the
    // password checked is still the user's and they are still active: a sign-in that raced a
    // password change or a suspension issues nothing.
    let mut tx = work.begin().await?;
    let token = TokenRequest { user: user_id, client_addr: client.ip(), checked_password_hash: hash.as_deref() };
    let issued = auth::issue_token(&mut tx, &state.config, &token).await?.ok_or(ApiError::Unauthenticated)?;
    work.finish(tx, Emitted::none()).await?;
    let session = Session { user_id: user.id, token: issued.token, expires_at: issued.expires_at };
    Ok((StatusCode::CREATED, Extension(AnonymousWrite), Json(session)).into_response())
}

/// Signs out everywhere: revokes every token of the caller, the one of this request included.
/// Callers: any signed-in user, for themselves; an anonymous caller gets a 401 and costs one
/// token lookup. A retry with the request's `Idempotency-Key` is a 401 too, since the token is
/// gone.
#[utoipa::path(delete, path = "/v1/sessions", tag = "identity", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem)))]
async fn sign_out_everywhere(principal: Principal, work: UnitOfWork) -> ApiResult<StatusCode> {
    let mut tx = work.begin().await?;
    trellis_store::identity::revoke_all_tokens(&mut *tx, principal.user_id).await?;
    work.evict_after_commit(Evict::User(principal.user_id));
    work.finish(tx, Emitted::none()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's live sessions (tokens that still authenticate), newest first, cursor-paginated
/// (`limit` 1–100, default 50). A user holds at most `TOKENS_PER_USER` (20) of them, so a page
/// reads at most that many rows. Callers: any signed-in user, for themselves; an anonymous caller
/// gets a 401 and costs one token lookup.
#[utoipa::path(get, path = "/v1/me/sessions", tag = "identity", security(("bearer" = [])), params(PageParams),
    responses((status = 200, body = List<SessionView>), (status = 400, body = Problem), (status = 401, body = Problem)))]
async fn list_sessions(
    State(state): State<AppState>,
    principal: Principal,
    Query(params): Query<PageParams>,
) -> ApiResult<Json<List<SessionView>>> {
    let (limit, after) = page::<trellis_store::identity::SessionKey>(&state, "sessions", &params)?;
    let rows = trellis_store::identity::list_sessions(
        &state.pool,
        principal.user_id,
        &principal.token_hash,
        state.config.token_idle_timeout,
        after.as_ref(),
        limit,
    )
    .await?;
    let idle = state.config.token_idle_timeout;
    Ok(Json(list(&state, "sessions", rows, |row| SessionView::new(row, idle))))
}

/// Revokes the token this request is authenticated with.
#[utoipa::path(delete, path = "/v1/sessions/current", tag = "identity", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem)))]
async fn logout(principal: Principal, work: UnitOfWork) -> ApiResult<StatusCode> {
    let mut tx = work.begin().await?;
    trellis_store::identity::revoke_token(&mut *tx, &principal.token_hash).await?;
    work.evict_after_commit(Evict::Token(principal.token_hash));
    work.finish(tx, Emitted::none()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's account.
#[utoipa::path(get, path = "/v1/me", tag = "identity", security(("bearer" = [])),
    responses((status = 200, body = Me), (status = 401, body = Problem)))]
async fn get_me(reader: Reader) -> ApiResult<Json<Me>> {
    let user = trellis_store::identity::find_by_id(reader.pool(), reader.principal.user_id)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    Ok(Json(user.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MeChange {
    pub display_name: Option<String>,
    pub email: Option<String>,
    /// A new password; needs `current_password`.
    #[schema(value_type = Option<String>, format = Password)]
    pub password: Option<Secret>,
    /// Required to change the e-mail address or the password.
    #[schema(value_type = Option<String>, format = Password)]
    pub current_password: Option<Secret>,
}

/// Changes the caller's display name, e-mail or password.
///
/// Changing the e-mail address or the password checks `current_password`: at most
/// `CURRENT_PASSWORD_RATE_PER_USER` checks per user per hour (429 with `Retry-After` beyond),
/// each waiting for a hashing slot (503 with `Retry-After` when none is free). A new e-mail
/// address or password signs out every other session of the caller (their tokens are revoked
/// with the change); the token of this request keeps working.
#[utoipa::path(patch, path = "/v1/me", tag = "identity", security(("bearer" = [])), request_body = MeChange,
    responses((status = 200, body = Me), (status = 401, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem), (status = 503, body = Problem)))]
async fn update_me(
    State(state): State<AppState>,
    principal: Principal,
    work: UnitOfWork,
    Json(body): Json<MeChange>,
) -> ApiResult<Json<Me>> {
    let mut errors = ValidationErrors::default();
    let display_name = body.display_name.as_deref().map(DisplayName::parse).and_then(|r| errors.check(r));
    let email = body.email.as_deref().map(Email::parse).and_then(|r| errors.check(r));
    let password = body.password.as_ref().map(|p| Password::parse(p.expose())).and_then(|r| errors.check(r));
    errors.into_result()?;
    if display_name.is_none() && email.is_none() && password.is_none() {
        return Err(trellis_domain::FieldError::new("body", "empty", "nothing to change").into());
    }
    let credentials_change = email.is_some() || password.is_some();
    // Everything below runs in the unit of work (with an `Idempotency-Key`, the layer holds it
    // already), the password check included.
    let mut tx = work.begin().await?;
    if credentials_change {
        let current = body.current_password.ok_or_else(|| {
            trellis_domain::FieldError::new(
                "current_password",
                "required",
                "is required to change the e-mail address or the password",
            )
        })?;
        state
            .limiters
            .current_password
            .check(&principal.user_id.0)
            .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })?;
        let hash = trellis_store::identity::password_hash(&mut *tx, principal.user_id)
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        if !state.hashing.verify_password(current.into_exposed(), Some(hash)).await? {
            return Err(trellis_domain::FieldError::new("current_password", "incorrect", "is not your password").into());
        }
    }
    let password_hash = match password {
        Some(p) => Some(state.hashing.hash_password(p).await?),
        None => None,
    };
    let change = ProfileChange {
        display_name: display_name.as_ref(),
        email: email.as_ref(),
        password_hash: password_hash.as_deref(),
    };
    if credentials_change {
        // The other tokens are revoked, and a new password notifies every process.
        work.evict_after_commit(Evict::User(principal.user_id));
    }
    let updated =
        trellis_commands::identity::update_profile(&mut tx, principal.user_id, &change, &principal.token_hash)
            .await
            .map_err(|e| match e {
                // The caller proved their password for it, and such checks are limited per user
                // (`CURRENT_PASSWORD_RATE_PER_USER`): the answer may say the address is taken.
                ProfileError::EmailUnavailable => {
                    ApiError::conflict("email-unavailable", "that e-mail address cannot be used")
                }
                ProfileError::Database(e) => e.into(),
            })?;
    let user = work.finish(tx, updated).await?;
    Ok(Json(user.into()))
}

/// A user's public profile, by id or handle.
#[utoipa::path(get, path = "/v1/users/{user}", tag = "identity", security(("bearer" = [])),
    params(("user" = String, Path, description = "user id or handle")),
    responses((status = 200, body = PublicUser), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn get_user(reader: Reader, Path(user): Path<String>) -> ApiResult<Json<PublicUser>> {
    Ok(Json(resolve_user(reader.pool(), &user).await?.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies_print_their_passwords_redacted() {
        let registration: Registration = serde_json::from_value(serde_json::json!({
            "handle": "erin", "display_name": "Erin", "email": "erin@example.com",
            "password": "correct horse battery staple"
        }))
        .unwrap();
        let login: Login =
            serde_json::from_value(serde_json::json!({"login": "erin", "password": "correct horse battery staple"}))
                .unwrap();
        let change: MeChange = serde_json::from_value(serde_json::json!({
            "password": "a brand new password", "current_password": "correct horse battery staple"
        }))
        .unwrap();
        for shown in [format!("{registration:?}"), format!("{login:?}"), format!("{change:?}")] {
            assert!(!shown.contains("correct horse") && !shown.contains("brand new"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
        assert_eq!(login.password.expose(), "correct horse battery staple");
    }
}
