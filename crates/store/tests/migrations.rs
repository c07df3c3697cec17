//! Every migration goes up, down and up again on a fresh database, and the schema follows.

use sqlx::PgPool;
use trellis_store::migrate;
use trellis_testkit::TestDb;

const SCHEMAS: [&str; 7] = ["identity", "contacts", "circles", "security", "score", "search", "ops"];
const TABLES: [&str; 11] = [
    "identity.users",
    "identity.tokens",
    "contacts.contacts",
    "circles.circles",
    "circles.members",
    "security.disputes",
    "security.hidden_users",
    "score.runs",
    "score.user_scores",
    "ops.outbox",
    "ops.idempotency_keys",
];

async fn schemas(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname = ANY($1) ORDER BY nspname")
        .bind(SCHEMAS.as_slice())
        .fetch_all(pool)
        .await?)
}

async fn tables(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables
         WHERE table_schema = ANY($1) AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .bind(SCHEMAS.as_slice())
    .fetch_all(pool)
    .await?)
}

async fn assert_all_applied(pool: &PgPool) -> anyhow::Result<()> {
    let mut want: Vec<String> = SCHEMAS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(schemas(pool).await?, want, "every domain schema exists");
    let present = tables(pool).await?;
    for table in TABLES {
        assert!(present.iter().any(|t| t == table), "{table} exists; tables: {present:?}");
    }
    let status = migrate::status(pool).await?;
    assert!(!status.is_empty(), "there are migrations");
    assert!(status.iter().all(|m| m.applied), "all applied: {status:?}");
    assert_eq!(status.len(), migrate::MIGRATOR.iter().filter(|m| m.migration_type.is_up_migration()).count());
    // The schema works: the outbox trigger and its identity column are in place.
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO ops.outbox (id, subject, payload) VALUES (gen_random_uuid(), 'events.test', '{}') RETURNING seq",
    )
    .fetch_one(pool)
    .await?;
    assert!(seq >= 1);
    sqlx::query("DELETE FROM ops.outbox WHERE seq = $1").bind(seq).execute(pool).await?;
    Ok(())
}

async fn assert_none_applied(pool: &PgPool) -> anyhow::Result<()> {
    assert_eq!(schemas(pool).await?, Vec::<String>::new(), "no domain schema is left");
    assert_eq!(tables(pool).await?, Vec::<String>::new(), "no domain table is left");
    let outbox: Option<String> = sqlx::query_scalar("SELECT to_regclass('ops.outbox')::text").fetch_one(pool).await?;
    assert_eq!(outbox, None);
    let functions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_proc WHERE proname = 'notify_outbox'").fetch_one(pool).await?;
    assert_eq!(functions, 0, "the outbox trigger function is gone");
    let status = migrate::status(pool).await?;
    assert!(!status.is_empty());
    assert!(status.iter().all(|m| !m.applied), "none applied: {status:?}");
    assert_eq!(migrate::previous_version(pool).await?, None);
    Ok(())
}

#[tokio::test]
async fn all_ups_all_downs_and_all_ups_again_on_a_fresh_database() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    assert_none_applied(&db.pool).await?;

    migrate::up(&db.pool).await?;
    assert_all_applied(&db.pool).await?;
    // Applying again is a no-op.
    migrate::up(&db.pool).await?;
    assert_all_applied(&db.pool).await?;

    migrate::down_to(&db.pool, 0).await?;
    assert_none_applied(&db.pool).await?;

    migrate::up(&db.pool).await?;
    assert_all_applied(&db.pool).await?;
    Ok(())
}

#[tokio::test]
async fn reverting_one_migration_at_a_time_reaches_an_empty_schema() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    let total = migrate::status(&db.pool).await?.len();
    for step in 0..total {
        let target = migrate::previous_version(&db.pool).await?.expect("something is applied");
        migrate::down_to(&db.pool, target).await?;
        let applied = migrate::status(&db.pool).await?.iter().filter(|m| m.applied).count();
        assert_eq!(applied, total - step - 1, "one migration reverted per step");
    }
    assert_none_applied(&db.pool).await?;
    migrate::up(&db.pool).await?;
    assert_all_applied(&db.pool).await?;
    Ok(())
}

/// A database migrated by a release whose migration files differed from today's in comments only
/// is accepted, and its recorded checksums become the current files'; any other difference still
/// stops the migrator.
#[tokio::test]
async fn comment_only_edits_of_released_migrations_are_accepted_and_nothing_else() -> anyhow::Result<()> {
    let db = TestDb::migrated().await?;
    for (version, released) in migrate::COMMENT_ONLY_EDITS {
        let current: Vec<u8> = sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = $1")
            .bind(version)
            .fetch_one(&db.pool)
            .await?;
        assert_ne!(hex::encode(&current), *released, "migration {version} was edited after release");
        sqlx::query("UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = $2")
            .bind(released)
            .bind(version)
            .execute(&db.pool)
            .await?;
    }
    migrate::up(&db.pool).await?;
    let mismatched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE encode(checksum, 'hex') = ANY($1)")
            .bind(migrate::COMMENT_ONLY_EDITS.iter().map(|(_, c)| c.to_string()).collect::<Vec<_>>())
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(mismatched, 0, "every released checksum was moved to the current file's");
    assert_all_applied(&db.pool).await?;

    let (version, _) = migrate::COMMENT_ONLY_EDITS[0];
    sqlx::query("UPDATE _sqlx_migrations SET checksum = sha384('something else'::bytea) WHERE version = $1")
        .bind(version)
        .execute(&db.pool)
        .await?;
    let refused = migrate::up(&db.pool).await;
    assert!(
        matches!(refused, Err(sqlx::migrate::MigrateError::VersionMismatch(v)) if v == version),
        "an unlisted edit stops the migrator: {refused:?}"
    );
    Ok(())
}
