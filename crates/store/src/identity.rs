//! `identity.users` and `identity.tokens`.

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_domain::identity::{Role, UserStatus};
use uuid::Uuid;

use crate::page::Page;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub email: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    #[sqlx(try_from = "String")]
    pub status: UserStatus,
    pub verified: bool,
    pub version: i64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

const USER_COLUMNS: &str = "id, handle, display_name, email, role, status, verified, version, created_at, updated_at";

pub struct NewUser<'a> {
    pub id: UserId,
    pub handle: &'a str,
    pub display_name: &'a str,
    pub email: &'a str,
    pub password_hash: &'a str,
}

pub async fn insert_user(conn: &mut PgConnection, user: &NewUser<'_>) -> Result<UserRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO identity.users (id, handle, display_name, email, password_hash)
         VALUES ($1, $2, $3, $4, $5) RETURNING {USER_COLUMNS}"
    ))
    .bind(user.id.0)
    .bind(user.handle)
    .bind(user.display_name)
    .bind(user.email)
    .bind(user.password_hash)
    .fetch_one(conn)
    .await
}

/// Which of a handle and an e-mail address are already registered: the cheap check before a
/// registration pays for hashing its password (the unique constraints still decide at insert).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub handle: bool,
    pub email: bool,
}

pub async fn taken(db: impl PgExecutor<'_>, handle: &str, email: &str) -> Result<Taken, sqlx::Error> {
    let (handle, email): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM identity.users WHERE handle = $1),
                EXISTS (SELECT 1 FROM identity.users WHERE email = $2)",
    )
    .bind(handle)
    .bind(email)
    .fetch_one(db)
    .await?;
    Ok(Taken { handle, email })
}

pub async fn find_by_id(db: impl PgExecutor<'_>, id: UserId) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM identity.users WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(db)
        .await
}

pub async fn find_by_handle(db: impl PgExecutor<'_>, handle: &str) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM identity.users WHERE handle = $1"))
        .bind(handle)
        .fetch_optional(db)
        .await
}

/// The user and their password hash for a login that is either a handle or an e-mail.
pub async fn find_credentials(db: impl PgExecutor<'_>, login: &str) -> Result<Option<(UserRow, String)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: UserRow,
        password_hash: String,
    }
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {USER_COLUMNS}, password_hash FROM identity.users WHERE handle = $1 OR email = $1 LIMIT 1"
    ))
    .bind(login)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| (r.user, r.password_hash)))
}

pub async fn password_hash(db: impl PgExecutor<'_>, id: UserId) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT password_hash FROM identity.users WHERE id = $1").bind(id.0).fetch_optional(db).await
}

pub struct ProfileChange<'a> {
    pub display_name: Option<&'a str>,
    pub email: Option<&'a str>,
    pub password_hash: Option<&'a str>,
}

pub async fn update_profile(
    conn: &mut PgConnection,
    id: UserId,
    change: &ProfileChange<'_>,
) -> Result<UserRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE identity.users SET
             display_name = COALESCE($2, display_name),
             email = COALESCE($3, email),
             password_hash = COALESCE($4, password_hash),
             version = version + 1,
             updated_at = now()
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id.0)
    .bind(change.display_name)
    .bind(change.email)
    .bind(change.password_hash)
    .fetch_one(conn)
    .await
}

pub async fn set_role(conn: &mut PgConnection, id: UserId, role: Role) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE identity.users SET role = $2, version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id.0)
    .bind(role.as_str())
    .fetch_optional(conn)
    .await
}

pub async fn set_verified(conn: &mut PgConnection, id: UserId, verified: bool) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE identity.users SET verified = $2, version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id.0)
    .bind(verified)
    .fetch_optional(conn)
    .await
}

pub async fn set_status(
    conn: &mut PgConnection,
    id: UserId,
    status: UserStatus,
) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE identity.users SET status = $2, version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id.0)
    .bind(status.as_str())
    .fetch_optional(conn)
    .await
}

/// The condition of a live token `t` (not revoked, not expired, used within the idle timeout
/// bound as `$idle`): every statement that authenticates spells it this way.
macro_rules! live_token {
    ($t:literal, $idle:literal) => {
        concat!(
            $t,
            ".revoked_at IS NULL AND ",
            $t,
            ".expires_at > now() AND ",
            $t,
            ".last_used_at > now() - ",
            $idle,
            "::interval"
        )
    };
}
pub(crate) use live_token;

/// How much longer the live token `t` authenticates by its clocks alone, in seconds: until the
/// earlier of its `expires_at` and its idle timeout (`$idle`) counted from its last use as
/// written down. A cache of the principal may keep it no longer.
macro_rules! live_for {
    ($t:literal, $idle:literal) => {
        concat!(
            "EXTRACT(EPOCH FROM LEAST(",
            $t,
            ".expires_at, ",
            $t,
            ".last_used_at + ",
            $idle,
            "::interval) - now())::float8"
        )
    };
}
pub(crate) use live_for;

/// A bearer token to issue.
pub struct NewToken<'a> {
    /// SHA-256 of the token; the token itself is never stored.
    pub token_hash: &'a [u8],
    pub user_id: UserId,
    pub expires_at: OffsetDateTime,
    /// The address of the client it is issued to (text, as `inet` reads it).
    pub client_addr: Option<&'a str>,
    /// The password hash a sign-in checked: the token is issued only while it is still the
    /// user's, so a sign-in that raced a password change issues nothing.
    pub checked_password_hash: Option<&'a str>,
}

/// When tokens stop authenticating, besides their absolute `expires_at`.
#[derive(Debug, Clone, Copy)]
pub struct TokenLimits {
    /// A token unused for this long no longer authenticates.
    pub idle_timeout: Duration,
    /// Live tokens a user may hold; issuing one more revokes the oldest.
    pub per_user: u32,
}

/// Issues a token to an active user, in one statement: it locks the user's row (so it is
/// ordered with a suspension or a password change of the same user, which revoke tokens) and
/// revokes the user's oldest live tokens beyond `limits.per_user`. `false` when the user is
/// not active, or no longer has the password the sign-in checked.
pub async fn issue_token(
    conn: &mut PgConnection,
    token: &NewToken<'_>,
    limits: TokenLimits,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(concat!(
        "WITH u AS (
             SELECT id FROM identity.users
             WHERE id = $2 AND status = 'active' AND ($5::text IS NULL OR password_hash = $5)
             FOR NO KEY UPDATE
         ), issued AS (
             INSERT INTO identity.tokens (token_hash, user_id, expires_at, client_addr, last_used_at)
             SELECT $1, u.id, $3, $4::inet, now() FROM u
             RETURNING user_id
         ), over_cap AS (
             UPDATE identity.tokens SET revoked_at = now()
             WHERE token_hash IN (
                 SELECT t.token_hash FROM identity.tokens t
                 WHERE t.user_id = (SELECT user_id FROM issued) AND ",
        live_token!("t", "$6"),
        "
                 ORDER BY t.created_at DESC, t.token_hash DESC
                 OFFSET $7 - 1)
         )
         SELECT EXISTS (SELECT 1 FROM issued)"
    ))
    .bind(token.token_hash)
    .bind(token.user_id.0)
    .bind(token.expires_at)
    .bind(token.client_addr)
    .bind(token.checked_password_hash)
    .bind(limits.idle_timeout)
    .bind(i64::from(limits.per_user.max(1)))
    .fetch_one(conn)
    .await
}

/// The principal behind a bearer token: only live tokens of active users count.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Principal {
    pub user_id: Uuid,
    #[sqlx(try_from = "String")]
    pub role: Role,
    /// Seconds the token goes on authenticating by its clocks alone (expiry, idle timeout),
    /// counted from the start of the statement that read it.
    pub live_for_secs: f64,
}

impl Principal {
    /// [`Principal::live_for_secs`] as a duration (zero when it is past, or not a number).
    pub fn live_for(&self) -> Duration {
        Duration::try_from_secs_f64(self.live_for_secs).unwrap_or(Duration::ZERO)
    }
}

pub async fn authenticate(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    idle_timeout: Duration,
) -> Result<Option<Principal>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT u.id AS user_id, u.role, ",
        live_for!("t", "$2"),
        " AS live_for_secs
         FROM identity.tokens t JOIN identity.users u ON u.id = t.user_id
         WHERE t.token_hash = $1 AND ",
        live_token!("t", "$2"),
        " AND u.status = 'active'"
    ))
    .bind(token_hash)
    .bind(idle_timeout)
    .fetch_optional(db)
    .await
}

/// The principal behind a live token and, in the same statement, the user that `target` (an
/// id or a handle) names: one round trip for the writes whose path names a user.
/// `None` when the token does not authenticate; the target is `None` when no user matches.
pub async fn authenticate_with_target(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    idle_timeout: Duration,
    target_id: Option<Uuid>,
    target_handle: Option<&str>,
) -> Result<Option<(Principal, Option<TargetRow>)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        user_id: Uuid,
        #[sqlx(try_from = "String")]
        role: Role,
        live_for_secs: f64,
        target_id: Option<Uuid>,
        target_status: Option<String>,
    }
    let row: Option<Row> = sqlx::query_as(concat!(
        "SELECT p.user_id, p.role, p.live_for_secs, t.id AS target_id, t.status AS target_status
         FROM (SELECT u.id AS user_id, u.role, ",
        live_for!("k", "$4"),
        " AS live_for_secs
               FROM identity.tokens k JOIN identity.users u ON u.id = k.user_id
               WHERE k.token_hash = $1 AND ",
        live_token!("k", "$4"),
        " AND u.status = 'active') p
         LEFT JOIN identity.users t ON t.id = $2 OR t.handle = $3"
    ))
    .bind(token_hash)
    .bind(target_id)
    .bind(target_handle)
    .bind(idle_timeout)
    .fetch_optional(db)
    .await?;
    row.map(|r| {
        let target = match (r.target_id, r.target_status) {
            (Some(id), Some(status)) => {
                let status = status.parse::<UserStatus>().map_err(|e| sqlx::Error::Decode(e.into()))?;
                Some(TargetRow { id, status })
            }
            _ => None,
        };
        Ok((Principal { user_id: r.user_id, role: r.role, live_for_secs: r.live_for_secs }, target))
    })
    .transpose()
}

/// A user named in a path: enough to decide whether the command may go on.
#[derive(Debug, Clone)]
pub struct TargetRow {
    pub id: Uuid,
    pub status: UserStatus,
}

pub async fn revoke_token(db: impl PgExecutor<'_>, token_hash: &[u8]) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("UPDATE identity.tokens SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL")
            .bind(token_hash)
            .execute(db)
            .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn revoke_all_tokens(db: impl PgExecutor<'_>, user_id: UserId) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("UPDATE identity.tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL")
        .bind(user_id.0)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

/// Revokes every token of the user but `keep` (the one the change was made with).
pub async fn revoke_other_tokens(db: impl PgExecutor<'_>, user_id: UserId, keep: &[u8]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE identity.tokens SET revoked_at = now() WHERE user_id = $1 AND token_hash <> $2 AND revoked_at IS NULL",
    )
    .bind(user_id.0)
    .bind(keep)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// A live session: a token as its user sees it (never the token, nor its hash).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub created_at: OffsetDateTime,
    /// Updated at most once a minute, by the API's activity batches.
    pub last_used_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub client_addr: Option<String>,
    /// Whether this is the token the listing request carries.
    pub current: bool,
    /// The page key: not shown to the user.
    pub token_hash: Vec<u8>,
}

/// Where a page of sessions continues: after the session created at `created_at` with this
/// token hash (newest first).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionKey {
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "serde_bytes_hex")]
    pub token_hash: Vec<u8>,
}

mod serde_bytes_hex {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// The user's live sessions, newest first, after `after`.
pub async fn list_sessions(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    current: &[u8],
    idle_timeout: Duration,
    after: Option<&SessionKey>,
    limit: usize,
) -> Result<Page<SessionRow>, sqlx::Error> {
    let rows: Vec<SessionRow> = sqlx::query_as(concat!(
        "SELECT t.created_at, t.last_used_at, t.expires_at, host(t.client_addr) AS client_addr,
                t.token_hash = $2 AS current, t.token_hash
         FROM identity.tokens t
         WHERE t.user_id = $1 AND ",
        live_token!("t", "$3"),
        " AND ($4::timestamptz IS NULL OR (t.created_at, t.token_hash) < ($4, $5))
         ORDER BY t.created_at DESC, t.token_hash DESC
         LIMIT $6"
    ))
    .bind(user_id.0)
    .bind(current)
    .bind(idle_timeout)
    .bind(after.map(|k| k.created_at))
    .bind(after.map(|k| k.token_hash.as_slice()))
    .bind(limit as i64 + 1)
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |r| SessionKey { created_at: r.created_at, token_hash: r.token_hash.clone() }))
}

/// Deletes up to `batch` tokens that can never authenticate again (revoked, expired, or idle
/// past `idle_timeout`); returns how many.
pub async fn prune_tokens(db: impl PgExecutor<'_>, idle_timeout: Duration, batch: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM identity.tokens WHERE token_hash IN (
             SELECT token_hash FROM identity.tokens
             WHERE revoked_at IS NOT NULL OR expires_at <= now() OR last_used_at IS NULL
                OR last_used_at <= now() - $1::interval
             LIMIT $2)",
    )
    .bind(idle_timeout)
    .bind(batch)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
