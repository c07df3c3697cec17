//! `ops.feature_flags` and its audit: the cutover flags.

use sqlx::{PgConnection, PgExecutor, PgPool};
use time::OffsetDateTime;
use trellis_domain::flags::{Executor, Flag};
use trellis_domain::shadow::PromotionPolicy;

use crate::cutover as shadow;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub from: Executor,
    pub to: Executor,
    /// Why the promotion gate refused a change that was forced through (recorded as forced).
    pub forced_past: Option<String>,
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The promotion gate refused: the message says why and how to go on.
    #[error("{0}")]
    Refused(String),
}

/// Sets a flag like [`set`], but refuses to promote the worker to executor of a processor (a
/// change to `worker` from `monolith`, or from `shadow` with the monolith as primary) unless
/// the change is forced or the latest shadow period, with the worker as candidate, satisfies
/// `policy`. Rolling back, or going to `shadow`, is never refused. This is the path of
/// operators (`trellisctl flags set`, the admin API).
pub async fn set_checked(pool: &PgPool, change: &Change<'_>, policy: &PromotionPolicy) -> Result<Changed, SetError> {
    let mut tx = pool.begin().await?;
    let changed = apply(&mut tx, change, Some(policy)).await?;
    tx.commit().await?;
    Ok(changed)
}

/// [`set_checked`] in the caller's transaction (the API's unit of work): the change is made
/// when the caller commits.
pub async fn set_checked_in(
    conn: &mut PgConnection,
    change: &Change<'_>,
    policy: &PromotionPolicy,
) -> Result<Changed, SetError> {
    apply(conn, change, Some(policy)).await
}

/// Sets a flag, writes the audit row and announces the change, in one transaction. Setting
/// the value a flag already has changes nothing and writes nothing. No promotion gate: for
/// set-up and tests ([`set_checked`] is the operators' path).
pub async fn set(pool: &PgPool, change: &Change<'_>) -> Result<Changed, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let changed = apply(&mut tx, change, None).await.map_err(|e| match e {
        SetError::Database(e) => e,
        SetError::Refused(why) => sqlx::Error::Protocol(why),
    })?;
    tx.commit().await?;
    Ok(changed)
}

async fn apply(
    tx: &mut PgConnection,
    change: &Change<'_>,
    policy: Option<&PromotionPolicy>,
) -> Result<Changed, SetError> {
    let (from, previous): (String, Option<String>) =
        sqlx::query_as("SELECT value, previous_value FROM ops.feature_flags WHERE name = $1 FOR UPDATE")
            .bind(change.flag.as_str())
            .fetch_one(&mut *tx)
            .await?;
    let decode = |e: trellis_domain::FieldError| sqlx::Error::Decode(e.message.into());
    let from = Executor::parse(&from).map_err(decode)?;
    let previous = previous.as_deref().map(Executor::parse).transpose().map_err(decode)?;
    if from == change.value {
        return Ok(Changed { from, to: from, forced_past: None });
    }
    let promotes = change.value == Executor::Worker
        && (from == Executor::Monolith || (from == Executor::Shadow && previous == Some(Executor::Monolith)));
    let refusal = match policy.filter(|_| promotes) {
        Some(policy) => promotion_refusal(&mut *tx, change.flag, policy).await?,
        None => None,
    };
    if refusal.is_some() && !change.forced {
        return Err(SetError::Refused(refusal.unwrap_or_default()));
    }
    // Through the gate, `forced` records that it was forced past a refusal.
    let forced = if policy.is_some() { refusal.is_some() } else { change.forced };
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
    .bind(forced)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(change.flag.as_str()).execute(&mut *tx).await?;
    Ok(Changed { from, to: change.value, forced_past: refusal })
}

/// Why the worker may not become `flag`'s executor yet, or `None`.
async fn promotion_refusal(
    conn: &mut sqlx::PgConnection,
    flag: Flag,
    policy: &PromotionPolicy,
) -> Result<Option<String>, sqlx::Error> {
    let processor = trellis_domain::shadow::processor(flag);
    let force = "pass --force to promote anyway (the change is recorded as forced)";
    let period = match shadow::latest_period(&mut *conn, flag).await? {
        // Only the period in progress counts: evidence from an earlier one may predate the code now deployed.
        Some(p) if p.primary == Executor::Monolith && p.ended_at.is_none() => p,
        _ => {
            return Ok(Some(format!(
                "{flag} is not running the worker in shadow: set it to shadow from monolith, read `trellisctl parity \
                 {processor}`, then promote; or {force}",
                flag = flag.as_str()
            )));
        }
    };
    let tally = shadow::tally(&mut *conn, flag, &period).await?;
    Ok(policy.refusal(&tally).map(|why| {
        format!(
            "the worker's shadow period of {flag} since {since} does not pass the promotion gate: {why} ({matched} \
             matched, {mismatched} mismatched, {missing} missing; `trellisctl parity {processor}` shows them); {force}",
            flag = flag.as_str(),
            since = period.started_at,
            matched = tally.matched,
            mismatched = tally.mismatched,
            missing = tally.missing,
        )
    }))
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
