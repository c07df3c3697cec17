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

/// Migrations whose files were edited after release in their comments only, with the SHA-384
/// checksum (hex) of the file as released. The migrator refuses a database whose recorded
/// checksum differs from the file's ("previously applied but modified"); for exactly these
/// (version, released checksum) pairs the recorded checksum is moved to the current file's.
/// Any other difference still stops the migrator.
pub const COMMENT_ONLY_EDITS: &[(i64, &str)] = &[
    (
        20261125000001,
        "502b3f3336b0945bae9e9710114e3e7e97dd4ef79bd201c19e105b46cc6fa8b2360fdfbd1e4707f15b7067a941772cf7",
    ),
    (
        20261125000007,
        "a7b24c8b07bc79abc0b1ed853b7312e08691a6576462eb2ee9afe15a1756ecb30a131b6794205f975bb0622393d245e2",
    ),
    (
        20261125000009,
        "b339a686bbb81daf0a9c7a85cbb689e4fca194af1eaebda7bcad75f916a8e85638369ce0630ef2ecf243fc5aba12b0a6",
    ),
    (
        20261125000010,
        "69c9e00d8be90481b16e600936a444087d6a419c4a5585517f45a2ed7557e4579a2883f46b0b073552b8e79ca5d3583b",
    ),
    (
        20261125000011,
        "3ed9274f2d8e38cf3e4d2875046c7d9fba65274e5a5e432d99734948c354ad56ed975f10bbe5d985a5914bd17ba9214a",
    ),
    (
        20261125000012,
        "99daee17587472dbb9ce4613edab5a30cef803bfe50b9a39d774d571be823fc0812d47875aaa8d1b1f4da62c076155af",
    ),
];

pub async fn up(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    accept_comment_only_edits(pool).await?;
    MIGRATOR.run(pool).await
}

/// Reverts applied migrations newer than `target` (0 reverts all).
pub async fn down_to(pool: &PgPool, target: i64) -> Result<(), sqlx::migrate::MigrateError> {
    accept_comment_only_edits(pool).await?;
    MIGRATOR.undo(pool, target).await
}

async fn accept_comment_only_edits(pool: &PgPool) -> Result<(), sqlx::Error> {
    if !migrations_table_exists(pool).await? {
        return Ok(());
    }
    for (version, released) in COMMENT_ONLY_EDITS {
        let current = MIGRATOR
            .iter()
            .find(|m| m.version == *version && m.migration_type.is_up_migration())
            .map(|m| m.checksum.to_vec());
        let (Some(current), Ok(released)) = (current, hex::decode(released)) else { continue };
        sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2 AND checksum = $3")
            .bind(current)
            .bind(version)
            .bind(released)
            .execute(pool)
            .await?;
    }
    Ok(())
}

async fn migrations_table_exists(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL").fetch_one(pool).await
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
    if !migrations_table_exists(pool).await? {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version").fetch_all(pool).await
}
