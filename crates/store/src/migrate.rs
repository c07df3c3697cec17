//! The embedded migrator over the top-level `migrations/` folder.

use sqlx::PgPool;
use sqlx::migrate::Migrator;

/// Every migration of the workspace, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// One migration and whether it is applied.
#[derive(Debug, Clone)]
pub struct MigrationStatus {
    pub version: i64,
    pub description: String,
    pub applied: bool,
}

pub async fn up(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Reverts applied migrations newer than `target` (0 reverts all).
pub async fn down_to(pool: &PgPool, target: i64) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.undo(pool, target).await
}

/// The latest applied version below the newest applied one, i.e. the target that reverts
/// exactly one migration.
pub async fn previous_version(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    let applied = applied_versions(pool).await?;
    Ok(match applied.as_slice() {
        [] => None,
        [.., prev, _last] => Some(*prev),
        [_only] => Some(0),
    })
}

pub async fn status(pool: &PgPool) -> Result<Vec<MigrationStatus>, sqlx::Error> {
    let applied = applied_versions(pool).await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| MigrationStatus {
            version: m.version,
            description: m.description.to_string(),
            applied: applied.contains(&m.version),
        })
        .collect())
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL").fetch_one(pool).await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version").fetch_all(pool).await
}
