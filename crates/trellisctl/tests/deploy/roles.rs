//! The database roles: the migrations run as the migration owner, each binary as its own
//! runtime role, and a runtime role can neither change the schema nor reach what its binary
//! has no part in. (Roles: `crates/store/sql/roles.sql`; grants: migration
//! 20261204000401_database_roles; the matrix: docs/SECURITY.md.)

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use trellis_store::roles;
use trellis_testkit::TestDb;

use crate::harness::{http, start};

/// The SQLSTATE of an error, or a panic naming what succeeded that should not have.
async fn refused(pool: &PgPool, role: &str, sql: &str) -> String {
    match sqlx::raw_sql(sql).execute(pool).await {
        Ok(_) => panic!("{role} may run {sql}"),
        Err(e) => e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned()).unwrap_or_default(),
    }
}

const INSUFFICIENT_PRIVILEGE: &str = "42501";

#[tokio::test]
async fn a_worker_role_can_change_no_schema_and_reach_no_schema_its_worker_has_no_part_in() {
    let db = TestDb::migrated().await.unwrap();
    let projector = PgPool::connect(&db.login_url(roles::SEARCH_PROJECTOR).await.unwrap()).await.unwrap();
    // Its own work.
    sqlx::query("SELECT count(*) FROM search.directory").execute(&projector).await.unwrap();
    sqlx::query("SELECT handle, display_name, status FROM identity.users").execute(&projector).await.unwrap();
    sqlx::query("DELETE FROM search.contacts").execute(&projector).await.unwrap();
    for sql in [
        // DDL, in its own schema and elsewhere
        "CREATE TABLE search.planted (x int)",
        "ALTER TABLE search.directory ADD COLUMN planted int",
        "DROP TABLE search.directory",
        "TRUNCATE search.directory",
        "CREATE INDEX planted ON search.directory (user_id)",
        "CREATE SCHEMA planted",
        "CREATE TABLE public.planted (x int)",
        "CREATE FUNCTION search.planted() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        // what the projector has no part in
        "SELECT * FROM ops.idempotency_keys",
        "SELECT * FROM ops.dlq_audit",
        "SELECT * FROM identity.tokens",
        "SELECT password_hash FROM identity.users",
        "SELECT email FROM identity.users",
        "UPDATE identity.users SET status = 'suspended'",
        "DELETE FROM security.disputes",
        "INSERT INTO ops.outbox (id, subject, payload) VALUES (gen_random_uuid(), 'x', '{}')",
        "UPDATE ops.feature_flags SET value = 'monolith'",
    ] {
        assert_eq!(refused(&projector, "trellis_search_projector", sql).await, INSUFFICIENT_PRIVILEGE, "{sql}");
    }

    let processor = PgPool::connect(&db.login_url(roles::DISPUTE_PROCESSOR).await.unwrap()).await.unwrap();
    sqlx::query("SELECT count(*) FROM security.disputes").execute(&processor).await.unwrap();
    for sql in [
        "CREATE TABLE security.planted (x int)",
        "ALTER TABLE security.disputes DISABLE TRIGGER ALL",
        "SELECT * FROM search.directory",
        "SELECT * FROM contacts.contacts",
        "SELECT * FROM circles.circles",
        "UPDATE score.user_scores SET score = 1000",
        "SELECT * FROM ops.idempotency_keys",
    ] {
        assert_eq!(refused(&processor, "trellis_dispute_processor", sql).await, INSUFFICIENT_PRIVILEGE, "{sql}");
    }

    let orchestrator = PgPool::connect(&db.login_url(roles::SCORE_ORCHESTRATOR).await.unwrap()).await.unwrap();
    for sql in ["SELECT * FROM search.directory", "SELECT * FROM circles.members", "DELETE FROM security.disputes"] {
        assert_eq!(refused(&orchestrator, "trellis_score_orchestrator", sql).await, INSUFFICIENT_PRIVILEGE, "{sql}");
    }
}

#[tokio::test]
async fn no_runtime_role_may_create_anything_and_the_api_reaches_every_table() {
    let db = TestDb::migrated().await.unwrap();
    let runtime =
        [roles::API, roles::SCORE_ORCHESTRATOR, roles::SEARCH_PROJECTOR, roles::DISPUTE_PROCESSOR, roles::TRELLISCTL];
    for role in runtime {
        let creates: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::text FROM pg_namespace
              WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
                AND has_schema_privilege($1, oid, 'CREATE')
             UNION ALL
             SELECT 'database ' || current_database() WHERE has_database_privilege($1, current_database(), 'CREATE')",
        )
        .bind(role)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert!(creates.is_empty(), "{role} may create objects in {creates:?}");
        let super_or_owner: bool =
            sqlx::query_scalar("SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = $1")
                .bind(role)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert!(!super_or_owner, "{role} has a cluster-wide privilege");
    }
    // A table a later migration adds in a new schema, or as another role, would reach no binary.
    let unreachable: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'public')
            AND NOT has_table_privilege('trellis_api', c.oid, 'SELECT, INSERT, UPDATE, DELETE')
          ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(unreachable.is_empty(), "tables trellis_api cannot use: {unreachable:?}");
}

/// `trellisctl <args>` with `database_url`; its output, failing the test if it fails.
async fn trellisctl(database_url: &str, prefix: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("NATS_URL", trellis_testkit::nats_url())
        .env("NATS_PREFIX", prefix)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("trellisctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "trellisctl {args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

async fn wait_for(what: &str, db: &TestDb, sql: &str) {
    trellis_testkit::eventually(what, Duration::from_secs(30), || async {
        let done: bool = sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap();
        done.then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_owner_migrates_and_every_binary_does_its_job_with_its_own_role() {
    let db = TestDb::empty().await.unwrap();
    sqlx::raw_sql(&format!("ALTER DATABASE {} OWNER TO {}", db.name, roles::OWNER)).execute(&db.pool).await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let url = async |role: &str| db.login_url(role).await.unwrap();
    let migrated = trellisctl(&url(roles::OWNER).await, &prefix, &["migrate", "up"]).await;
    assert!(migrated.contains("migrations applied"), "{migrated}");
    let tables_not_owned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
            AND tableowner <> 'trellis_owner'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(tables_not_owned, 0, "the migration owner owns every table");
    // A table a later migration adds reaches the roles of its schema through the default
    // privileges, and no other role.
    let owner = PgPool::connect(&url(roles::OWNER).await).await.unwrap();
    sqlx::raw_sql("CREATE TABLE search.added_later (x int)").execute(&owner).await.unwrap();
    let privileges: Vec<(String, bool)> = sqlx::query_as(
        "SELECT r, has_table_privilege(r, 'search.added_later', 'SELECT, INSERT, UPDATE, DELETE')
           FROM unnest($1::text[]) AS r ORDER BY r",
    )
    .bind([roles::API, roles::SEARCH_PROJECTOR, roles::TRELLISCTL, roles::SCORE_ORCHESTRATOR, roles::DISPUTE_PROCESSOR])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        privileges,
        [
            ("trellis_api".to_owned(), true),
            ("trellis_dispute_processor".to_owned(), false),
            ("trellis_score_orchestrator".to_owned(), false),
            ("trellis_search_projector".to_owned(), true),
            ("trellisctl".to_owned(), true),
        ]
    );
    sqlx::raw_sql("DROP TABLE search.added_later").execute(&owner).await.unwrap();
    owner.close().await;

    let api = start("trellis-api", &db, &prefix, &[("DATABASE_URL", url(roles::API).await)]).await;
    let api_addr = api.api();
    let mut workers = Vec::new();
    for (name, role) in [
        ("score-orchestrator", roles::SCORE_ORCHESTRATOR),
        ("search-projector", roles::SEARCH_PROJECTOR),
        ("dispute-processor", roles::DISPUTE_PROCESSOR),
    ] {
        workers.push(start(name, &db, &prefix, &[("DATABASE_URL", url(role).await)]).await);
    }

    let api = |path: &str| format!("http://{api_addr}{path}");
    let mut tokens = Vec::new();
    for handle in ["alice", "bob"] {
        let r = http()
            .post(api("/v1/users"))
            .json(&json!({"handle": handle, "display_name": handle, "email": format!("{handle}@example.com"),
                          "password": "correct horse battery staple"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "registering {handle}");
        tokens.push(r.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_owned());
    }
    let r = http()
        .put(api("/v1/me/contacts/bob"))
        .bearer_auth(&tokens[0])
        .json(&json!({"label": "a neighbour"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "adding a contact: {}", r.status());
    let r = http()
        .post(api("/v1/disputes"))
        .bearer_auth(&tokens[0])
        .json(&json!({"target_id": "bob", "kind": "spam", "description": "sends me ads every day"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "filing a dispute");

    wait_for(
        "the relay (trellis_api) publishing every event",
        &db,
        "SELECT NOT EXISTS (SELECT FROM ops.outbox WHERE published_at IS NULL)",
    )
    .await;
    wait_for("the search projection (trellis_search_projector)", &db, "SELECT count(*) = 2 FROM search.directory")
        .await;
    wait_for(
        "the dispute decision (trellis_dispute_processor)",
        &db,
        "SELECT bool_and(status <> 'pending') FROM security.disputes",
    )
    .await;
    let run = trellisctl(&url(roles::TRELLISCTL).await, &prefix, &["score", "run", "--wait", "--timeout", "60s"]).await;
    assert!(run.contains("(succeeded)"), "the score run (trellisctl, trellis_score_orchestrator): {run}");
}
