//! Console sessions: sign-in, the session cookie, CSRF tokens, sign-out.

use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse};
use maud::html;
use sha2::{Digest as _, Sha256};
use trellis_domain::UserId;
use trellis_domain::identity::{LOGIN_MAX_LEN, Role, UserStatus, canonical_login};

use super::{ConsoleState, Fields, PageError, PageResult, layout};
use crate::auth::{self, TokenRequest};
use crate::client_address::ClientAddress;
use crate::error::ApiError;
use crate::ratelimit::AccountKey;

/// The session cookie's name.
pub const COOKIE: &str = "trellis_console";

/// A signed-in console user.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: UserId,
    pub handle: String,
    pub role: Role,
    /// The CSRF token every form of this session carries.
    pub csrf: String,
    pub token_hash: [u8; 32],
}

impl Session {
    /// The audit's actor: the signed-in account, never a name the caller types.
    pub fn actor(&self) -> String {
        format!("{} (console)", self.handle)
    }

    /// Operations pages: operators (read-only ones too) and admins.
    pub fn require_view(&self) -> Result<(), PageError> {
        if self.role.can_view_operations() {
            Ok(())
        } else {
            Err(PageError::Forbidden("this page needs the operator, read_only_operator or admin role"))
        }
    }

    /// Actions: operators and admins, never a read-only operator.
    pub fn require_operate(&self) -> Result<(), PageError> {
        if self.role.can_operate() {
            Ok(())
        } else {
            Err(PageError::Forbidden(
                "this action needs the operator or admin role; a read-only operator changes nothing",
            ))
        }
    }

    pub fn require_moderator(&self) -> Result<(), PageError> {
        if self.role.can_moderate() {
            Ok(())
        } else {
            Err(PageError::Forbidden("the moderation queue needs the moderator or admin role"))
        }
    }
}

/// May this role sign in to the console at all?
fn may_use_console(role: Role) -> bool {
    role.can_view_operations() || role.can_moderate()
}

/// The CSRF token of a session: a hash of its token, which only the cookie's holder knows.
fn csrf_token(token: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"trellis console csrf v1\0");
    hasher.update(token.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty() && v.len() <= 256)
}

async fn session_of(state: &ConsoleState, headers: &HeaderMap) -> Result<Option<Session>, PageError> {
    let Some(token) = cookie_token(headers) else { return Ok(None) };
    let token_hash = auth::hash_token(token);
    let idle = state.app.config.console_idle_timeout;
    let Some(found) = trellis_store::identity::authenticate(&state.app.pool, &token_hash, idle).await? else {
        return Ok(None);
    };
    if !may_use_console(found.role) {
        return Ok(None);
    }
    let Some(user) = trellis_store::identity::find_by_id(&state.app.pool, UserId(found.user_id)).await? else {
        return Ok(None);
    };
    state.app.activity.saw(token_hash);
    Ok(Some(Session {
        user_id: UserId(found.user_id),
        handle: user.handle,
        role: found.role,
        csrf: csrf_token(token),
        token_hash,
    }))
}

impl FromRequestParts<ConsoleState> for Session {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &ConsoleState) -> Result<Self, Self::Rejection> {
        session_of(state, &parts.headers).await?.ok_or(PageError::SignIn)
    }
}

/// A POSTed console form of a signed-in session, its CSRF token and origin checked.
pub struct FormPost {
    pub session: Session,
    pub fields: Fields,
}

/// Longest form body the console takes.
const FORM_LIMIT: usize = 64 * 1024;

impl FromRequest<ConsoleState> for FormPost {
    type Rejection = PageError;

    async fn from_request(request: Request, state: &ConsoleState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        check_origin(&parts.headers)?;
        let bytes = axum::body::to_bytes(body, FORM_LIMIT)
            .await
            .map_err(|_| PageError::BadRequest(format!("a console form is at most {FORM_LIMIT} bytes")))?;
        let fields = Fields::parse(&bytes);
        let sent = fields.get("csrf").unwrap_or("");
        if !constant_time_eq(sent.as_bytes(), session.csrf.as_bytes()) {
            return Err(PageError::Forbidden(
                "this form did not come from your console session (missing or stale CSRF token): reload the page and try again",
            ));
        }
        Ok(FormPost { session, fields })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A POST whose `Origin` names another site is refused (browsers send it with every POST).
fn check_origin(headers: &HeaderMap) -> Result<(), PageError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return Ok(()) };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
    if origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(PageError::Forbidden("this form was sent from another site"))
    }
}

/// Over TLS (as the proxy in front says), the cookie is `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn session_cookie(token: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let value =
        format!("{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}", max_age.as_secs());
    HeaderValue::from_str(&value).expect("a token is a header value")
}

fn cleared_cookie() -> HeaderValue {
    HeaderValue::from_str(&format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"))
        .expect("a valid header")
}

fn sign_in_form(message: Option<&str>, login: &str) -> maud::Markup {
    layout(
        None,
        None,
        "Sign in",
        false,
        html! {
            div.sign-in {
                h1 { "Sign in to the Trellis console" }
                @if let Some(m) = message {
                    p.notice.bad role="alert" { (m) }
                }
                form method="post" action="/console/sign-in" {
                    label for="login" { "Handle or e-mail" }
                    input id="login" name="login" type="text" autocomplete="username" required value=(login);
                    label for="password" { "Password" }
                    input id="password" name="password" type="password" autocomplete="current-password" required;
                    p { button.primary type="submit" { "Sign in" } }
                }
                p.muted { "For operators, read-only operators, moderators and admins." }
            }
        },
    )
}

pub async fn sign_in_page(State(state): State<ConsoleState>, headers: HeaderMap) -> PageResult {
    if session_of(&state, &headers).await?.is_some() {
        return super::see_other("/console");
    }
    super::page(sign_in_form(None, ""))
}

fn refused(status: StatusCode, message: &str, login: &str) -> PageResult {
    Ok((status, Html(sign_in_form(Some(message), login).into_string())).into_response())
}

/// Signs in: the same checks, limits and hashing slots as `POST /v1/sessions`, and the role.
pub async fn sign_in(State(state): State<ConsoleState>, request: Request) -> PageResult {
    let (mut parts, body) = request.into_parts();
    check_origin(&parts.headers)?;
    let client = ClientAddress::from_request_parts(&mut parts, &state.app).await.map_err(|_| PageError::SignIn)?;
    let bytes =
        axum::body::to_bytes(body, FORM_LIMIT).await.map_err(|_| PageError::BadRequest("form too large".into()))?;
    let fields = Fields::parse(&bytes);
    let raw_login = fields.get("login").unwrap_or("");
    let password = fields.0.iter().find(|(k, _)| k == "password").map(|(_, v)| v.clone()).unwrap_or_default();
    if raw_login.chars().count() > LOGIN_MAX_LEN {
        return refused(StatusCode::UNPROCESSABLE_ENTITY, "That login is too long.", "");
    }
    let login = canonical_login(raw_login);
    if login.is_empty() || password.is_empty() {
        return refused(StatusCode::UNPROCESSABLE_ENTITY, "Give your handle or e-mail and your password.", raw_login);
    }
    let app = &state.app;
    let limited = |retry: u64| format!("Too many sign-in attempts: try again in {retry} s.");
    if let Err(retry) = app.limiters.login_address.check(&client) {
        return refused(StatusCode::TOO_MANY_REQUESTS, &limited(retry), raw_login);
    }
    let slot = match app.hashing.reserve().await {
        Ok(slot) => slot,
        Err(_) => {
            return refused(StatusCode::SERVICE_UNAVAILABLE, "Too busy to check passwords: try again.", raw_login);
        }
    };
    let found = trellis_store::identity::find_credentials(&app.pool, &login).await?;
    let account = match &found {
        Some((user, _)) => AccountKey::User(user.id),
        None => AccountKey::login(&login),
    };
    if let Err(retry) = app.limiters.login_account.check(&account) {
        return refused(StatusCode::TOO_MANY_REQUESTS, &limited(retry), raw_login);
    }
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    let valid = match app.hashing.verify_password_in(slot, password, hash.clone()).await {
        Ok(valid) => valid,
        Err(ApiError::Overloaded { .. }) => {
            return refused(StatusCode::SERVICE_UNAVAILABLE, "Too busy to check passwords: try again.", raw_login);
        }
        Err(_) => return Err(PageError::Unavailable("the password check failed; try again".into())),
    };
    let user = match user {
        Some(user) if valid && user.status == UserStatus::Active => user,
        _ => return refused(StatusCode::UNAUTHORIZED, "Wrong login or password.", raw_login),
    };
    if !may_use_console(user.role) {
        return refused(
            StatusCode::FORBIDDEN,
            "This account may not use the console: it needs the operator, read_only_operator, moderator or admin role.",
            raw_login,
        );
    }
    let ttl = app.config.console_session_ttl;
    let mut conn = app.pool.acquire().await?;
    let request =
        TokenRequest { user: UserId(user.id), client_addr: client.ip(), checked_password_hash: hash.as_deref() };
    let Some(issued) = auth::issue_token_for(&mut conn, &app.config, &request, ttl).await? else {
        return refused(StatusCode::UNAUTHORIZED, "Wrong login or password.", raw_login);
    };
    tracing::info!(user = %user.id, role = user.role.as_str(), "console: signed in");
    let cookie = session_cookie(&issued.token, ttl, over_tls(&parts.headers));
    Ok((
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, cookie), (header::LOCATION, HeaderValue::from_static("/console"))],
    )
        .into_response())
}

/// Signs out: revokes the session's token and clears the cookie.
pub async fn sign_out(State(state): State<ConsoleState>, form: FormPost) -> PageResult {
    trellis_store::identity::revoke_token(&state.app.pool, &form.session.token_hash).await?;
    state.app.token_cache.evict(crate::token_cache::Evict::Token(form.session.token_hash));
    Ok((
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, cleared_cookie()), (header::LOCATION, HeaderValue::from_static("/console/sign-in"))],
    )
        .into_response())
}
