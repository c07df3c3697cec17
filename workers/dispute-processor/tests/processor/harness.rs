//! The harness: real `trellis-api` and `dispute-processor` child processes
//! (`trellis_testkit`), each test on its own database and NATS prefix.

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use trellis_domain::disputes::DisputeKind;
use trellis_domain::{DisputeId, UserId};
pub use trellis_testkit::eventually;
pub use trellis_testkit::http::{Response, User};
use trellis_testkit::{Process, Spawn, TestDb};
use uuid::Uuid;

pub const WAIT: Duration = Duration::from_secs(60);

/// `trellis-api` as a child process (`trellis_testkit::http::Api`, killed when dropped; a test
/// may kill it first), with this crate's shortcuts.
pub struct Api(pub trellis_testkit::http::Api);

impl std::ops::Deref for Api {
    type Target = trellis_testkit::http::Api;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Api {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Api {
    /// Starts the API on the test's database and prefix with `extra` command-line flags (e.g.
    /// `--flag-poll 200ms`), and waits until its `/readyz` answers 200.
    pub async fn start_with(db: &TestDb, prefix: &str, extra: &[&str]) -> Self {
        Api(trellis_testkit::http::Api::start(trellis_testkit::http::Api::spawn(&db.url, prefix).args(extra)).await)
    }

    pub async fn start(db: &TestDb, prefix: &str) -> Self {
        Self::start_with(db, prefix, &[]).await
    }

    /// Files a dispute and returns its id.
    pub async fn file(&self, reporter: &User, target: Uuid, kind: &str) -> Uuid {
        let body = json!({"target_id": target.to_string(), "kind": kind, "description": "a test dispute"});
        let Response { status, body, .. } =
            self.request(reqwest::Method::POST, "/v1/disputes", Some(&reporter.token), Some(body)).await;
        assert_eq!(status, 201, "filing {kind}: {body:?}");
        body["id"].as_str().expect("a dispute id").parse().unwrap()
    }

    /// The dispute as `viewer` sees it (its reporter, or a moderator).
    pub async fn dispute(&self, viewer: &User, id: Uuid) -> Value {
        let Response { status, body, .. } =
            self.request(reqwest::Method::GET, &format!("/v1/disputes/{id}"), Some(&viewer.token), None).await;
        assert_eq!(status, 200, "{body:?}");
        body
    }

    /// Waits until the reporter sees a decision on the dispute; returns the dispute.
    pub async fn decided(&self, reporter: &User, id: Uuid) -> Value {
        eventually(&format!("dispute {id} to be decided"), WAIT, || async move {
            let d = self.dispute(reporter, id).await;
            (d["status"] != "pending").then_some(d)
        })
        .await
    }

    pub async fn moderate(&self, moderator: &User, id: Uuid, decision: &str) -> (u16, Value) {
        let body = json!({"decision": decision, "note": "checked by hand"});
        let path = format!("/v1/moderation/disputes/{id}/decision");
        let answer = self.request(reqwest::Method::POST, &path, Some(&moderator.token), Some(body)).await;
        (answer.status, answer.body)
    }
}

pub async fn make_role(db: &TestDb, user: Uuid, role: &str) {
    let done =
        sqlx::query("UPDATE identity.users SET role = $2 WHERE id = $1").bind(user).bind(role).execute(&db.pool).await;
    assert_eq!(done.unwrap().rows_affected(), 1);
}

/// Gives `user` a trust score (the orchestrator's output, written as a fixture).
pub async fn set_score(db: &TestDb, user: Uuid, score: i32) {
    sqlx::query(
        "INSERT INTO score.user_scores (user_id, trust, score, run_id, computed_at) VALUES ($1, 0.5, $2, $3, now())
         ON CONFLICT (user_id) DO UPDATE SET score = EXCLUDED.score",
    )
    .bind(user)
    .bind(score)
    .bind(Uuid::now_v7())
    .execute(&db.pool)
    .await
    .expect("writing a score");
}

/// A user inserted directly (no token), with a trust score when `score` is given.
pub async fn user(db: &TestDb, score: Option<i32>) -> Uuid {
    let id = Uuid::now_v7();
    let handle = format!("u{}", &id.simple().to_string()[20..]);
    sqlx::query(
        "INSERT INTO identity.users (id, handle, display_name, email, password_hash)
         VALUES ($1, $2, $2, $2 || '@example.com', 'not a hash')",
    )
    .bind(id)
    .bind(&handle)
    .execute(&db.pool)
    .await
    .expect("inserting a user");
    if let Some(s) = score {
        set_score(db, id, s).await;
    }
    id
}

/// A dispute filed directly (no event): for tests that drive the processor's library.
pub async fn file(db: &TestDb, reporter: Uuid, target: Uuid, kind: DisputeKind) -> Uuid {
    let mut conn = db.pool.acquire().await.unwrap();
    let new = trellis_store::disputes::NewDispute {
        id: DisputeId(Uuid::now_v7()),
        reporter: UserId(reporter),
        target: UserId(target),
        kind,
        description: "a test dispute",
        evidence: None,
    };
    trellis_store::disputes::insert(&mut conn, &new).await.expect("filing").id
}

/// The rule of a dispute's current decision (`""` while pending): what a moderator sees, and
/// its reporter does not.
pub async fn rule_of(db: &TestDb, id: Uuid) -> String {
    sqlx::query_scalar("SELECT coalesce(decision_rule, '') FROM security.disputes WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("reading a dispute")
}

/// A short random tag for handles.
pub fn tag() -> String {
    Uuid::new_v4().simple().to_string()[..6].to_owned()
}

/// Waits until every outbox row is published.
pub async fn all_published(db: &TestDb) {
    eventually("the outbox to be published", WAIT, || async {
        let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (unpublished == 0).then_some(())
    })
    .await;
}

/// When each of `ids` was decided (`None` while pending).
pub async fn decided_at(db: &TestDb, ids: &[Uuid]) -> Vec<(Uuid, Option<OffsetDateTime>)> {
    sqlx::query_as("SELECT id, decided_at FROM security.disputes WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(&db.pool)
        .await
        .expect("reading disputes")
}

/// Waits until none of `ids` is pending.
pub async fn all_decided(db: &TestDb, ids: &[Uuid]) {
    eventually("every dispute to be decided", Duration::from_secs(120), || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM security.disputes WHERE id = ANY($1) AND status = 'pending'")
                .bind(ids)
                .fetch_one(&db.pool)
                .await
                .ok()?;
        (pending == 0).then_some(())
    })
    .await;
}

/// A `dispute-processor` child process, killed (SIGKILL) when dropped.
pub struct Replica {
    pub process: Process,
}

impl Replica {
    /// Starts a replica and waits until its `/readyz` answers 200.
    pub async fn start(db: &TestDb, prefix: &str, args: &[&str]) -> Self {
        let process =
            Spawn::new("dispute-processor").on(&db.url, prefix).env("METRICS_EVERY", "200ms").args(args).ready().await;
        Self { process }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.process.metrics().await
    }
}

pub use trellis_testkit::metrics::sum;

/// The value of a series (its full name with labels) in a `/metrics` text.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
