//! The harness: a real `trellis-api` in-process, real `score-orchestrator` child processes, each
//! test on its own database and NATS prefix, and polling with deadlines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use trellis_api::{Config, Running};
use trellis_domain::score::{self, GraphBuilder};
pub use trellis_testkit::eventually;
use trellis_testkit::{Process, Spawn, TestDb};
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery staple";

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

/// A `trellis-api` running in this process.
pub struct Api {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`).
    pub admin: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    _running: Running,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub handle: String,
    pub token: String,
}

impl Api {
    pub async fn start(db: &TestDb, prefix: &str, extra: &[&str]) -> Self {
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
        Self { addr: running.api_addr, admin: running.admin_addr, http, shutdown, _running: running }
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

    pub async fn add_contact(&self, owner: &User, contact: &User) {
        let path = format!("/v1/me/contacts/{}", contact.id);
        let (status, body) =
            self.request(reqwest::Method::PUT, &path, Some(&owner.token), Some(json!({"label": ""}))).await;
        assert_eq!(status, 201, "{} adding {}: {body:?}", owner.handle, contact.handle);
    }

    /// `POST /v1/admin/score-runs`: 202 expected. Returns the id of the request's event.
    pub async fn request_run(&self, admin: &User) -> Uuid {
        let (status, body) =
            self.request(reqwest::Method::POST, "/v1/admin/score-runs", Some(&admin.token), Some(json!({}))).await;
        assert_eq!(status, 202, "requesting a score run: {body:?}");
        assert_eq!(body["status"], "requested");
        body["event_id"].as_str().and_then(|id| id.parse().ok()).expect("the request's event id")
    }

    /// `GET /v1/users/{user}/score`: 200 expected.
    pub async fn score(&self, token: &str, user: Uuid) -> Value {
        let (status, body) =
            self.request(reqwest::Method::GET, &format!("/v1/users/{user}/score"), Some(token), None).await;
        assert_eq!(status, 200, "score of {user}: {body:?}");
        body
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
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
    let change = trellis_store::flags::Change {
        flag: trellis_domain::flags::Flag::ScoreExecutor,
        value,
        actor: "test",
        reason: "test set-up",
        forced: false,
    };
    trellis_store::flags::set(&db.pool, &change).await.expect("setting score.executor");
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
