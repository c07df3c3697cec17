//! `ops.feature_flags` and its audit: the cutover flags.

use sqlx::{PgExecutor, PgPool};
use time::OffsetDateTime;
use trellis_domain::flags::{Executor, Flag};

/// The channel a change is announced on (the payload is the flag's name). Announcements wake
/// the watchers early; their polling is the truth when one is lost.
pub const CHANNEL: &str = "trellis_feature_flags";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagRow {
    pub flag: Flag,
    pub value: Executor,
    /// The executor before the last change: in `shadow`, the primary.
    pub previous: Option<Executor>,
    pub updated_at: OffsetDateTime,
    pub updated_by: String,
}

type Raw = (String, String, Option<String>, OffsetDateTime, String);

fn row((name, value, previous, updated_at, updated_by): Raw) -> Result<FlagRow, sqlx::Error> {
    let bad = |e: trellis_domain::FieldError| sqlx::Error::Decode(e.message.into());
    Ok(FlagRow {
        flag: Flag::parse(&name).map_err(bad)?,
        value: Executor::parse(&value).map_err(bad)?,
        previous: previous.as_deref().map(Executor::parse).transpose().map_err(bad)?,
        updated_at,
        updated_by,
    })
}

/// Every flag, by name.
pub async fn list(db: impl PgExecutor<'_>) -> Result<Vec<FlagRow>, sqlx::Error> {
    let rows: Vec<Raw> = sqlx::query_as(
        "SELECT name, value, previous_value, updated_at, updated_by FROM ops.feature_flags ORDER BY name",
    )
    .fetch_all(db)
    .await?;
    rows.into_iter().map(row).collect()
}

pub async fn get(db: impl PgExecutor<'_>, flag: Flag) -> Result<FlagRow, sqlx::Error> {
    let raw: Raw = sqlx::query_as(
        "SELECT name, value, previous_value, updated_at, updated_by FROM ops.feature_flags WHERE name = $1",
    )
    .bind(flag.as_str())
    .fetch_one(db)
    .await?;
    row(raw)
}

/// A change to make.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub flag: Flag,
    pub value: Executor,
    pub actor: &'a str,
    pub reason: &'a str,
    pub forced: bool,
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub from: Executor,
    pub to: Executor,
}

/// Sets a flag, writes the audit row and announces the change, in one transaction. Setting
/// the value a flag already has changes nothing and writes nothing.
pub async fn set(pool: &PgPool, change: &Change<'_>) -> Result<Changed, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let from: String = sqlx::query_scalar("SELECT value FROM ops.feature_flags WHERE name = $1 FOR UPDATE")
        .bind(change.flag.as_str())
        .fetch_one(&mut *tx)
        .await?;
    let from = Executor::parse(&from).map_err(|e| sqlx::Error::Decode(e.message.into()))?;
    if from == change.value {
        return Ok(Changed { from, to: from });
    }
    sqlx::query(
        "UPDATE ops.feature_flags SET value = $2, previous_value = value, updated_at = now(), updated_by = $3
         WHERE name = $1",
    )
    .bind(change.flag.as_str())
    .bind(change.value.as_str())
    .bind(change.actor)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO ops.feature_flag_audit (name, from_value, to_value, actor, reason, forced)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(change.flag.as_str())
    .bind(from.as_str())
    .bind(change.value.as_str())
    .bind(change.actor)
    .bind(change.reason)
    .bind(change.forced)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(change.flag.as_str()).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Changed { from, to: change.value })
}

/// One audited change.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub name: String,
    pub from_value: String,
    pub to_value: String,
    pub actor: String,
    pub reason: String,
    pub forced: bool,
    pub changed_at: OffsetDateTime,
}

/// The newest `limit` changes of `flag` (of every flag with `None`), newest first.
pub async fn audit(db: impl PgExecutor<'_>, flag: Option<Flag>, limit: i64) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, from_value, to_value, actor, reason, forced, changed_at FROM ops.feature_flag_audit
         WHERE $1::text IS NULL OR name = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(flag.map(Flag::as_str))
    .bind(limit)
    .fetch_all(db)
    .await
}
