//! `trellisctl users`: grant-role and reinstate, audited with actor and reason in one
//! transaction with their event, and history, against a real database.

use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::helpers::{Ctl, run_ctl};

async fn ctl(db: &TestDb, args: &[&str]) -> Ctl {
    run_ctl(&["--database-url", &db.url], args, "users-tests").await
}

async fn user(db: &TestDb, handle: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO identity.users (id, handle, display_name, email, password_hash)
         VALUES ($1, $2, $2, $2 || '@example.com', 'not a hash')",
    )
    .bind(id)
    .bind(handle)
    .execute(&db.pool)
    .await
    .expect("inserting a user");
    id
}

/// (action, from, to, actor, reason) of every audited change, oldest first.
async fn audit(db: &TestDb) -> Vec<(String, String, String, String, String)> {
    sqlx::query_as("SELECT action, from_value, to_value, actor, reason FROM identity.user_admin_audit ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("reading the audit")
}

fn row(action: &str, from: &str, to: &str, actor: &str, reason: &str) -> (String, String, String, String, String) {
    (action.into(), from.into(), to.into(), actor.into(), reason.into())
}

/// (role, status) of a user.
async fn state(db: &TestDb, id: Uuid) -> (String, String) {
    sqlx::query_as("SELECT role, status FROM identity.users WHERE id = $1").bind(id).fetch_one(&db.pool).await.unwrap()
}

/// The outbox rows of `subject`, each with whether it was written by the same transaction as
/// the audit row of `action`.
async fn events_with_their_audit(db: &TestDb, subject: &str, action: &str) -> Vec<(serde_json::Value, bool)> {
    sqlx::query_as(
        "SELECT o.payload, EXISTS (SELECT 1 FROM identity.user_admin_audit a
                                    WHERE a.action = $2 AND a.xmin::text = o.xmin::text)
         FROM ops.outbox o WHERE o.subject = $1 ORDER BY o.seq",
    )
    .bind(subject)
    .bind(action)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn grant_role_records_the_actor_and_the_reason_with_its_event() {
    let db = TestDb::migrated().await.unwrap();
    let carol = user(&db, "carol").await;

    let out = ctl(&db, &["users", "grant-role", "carol", "moderator"]).await;
    assert!(!out.success() && out.stderr.contains("--reason is required"), "{out:?}");
    let out = ctl(&db, &["users", "grant-role", "carol", "moderator", "--reason", "   "]).await;
    assert!(!out.success() && out.stderr.contains("--reason"), "{out:?}");
    assert_eq!(state(&db, carol).await.0, "user", "nothing changed without a reason");

    let out = ctl(&db, &["users", "grant-role", "carol", "moderator", "--reason", "joins the trust team"]).await;
    assert!(out.success() && out.stdout.contains("carol"), "{out:?}");
    let reason = "covers the night shift";
    let out = ctl(&db, &["users", "grant-role", "carol", "admin", "--reason", reason, "--actor", "dana"]).await;
    assert!(out.success(), "{out:?}");
    let out = ctl(&db, &["users", "grant-role", carol.to_string().as_str(), "admin", "--reason", "again"]).await;
    assert!(out.success() && out.stdout.contains("nothing changed, nothing recorded"), "{out:?}");
    assert_eq!(state(&db, carol).await.0, "admin");
    assert_eq!(
        audit(&db).await,
        [
            row("grant_role", "user", "moderator", "users-tests", "joins the trust team"),
            row("grant_role", "moderator", "admin", "dana", reason),
        ]
    );
    let events = events_with_their_audit(&db, "events.identity.role_granted", "grant_role").await;
    assert_eq!(events.len(), 2, "one event per change");
    for (payload, same_transaction) in &events {
        assert_eq!(payload["data"]["user_id"], carol.to_string());
        assert!(same_transaction, "the event commits with its audit row: {payload}");
    }

    let history = ctl(&db, &["--output", "json", "users", "history", "carol"]).await.json();
    let actors: Vec<&str> = history.as_array().unwrap().iter().map(|r| r["actor"].as_str().unwrap()).collect();
    assert_eq!(actors, ["dana", "users-tests"], "newest first");
    let out = ctl(&db, &["users", "grant-role", "nobody", "admin", "--reason", "x"]).await;
    assert!(!out.success() && out.stderr.contains("no user"), "{out:?}");
}

#[tokio::test]
async fn reinstate_undoes_a_suspension_audited_with_its_event_and_refuses_an_active_user() {
    let db = TestDb::migrated().await.unwrap();
    let erin = user(&db, "erin").await;
    sqlx::query("UPDATE identity.users SET status = 'suspended' WHERE id = $1")
        .bind(erin)
        .execute(&db.pool)
        .await
        .unwrap();

    let out = ctl(&db, &["users", "reinstate", "erin"]).await;
    assert!(!out.success() && out.stderr.contains("--reason is required"), "{out:?}");
    assert_eq!(state(&db, erin).await.1, "suspended");

    let out = ctl(&db, &["users", "reinstate", "erin", "--reason", "the report was a mistake"]).await;
    assert!(out.success() && out.stdout.contains("reinstated"), "{out:?}");
    assert_eq!(state(&db, erin).await.1, "active");
    assert_eq!(audit(&db).await, [row("reinstate", "suspended", "active", "users-tests", "the report was a mistake")]);
    let events = events_with_their_audit(&db, "events.identity.user_reinstated", "reinstate").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0["data"], serde_json::json!({"user_id": erin}));
    assert!(events[0].1, "the event commits with its audit row");

    let out = ctl(&db, &["users", "reinstate", "erin", "--reason", "again"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("not suspended"), "{out:?}");
    assert_eq!(audit(&db).await.len(), 1, "a refused reinstatement records nothing");
}
