//! `identity.users` and `identity.tokens`.

use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use trellis_domain::UserId;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub email: String,
    pub role: String,
    pub status: String,
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

pub async fn set_role(conn: &mut PgConnection, id: UserId, role: &str) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE identity.users SET role = $2, version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id.0)
    .bind(role)
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

/// Suspends the user and revokes every token they hold.
pub async fn suspend(conn: &mut PgConnection, id: UserId) -> Result<Option<UserRow>, sqlx::Error> {
    let row: Option<UserRow> = sqlx::query_as(&format!(
        "UPDATE identity.users SET status = 'suspended', version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?;
    revoke_all_tokens(conn, id).await?;
    Ok(row)
}

pub async fn reinstate(conn: &mut PgConnection, id: UserId) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE identity.users SET status = 'active', version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id.0)
    .fetch_optional(conn)
    .await
}

pub async fn insert_token(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    user_id: UserId,
    expires_at: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO identity.tokens (token_hash, user_id, expires_at) VALUES ($1, $2, $3)")
        .bind(token_hash)
        .bind(user_id.0)
        .bind(expires_at)
        .execute(db)
        .await?;
    Ok(())
}

/// The principal behind a bearer token: only live tokens of active users count.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Principal {
    pub user_id: Uuid,
    pub role: String,
}

pub async fn authenticate(db: impl PgExecutor<'_>, token_hash: &[u8]) -> Result<Option<Principal>, sqlx::Error> {
    sqlx::query_as(
        "SELECT u.id AS user_id, u.role FROM identity.tokens t JOIN identity.users u ON u.id = t.user_id
         WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND t.expires_at > now() AND u.status = 'active'",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await
}

/// The principal behind a live token and, in the same statement, the user that `target` (an
/// id or a handle) names: one round trip for the writes whose path names a user.
/// `None` when the token does not authenticate; the target is `None` when no user matches.
pub async fn authenticate_with_target(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    target_id: Option<Uuid>,
    target_handle: Option<&str>,
) -> Result<Option<(Principal, Option<TargetRow>)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        user_id: Uuid,
        role: String,
        target_id: Option<Uuid>,
        target_status: Option<String>,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT p.user_id, p.role, t.id AS target_id, t.status AS target_status
         FROM (SELECT u.id AS user_id, u.role FROM identity.tokens k JOIN identity.users u ON u.id = k.user_id
               WHERE k.token_hash = $1 AND k.revoked_at IS NULL AND k.expires_at > now() AND u.status = 'active') p
         LEFT JOIN identity.users t ON t.id = $2 OR t.handle = $3",
    )
    .bind(token_hash)
    .bind(target_id)
    .bind(target_handle)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| {
        let target = match (r.target_id, r.target_status) {
            (Some(id), Some(status)) => Some(TargetRow { id, status }),
            _ => None,
        };
        (Principal { user_id: r.user_id, role: r.role }, target)
    }))
}

/// A user named in a path: enough to decide whether the command may go on.
#[derive(Debug, Clone)]
pub struct TargetRow {
    pub id: Uuid,
    pub status: String,
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
