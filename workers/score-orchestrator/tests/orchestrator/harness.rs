//! The harness: real `trellis-api` and `score-orchestrator` child processes
//! (`trellis_testkit`), each test on its own database and NATS prefix.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_domain::score::{self, GraphBuilder};
pub use trellis_testkit::eventually;
pub use trellis_testkit::http::{Response, User};
use trellis_testkit::{Process, Spawn, TestDb};
use uuid::Uuid;

/// `trellis-api` as a child process (`trellis_testkit::http::Api`), killed when dropped.
pub struct Api(pub trellis_testkit::http::Api);

impl std::ops::Deref for Api {
    type Target = trellis_testkit::http::Api;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Api {
    /// Starts the API on the test's database and prefix with `extra` command-line flags, and
    /// waits until its `/readyz` answers 200.
    pub async fn start(db: &TestDb, prefix: &str, extra: &[&str]) -> Self {
        Api(trellis_testkit::http::Api::start(trellis_testkit::http::Api::spawn(&db.url, prefix).args(extra)).await)
    }

    pub async fn add_contact(&self, owner: &User, contact: &User) {
        let path = format!("/v1/me/contacts/{}", contact.id);
        let Response { status, body, .. } =
            self.request(reqwest::Method::PUT, &path, Some(&owner.token), Some(json!({"label": ""}))).await;
        assert_eq!(status, 201, "{} adding {}: {body:?}", owner.handle, contact.handle);
    }

    /// `POST /v1/admin/score-runs`: 202 expected. Returns the id of the request's event.
    pub async fn request_run(&self, admin: &User) -> Uuid {
        let Response { status, body, .. } =
            self.request(reqwest::Method::POST, "/v1/admin/score-runs", Some(&admin.token), Some(json!({}))).await;
        assert_eq!(status, 202, "requesting a score run: {body:?}");
        assert_eq!(body["status"], "requested");
        body["event_id"].as_str().and_then(|id| id.parse().ok()).expect("the request's event id")
    }

    /// `GET /v1/users/{user}/score`: 200 expected.
    pub async fn score(&self, token: &str, user: Uuid) -> Value {
        let Response { status, body, .. } =
            self.request(reqwest::Method::GET, &format!("/v1/users/{user}/score"), Some(token), None).await;
        assert_eq!(status, 200, "score of {user}: {body:?}");
        body
    }
}

/// A `score-orchestrator` child process, killed (SIGKILL) when dropped.
pub struct Replica {
    pub process: Process,
    pub host: String,
}

impl Replica {
    /// Starts a replica named `host` (its `HOSTNAME`, recorded in `score.runs.host`) and waits
    /// until its `/readyz` answers 200.
    pub async fn start(db: &TestDb, prefix: &str, host: &str, args: &[&str]) -> Self {
        let process =
            Spawn::new("score-orchestrator").on(&db.url, prefix).env("HOSTNAME", host).args(args).ready().await;
        Self { process, host: host.to_owned() }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.process.metrics().await
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }
}

/// `trellis_worker_messages_total{consumer="score-orchestrator",outcome="ok"}` in a `/metrics`
/// text: run requests a process handled.
pub fn handled(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("trellis_worker_messages_total{")
                && l.contains("consumer=\"score-orchestrator\"")
                && l.contains("outcome=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `score-orchestrator --run-once` to completion: (exit status success, stdout).
pub async fn run_once(db: &TestDb, host: &str) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_score-orchestrator"));
    cmd.arg("--run-once")
        .env("DATABASE_URL", &db.url)
        .envs(trellis_testkit::UNLIMITED_STREAMS)
        .env("NATS_URL", trellis_testkit::nats_url())
        .env("LOG_FORMAT", "json")
        .env("HOSTNAME", host)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("--run-once finishes within 60 s")
        .expect("--run-once runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--run-once`, which must succeed; returns its printed summary (one run).
pub async fn run_once_ok(db: &TestDb) -> Value {
    let (ok, stdout, stderr) = run_once(db, "run-once").await;
    assert!(ok, "--run-once failed:\n{stderr}");
    let runs: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("--run-once prints JSON ({e}): {stdout}"));
    let runs = runs.as_array().expect("a list of runs");
    assert_eq!(runs.len(), 1, "one run: {runs:?}");
    runs[0].clone()
}

/// One row of `score.runs`.
pub use trellis_domain::score::RunStatus;
pub use trellis_store::scores::RunRow as Run;

/// Every run, oldest first.
pub async fn runs(db: &TestDb) -> Vec<Run> {
    trellis_store::scores::runs(&db.pool).await.expect("reading score.runs")
}

/// Waits until `count` runs have succeeded; returns every run.
pub async fn wait_succeeded(db: &TestDb, count: usize, timeout: Duration) -> Vec<Run> {
    eventually(&format!("{count} succeeded score runs"), timeout, || async {
        let all = runs(db).await;
        (all.iter().filter(|r| r.status == RunStatus::Succeeded).count() >= count).then_some(all)
    })
    .await
}

/// Stored `(trust, score)` per user.
pub async fn stored_scores(db: &TestDb) -> HashMap<Uuid, (f64, i32)> {
    let rows: Vec<(Uuid, f64, i32)> =
        sqlx::query_as("SELECT user_id, trust, score FROM score.user_scores").fetch_all(&db.pool).await.unwrap();
    rows.into_iter().map(|(u, t, s)| (u, (t, s))).collect()
}

pub async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

pub async fn exec(db: &TestDb, sql: &str) -> u64 {
    sqlx::query(sql).execute(&db.pool).await.unwrap_or_else(|e| panic!("{sql}: {e}")).rows_affected()
}

/// A graph the test builds by hand, computed with the domain functions the way the orchestrator
/// maps it: nodes are the active users in id order.
pub struct Expected {
    pub users: Vec<Uuid>,
    pub trust: Vec<f64>,
    pub scores: Vec<i32>,
}

impl Expected {
    pub fn compute(users: &[Uuid], edges: &[(Uuid, Uuid)], verified: &[Uuid], upheld: &[(Uuid, u32)]) -> Self {
        let mut users = users.to_vec();
        users.sort();
        let index: HashMap<Uuid, u32> = users.iter().enumerate().map(|(i, u)| (*u, i as u32)).collect();
        let mut builder = GraphBuilder::new(users.len());
        for (a, b) in edges {
            builder.add_edge(index[a], index[b]);
        }
        for v in verified {
            builder.mark_verified(index[v]);
        }
        let mut disputes = vec![0u32; users.len()];
        for (u, k) in upheld {
            disputes[index[u] as usize] = *k;
        }
        let trust = score::compute_trust(&builder.build()).trust;
        let scores = score::scores(&trust, &disputes);
        Self { users, trust, scores }
    }

    pub fn of(&self, user: Uuid) -> (f64, i32) {
        let i = self.users.iter().position(|u| *u == user).expect("a user of the graph");
        (self.trust[i], self.scores[i])
    }
}

/// The `n` users `u1`…`un` created by SQL, with ids in creation order; those with `i % verified_every == 0`
/// verified. Returns their ids, index 0 = `u1`.
pub async fn seed_users(db: &TestDb, n: i64, verified_every: i64) -> Vec<Uuid> {
    exec(
        db,
        &format!(
            "INSERT INTO identity.users (id, handle, display_name, email, password_hash, verified)
             SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'u' || i, 'u' || i,
                    'u' || i || '@example.com', 'x', i % {verified_every} = 0
             FROM generate_series(1, {n}) i"
        ),
    )
    .await;
    (1..=n).map(seeded_id).collect()
}

pub fn seeded_id(i: i64) -> Uuid {
    format!("00000000-0000-4000-8000-{i:012x}").parse().unwrap()
}

/// Between 1 and 20 contacts for each of the users `u1`…`un` (about 10.5 on average), to
/// fixed offsets; foreign-key checks are skipped for speed (every id exists).
pub async fn seed_contacts(db: &TestDb, n: i64) -> i64 {
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica").execute(&mut *conn).await.unwrap();
    let done = sqlx::query(&format!(
        "INSERT INTO contacts.contacts (owner_id, contact_id)
         SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
                ('00000000-0000-4000-8000-' || lpad(to_hex((i - 1 + o.off) % {n} + 1), 12, '0'))::uuid
         FROM generate_series(1, {n}) i
         JOIN LATERAL unnest('{{1,7,31,127,499,1999,7919,20011,45007,77003,3,5,11,13,17,19,23,29,37,41}}'::int[])
             WITH ORDINALITY o(off, k) ON o.k <= 1 + i % 20 AND o.off % {n} <> 0
         ON CONFLICT DO NOTHING"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("SET session_replication_role = DEFAULT").execute(&mut *conn).await.unwrap();
    done.rows_affected() as i64
}

/// Makes `user` an admin.
pub async fn make_admin(db: &TestDb, user: Uuid) {
    let done = sqlx::query("UPDATE identity.users SET role = 'admin' WHERE id = $1").bind(user).execute(&db.pool).await;
    assert_eq!(done.unwrap().rows_affected(), 1);
}

pub async fn set_verified(db: &TestDb, user: Uuid) {
    let done =
        sqlx::query("UPDATE identity.users SET verified = true WHERE id = $1").bind(user).execute(&db.pool).await;
    assert_eq!(done.unwrap().rows_affected(), 1);
}

/// `trellisctl`, built next to this package's binary by the workspace build.
pub fn trellisctl() -> std::path::PathBuf {
    trellis_testkit::process::binary("trellisctl")
}

/// Runs `trellisctl args…` on the test's database: (exit status success, stdout, stderr).
pub async fn run_trellisctl(db: &TestDb, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(trellisctl())
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("TRELLIS_ACTOR", "test")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("trellisctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sets `score.executor` without the promotion gate (set-up, not the operator's path).
pub async fn set_score_executor(db: &TestDb, value: trellis_domain::flags::Executor) {
    let change = trellis_store::cutover::flags::Change {
        flag: trellis_domain::flags::Flag::ScoreExecutor,
        value,
        actor: "test",
        reason: "test set-up",
        forced: false,
    };
    trellis_store::cutover::flags::set(&db.pool, &change).await.expect("setting score.executor");
}

/// Waits until the durable consumer `name` (without prefix) exists on the events stream.
pub async fn wait_for_consumer(prefix: &str, name: &str) {
    let client = async_nats::connect(trellis_testkit::nats_url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let (stream, consumer) = (format!("{prefix}_EVENTS"), format!("{prefix}_{name}"));
    eventually(&format!("consumer {consumer}"), Duration::from_secs(30), || {
        let (js, stream, consumer) = (js.clone(), stream.clone(), consumer.clone());
        async move {
            let _: async_nats::jetstream::consumer::PullConsumer =
                js.get_stream(&stream).await.ok()?.get_consumer(&consumer).await.ok()?;
            Some(())
        }
    })
    .await;
}

/// The production rules' expected output over the graph as the database holds it now (active
/// users, their contacts, verified flags; no disputes).
pub async fn expected_from_db(db: &TestDb) -> Expected {
    let users: Vec<(Uuid, bool)> = sqlx::query_as("SELECT id, verified FROM identity.users WHERE status = 'active'")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let edges: Vec<(Uuid, Uuid)> =
        sqlx::query_as("SELECT owner_id, contact_id FROM contacts.contacts").fetch_all(&db.pool).await.unwrap();
    let ids: Vec<Uuid> = users.iter().map(|u| u.0).collect();
    let verified: Vec<Uuid> = users.iter().filter(|u| u.1).map(|u| u.0).collect();
    Expected::compute(&ids, &edges, &verified, &[])
}

/// Waits until every event in the outbox is published and consumer `name` (without prefix) has
/// acknowledged everything it was delivered.
pub async fn handled_all(db: &TestDb, prefix: &str, name: &str) {
    let client = async_nats::connect(trellis_testkit::nats_url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let (stream, consumer) = (format!("{prefix}_EVENTS"), format!("{prefix}_{name}"));
    eventually(&format!("consumer {consumer} to handle everything"), Duration::from_secs(60), || {
        let (js, stream, consumer) = (js.clone(), stream.clone(), consumer.clone());
        async move {
            let unpublished = count(db, "SELECT count(*) FROM ops.outbox WHERE published_at IS NULL").await;
            if unpublished > 0 {
                return None;
            }
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                js.get_stream(&stream).await.ok()?.get_consumer(&consumer).await.ok()?;
            let info = c.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        }
    })
    .await;
}
