//! The cluster-wide database roles (`crates/store/sql/roles.sql`): the migration owner and one
//! runtime role per binary. Migration 20261204000401 grants them their privileges; this module
//! creates them (which needs CREATEROLE, so it is not a migration) and tells which are missing.

use sqlx::PgPool;

/// The script that creates the roles: idempotent, safe to run from several sessions at once.
pub const SQL: &str = include_str!("../sql/roles.sql");

/// The role that owns the schema and runs the migrations.
pub const OWNER: &str = "trellis_owner";
/// The runtime role of each binary.
pub const API: &str = "trellis_api";
pub const SCORE_ORCHESTRATOR: &str = "trellis_score_orchestrator";
pub const SEARCH_PROJECTOR: &str = "trellis_search_projector";
pub const DISPUTE_PROCESSOR: &str = "trellis_dispute_processor";
pub const TRELLISCTL: &str = "trellisctl";

/// Every role the script creates.
pub const ALL: [&str; 6] = [OWNER, API, SCORE_ORCHESTRATOR, SEARCH_PROJECTOR, DISPUTE_PROCESSOR, TRELLISCTL];

/// Creates the roles that do not exist yet.
pub async fn ensure(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SQL).execute(pool).await.map(drop)
}

/// The roles of [`ALL`] that do not exist on the server.
pub async fn missing(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT wanted FROM unnest($1::text[]) AS wanted
          WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = wanted) ORDER BY wanted",
    )
    .bind(ALL.as_slice())
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_script_and_the_migration_name_the_same_roles() {
        let migration = include_str!("../../../migrations/20261204000401_database_roles.up.sql");
        for role in super::ALL {
            assert!(super::SQL.contains(&format!("'{role}'")), "roles.sql does not create {role}");
            assert!(migration.contains(&format!("'{role}'")), "the migration does not check {role}");
        }
    }
}
