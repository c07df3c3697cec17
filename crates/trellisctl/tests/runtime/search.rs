//! `trellisctl search rebuild`: rebuilds the search read model in batches, printing progress,
//! and ends equal to what the incremental projection produces.

use std::process::Stdio;

use trellis_store::search_model;
use trellis_testkit::TestDb;
use uuid::Uuid;

async fn exec(db: &TestDb, sql: &str) {
    sqlx::query(sql).execute(&db.pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test]
async fn search_rebuild_rebuilds_the_read_model_with_progress() {
    let db = TestDb::migrated().await.unwrap();
    // 25,000 users (three batches), each with up to three contacts, some in circles; one hidden.
    exec(
        &db,
        "INSERT INTO identity.users (id, handle, display_name, email, password_hash, verified)
         SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'u' || i, 'User ' || i,
                'u' || i || '@example.com', 'x', i % 7 = 0
         FROM generate_series(1, 25000) i",
    )
    .await;
    exec(
        &db,
        "INSERT INTO contacts.contacts (owner_id, contact_id, label)
         SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
                ('00000000-0000-4000-8000-' || lpad(to_hex((i + k * 11) % 25000 + 1), 12, '0'))::uuid,
                CASE WHEN k = 1 THEN 'friend' ELSE '' END
         FROM generate_series(1, 25000) i, generate_series(1, 3) k",
    )
    .await;
    exec(
        &db,
        "INSERT INTO circles.circles (id, owner_id, name)
         SELECT ('00000000-0000-4000-9000-' || lpad(to_hex(i), 12, '0'))::uuid,
                ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'Circle ' || i
         FROM generate_series(1, 1000) i",
    )
    .await;
    exec(
        &db,
        "INSERT INTO circles.members (circle_id, owner_id, user_id)
         SELECT ('00000000-0000-4000-9000-' || lpad(to_hex(c.owner_n), 12, '0'))::uuid, c.owner_id, c.contact_id
         FROM (SELECT owner_id, contact_id, ('x' || right(owner_id::text, 8))::bit(32)::int AS owner_n
               FROM contacts.contacts) c
         WHERE c.owner_n <= 1000",
    )
    .await;
    exec(
        &db,
        "INSERT INTO score.user_scores SELECT id, 0.1, 500, gen_random_uuid(), now() FROM identity.users LIMIT 100",
    )
    .await;
    // Stale documents: one of a user that does not exist, one with an old name.
    exec(
        &db,
        "INSERT INTO search.directory (user_id, handle, display_name, verified, status)
         VALUES (gen_random_uuid(), 'ghost', 'Ghost', false, 'active'),
                ('00000000-0000-4000-8000-000000000001', 'u1', 'Old Name', false, 'active')",
    )
    .await;

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .args(["--database-url", &db.url, "search", "rebuild"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running trellisctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "search rebuild failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["10000/25000 users", "20000/25000 users", "25000/25000 users", "search rebuild: done: 25000 users"] {
        assert!(stdout.contains(line), "progress line {line:?} missing:\n{stdout}");
    }

    let directory: i64 = sqlx::query_scalar("SELECT count(*) FROM search.directory").fetch_one(&db.pool).await.unwrap();
    assert_eq!(directory, 25_000, "one document per user, the ghost gone");
    let name: String = sqlx::query_scalar(
        "SELECT display_name FROM search.directory WHERE user_id = '00000000-0000-4000-8000-000000000001'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(name, "User 1");
    let contacts: i64 = sqlx::query_scalar("SELECT count(*) FROM search.contacts").fetch_one(&db.pool).await.unwrap();
    assert_eq!(contacts, 75_000);
    let in_circles: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM search.contacts WHERE cardinality(circles) > 0 AND search_text LIKE '%circle %'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(in_circles, 3_000);

    // What the incremental projection would write for every document is already there.
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM identity.users").fetch_all(&db.pool).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(search_model::project_users(&mut tx, &ids).await.unwrap(), 0, "no directory document differs");
    assert_eq!(search_model::project_contacts(&mut tx, &ids).await.unwrap(), 0, "no contact document differs");
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn search_rebuild_only_directory_leaves_contact_documents_alone() {
    let db = TestDb::migrated().await.unwrap();
    exec(
        &db,
        "INSERT INTO identity.users (id, handle, display_name, email, password_hash)
         SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'u' || i, 'Ada Lovelace ' || i,
                'u' || i || '@example.com', 'x'
         FROM generate_series(1, 3) i",
    )
    .await;
    exec(
        &db,
        "INSERT INTO contacts.contacts (owner_id, contact_id, label)
         VALUES ('00000000-0000-4000-8000-000000000001', '00000000-0000-4000-8000-000000000002', 'friend')",
    )
    .await;
    for (only, bad) in [("directory", None), ("contacts", Some("sideways"))] {
        let mut args = vec!["--database-url", &db.url, "search", "rebuild", "--only"];
        args.push(bad.unwrap_or(only));
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellisctl"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("running trellisctl");
        if bad.is_some() {
            assert!(!out.status.success(), "--only sideways must be refused");
            assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'sideways'"));
            continue;
        }
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let count = |table: &'static str| {
        let pool = db.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}")).fetch_one(&pool).await.unwrap() }
    };
    assert_eq!(count("search.directory").await, 3);
    assert_eq!(
        count("search.name_postings").await,
        6,
        "ada and lovelace for each user (one-character words are not indexed)"
    );
    assert_eq!(count("search.contacts").await, 0, "contacts were not asked for");
}
