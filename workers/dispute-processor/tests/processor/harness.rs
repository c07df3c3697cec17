//! The harness: a real `trellis-api` in-process, real `dispute-processor` child processes, each
//! test on its own database and NATS prefix, and polling with deadlines.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_api::{Config, Running};
use trellis_domain::disputes::DisputeKind;
use trellis_domain::{DisputeId, UserId};
pub use trellis_testkit::eventually;
use trellis_testkit::{Process, Spawn, TestDb};
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery staple";
pub const WAIT: Duration = Duration::from_secs(60);

/// The API's abuse limits (docs/SECURITY.md) opened wide: these tests register many users and
/// file many disputes, impersonation among them, from one address within seconds.
const TEST_LIMITS: &[&str] = &[
    "--registration-rate-per-address",
    "1000000",
    "--dispute-p0-min-account-age",
    "0s",
    "--dispute-open-limit",
    "1000000",
    "--dispute-open-limit-p0",
    "1000000",
];

/// A `trellis-api`: running in this process, or a child process (which a test can kill).
pub struct Api {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`).
    pub admin: SocketAddr,
    pub http: reqwest::Client,
    process: ApiProcess,
}

enum ApiProcess {
    InProcess { shutdown: CancellationToken, _running: Running },
    Child(Box<trellis_testkit::http::Api>),
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub handle: String,
    pub token: String,
}

impl Api {
    pub async fn start(db: &TestDb, prefix: &str) -> Self {
        Self::start_with(db, prefix, &[]).await
    }

    /// Starts the API in this process with `extra` command-line arguments (e.g. `--flag-poll 200ms`).
    pub async fn start_with(db: &TestDb, prefix: &str, extra: &[&str]) -> Self {
        let nats_url = trellis_testkit::nats_url();
        let mut args = vec![
            "trellis-api",
            "--database-url",
            &db.url,
            "--nats-url",
            &nats_url,
            "--nats-prefix",
            prefix,
            "--api-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--log-format",
            "pretty",
            "--shutdown-grace",
            "5s",
        ];
        args.extend_from_slice(TEST_LIMITS);
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).expect("test config parses");
        trellis_testkit::capture_logs("trellis-api-in-process");
        let shutdown = CancellationToken::new();
        let running = trellis_api::start(config, shutdown.clone()).await.expect("the API starts");
        let http = reqwest::Client::builder().no_proxy().build().expect("http client");
        let (addr, admin) = (running.api_addr, running.admin_addr);
        Self { addr, admin, http, process: ApiProcess::InProcess { shutdown, _running: running } }
    }

    /// Starts the `trellis-api` binary as a child process with `env` on top of the test's
    /// settings, and waits until its `/readyz` answers 200.
    pub async fn spawn(db: &TestDb, prefix: &str, env: &[(&str, &str)]) -> Self {
        use trellis_testkit::http::Api as Child;
        let child =
            Child::start(Child::spawn(&db.url, prefix).env("SHUTDOWN_GRACE", "5s").envs(env.iter().copied())).await;
        let (addr, admin, http) = (child.client.addr, child.admin(), child.client.http.clone());
        Self { addr, admin, http, process: ApiProcess::Child(Box::new(child)) }
    }

    /// SIGKILL (a child process only), and wait until it is gone.
    pub async fn kill(&mut self) {
        match &mut self.process {
            ApiProcess::Child(child) => child.kill().await,
            ApiProcess::InProcess { .. } => panic!("an in-process API cannot be killed"),
        }
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(format!("http://{}/metrics", self.admin)).send().await.expect("metrics answer");
        resp.text().await.expect("metrics text")
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("http://{}{path}", self.addr));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body read");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn register(&self, handle: &str) -> User {
        let body = json!({"handle": handle, "display_name": handle, "email": format!("{handle}@example.com"), "password": PASSWORD});
        let (status, body) = self.request(reqwest::Method::POST, "/v1/users", None, Some(body)).await;
        assert_eq!(status, 201, "registering {handle}: {body:?}");
        User {
            id: body["user"]["id"].as_str().unwrap().parse().unwrap(),
            handle: handle.to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
        }
    }

    /// Files a dispute and returns its id.
    pub async fn file(&self, reporter: &User, target: Uuid, kind: &str) -> Uuid {
        let body = json!({"target_id": target.to_string(), "kind": kind, "description": "a test dispute"});
        let (status, body) =
            self.request(reqwest::Method::POST, "/v1/disputes", Some(&reporter.token), Some(body)).await;
        assert_eq!(status, 201, "filing {kind}: {body:?}");
        body["id"].as_str().expect("a dispute id").parse().unwrap()
    }

    /// The dispute as `viewer` sees it (its reporter, or a moderator).
    pub async fn dispute(&self, viewer: &User, id: Uuid) -> Value {
        let (status, body) =
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
        self.request(reqwest::Method::POST, &path, Some(&moderator.token), Some(body)).await
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        match &mut self.process {
            ApiProcess::InProcess { shutdown, .. } => shutdown.cancel(),
            // A child process is killed when its value is dropped.
            ApiProcess::Child(_) => {}
        }
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

/// The sum of the series of metric `name` whose labels include every one of `labels` (each
/// `key="value"`) in a `/metrics` text; 0 when there is none.
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (set, value) = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let set: Vec<&str> = set.split(',').collect();
            labels.iter().all(|l| set.contains(l)).then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// The value of a series (its full name with labels) in a `/metrics` text.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
