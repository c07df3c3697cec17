//! `trellisctl flags`: list, get, set (audited, refused without a reason or with an unknown
//! name or value) and history, against a real database.

use trellis_testkit::TestDb;

use crate::helpers::{Ctl, run_ctl};

async fn ctl(db: &TestDb, args: &[&str]) -> Ctl {
    run_ctl(&["--database-url", &db.url], args, "flags-tests").await
}

/// Every audit row: (name, from, to, actor, reason, forced).
async fn audit(db: &TestDb) -> Vec<(String, String, String, String, String, bool)> {
    sqlx::query_as("SELECT name, from_value, to_value, actor, reason, forced FROM ops.feature_flag_audit ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("reading the audit")
}

async fn value(db: &TestDb, name: &str) -> (String, Option<String>, String) {
    sqlx::query_as("SELECT value, previous_value, updated_by FROM ops.feature_flags WHERE name = $1")
        .bind(name)
        .fetch_one(&db.pool)
        .await
        .expect("reading a flag")
}

#[tokio::test]
async fn flags_list_shows_the_three_flags_at_worker() {
    let db = TestDb::migrated().await.unwrap();
    let json = ctl(&db, &["--output", "json", "flags", "list"]).await.json();
    let items = json.as_array().expect("a list");
    let names: Vec<&str> = items.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["dispute.executor", "score.executor", "search.executor"]);
    for f in items {
        assert_eq!(f["value"], "worker", "{f}");
        assert!(f["previous"].is_null(), "{f}");
        assert_eq!(f["updated_by"], "migration", "{f}");
    }

    let table = ctl(&db, &["flags", "list"]).await;
    assert!(table.success(), "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three flags: {table:?}");
    assert!(lines[0].starts_with("NAME"), "{table:?}");
    for (line, name) in lines[1..].iter().zip(names) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[..3], [name, "worker", "-"], "{line}");
    }

    let one = ctl(&db, &["--output", "json", "flags", "get", "search.executor"]).await.json();
    assert_eq!((&one["name"], &one["value"]), (&"search.executor".into(), &"worker".into()));
}

#[tokio::test]
async fn flags_set_changes_the_value_and_writes_exactly_one_audit_row() {
    let db = TestDb::migrated().await.unwrap();
    let out = ctl(&db, &["flags", "set", "score.executor", "shadow", "--reason", "cutover rehearsal"]).await;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("score.executor: worker → shadow"), "{out:?}");
    assert_eq!(value(&db, "score.executor").await, ("shadow".into(), Some("worker".into()), "flags-tests".into()));
    assert_eq!(
        audit(&db).await,
        [(
            "score.executor".into(),
            "worker".into(),
            "shadow".into(),
            "flags-tests".into(),
            "cutover rehearsal".into(),
            false
        )]
    );
    assert_eq!(value(&db, "search.executor").await.0, "worker", "the other flags are untouched");

    // --actor wins over the environment.
    let out = ctl(&db, &["flags", "set", "score.executor", "monolith", "--reason", "rollback", "--actor", "ana"]).await;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("shadow → monolith"), "{out:?}");
    let rows = audit(&db).await;
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1].3.as_str(), rows[1].4.as_str()), ("ana", "rollback"));

    let history = ctl(&db, &["--output", "json", "flags", "history", "score.executor"]).await.json();
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!((&history[0]["from"], &history[0]["to"]), (&"shadow".into(), &"monolith".into()), "newest first");
    assert_eq!(history[1]["reason"], "cutover rehearsal");
    let limited = ctl(&db, &["--output", "json", "flags", "history", "--limit", "1"]).await.json();
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let other = ctl(&db, &["--output", "json", "flags", "history", "dispute.executor"]).await.json();
    assert_eq!(other, serde_json::json!([]));
    let table = ctl(&db, &["flags", "history"]).await;
    assert!(table.stdout.contains("shadow → monolith") && table.stdout.contains("2 changes"), "{table:?}");
}

#[tokio::test]
async fn flags_set_to_the_current_value_says_so_and_records_nothing() {
    let db = TestDb::migrated().await.unwrap();
    let out = ctl(&db, &["flags", "set", "dispute.executor", "worker", "--reason", "just checking"]).await;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("dispute.executor is already worker"), "{out:?}");
    assert!(audit(&db).await.is_empty(), "no audit row");
    assert_eq!(value(&db, "dispute.executor").await, ("worker".into(), None, "migration".into()));
}

#[tokio::test]
async fn flags_refuses_unknown_names_unknown_values_and_changes_without_a_reason() {
    let db = TestDb::migrated().await.unwrap();
    let cases: [(&[&str], &str); 7] = [
        (
            &["flags", "set", "score.exec", "worker", "--reason", "x"],
            "score.executor, search.executor, dispute.executor",
        ),
        (&["flags", "get", "nope"], "unknown flag \"nope\""),
        (&["flags", "history", "nope"], "unknown flag \"nope\""),
        (&["flags", "set", "score.executor", "Worker", "--reason", "x"], "one of monolith, worker, shadow"),
        (&["flags", "set", "score.executor", "monolith"], "--reason is required"),
        (&["flags", "set", "score.executor", "monolith", "--reason", "  "], "--reason is required"),
        (&["flags", "history", "--limit", "0"], "--limit must be at least 1"),
    ];
    for (args, message) in cases {
        let out = ctl(&db, args).await;
        assert_eq!(out.code, Some(1), "{args:?} must fail: {out:?}");
        assert!(out.stderr.contains(message), "{args:?} says {message:?}: {out:?}");
    }
    assert!(audit(&db).await.is_empty(), "nothing recorded");
    assert_eq!(value(&db, "score.executor").await.0, "worker", "nothing changed");
}
