//! The test harness: a real `trellis-api` on port 0 (in this process, or as a child process
//! for the tests that read its metrics: the metrics recorder is one per process), its own
//! database and NATS prefix, and a plain HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use trellis_api::{Config, Running};
use trellis_testkit::{StreamReader, TestDb};

use trellis_testkit::http::Client;
pub use trellis_testkit::http::{PASSWORD, Response as Resp};

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub db: TestDb,
    pub prefix: String,
    pub nats_url: String,
    pub http: reqwest::Client,
    /// The public listener's client (`trellis_testkit::http`).
    pub client: Client,
    shutdown: CancellationToken,
    running: Option<Running>,
    /// The child process, when [`Options::process`] asked for one.
    process: Option<trellis_testkit::Process>,
}

/// How to start a test app; `Default` is the usual one.
#[derive(Default)]
pub struct Options {
    /// Another NATS server than `NATS_URL` (a private one, for outage tests).
    pub nats_url: Option<String>,
    /// Another way to the test's database than its URL (through a proxy, for fault tests).
    pub database_url: Option<String>,
    /// Extra command-line flags.
    pub args: Vec<String>,
    /// Runs the `trellis-api` binary as a child process instead of in this process: for the
    /// tests that read `/metrics`, which in-process apps share (one recorder per process).
    pub process: bool,
    /// Extra environment of the child process (with [`Options::process`]).
    pub env: Vec<(&'static str, String)>,
}

#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub handle: String,
    pub token: String,
}

impl From<trellis_testkit::http::User> for TestUser {
    fn from(user: trellis_testkit::http::User) -> TestUser {
        TestUser { id: user.id.to_string(), handle: user.handle, token: user.token }
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let db = TestDb::migrated().await.expect("test database");
        let prefix = trellis_testkit::nats_prefix();
        Self::start_on(db, prefix, options).await
    }

    /// Starts an app on an existing database and prefix (a second replica, or a restart).
    pub async fn start_on(db: TestDb, prefix: String, options: Options) -> Self {
        trellis_testkit::capture_logs("trellis-api-in-process");
        let nats_url = options.nats_url.unwrap_or_else(trellis_testkit::nats_url);
        let database_url = options.database_url.unwrap_or_else(|| db.url.clone());
        let mut args: Vec<String> = [
            "trellis-api",
            "--database-url",
            &database_url,
            "--nats-url",
            &nats_url,
            "--nats-prefix",
            &prefix,
            "--api-addr",
            "127.0.0.1:0",
            "--log-format",
            "pretty",
            "--shutdown-grace",
            "5s",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        // Tests file impersonation disputes from accounts made a moment before, and register
        // more users from one address than an hour's production allowance; the tests of these
        // limits pass their own values.
        // Refusals are answered at once, so that tests of many refused requests stay fast; the
        // test of the delay passes its own.
        // The token cache is off: tests change users and tokens behind the API's back (a role
        // granted, a user suspended in the database) and expect the very next request to see it,
        // where a cache sees it once the database's notification arrives, milliseconds later. The
        // cache's own tests (`token_cache.rs`) turn it on.
        for (flag, value) in [
            ("--admin-addr", "127.0.0.1:0"),
            ("--dispute-p0-min-account-age", "0s"),
            ("--registration-rate-per-address", "10000"),
            ("--refusal-delay", "0s"),
            ("--token-cache-ttl", "0s"),
        ] {
            if !options.args.iter().any(|a| a == flag) {
                args.extend([flag.to_owned(), value.to_owned()]);
            }
        }
        for pair in trellis_testkit::unlimited_stream_args().chunks(2) {
            if !options.args.iter().any(|a| *a == pair[0]) {
                args.extend(pair.iter().cloned());
            }
        }
        args.extend(options.args);
        let shutdown = CancellationToken::new();
        let (addr, admin_addr, running, process) = if options.process {
            let spawn = trellis_testkit::Spawn::new("trellis-api").args(&args[1..]);
            let mut process = options.env.iter().fold(spawn, |s, (k, v)| s.env(k, v)).spawn();
            process.wait_listening(trellis_testkit::process::READY_WITHIN).await;
            (process.api(), process.admin(), None, Some(process))
        } else {
            let config = Config::try_parse_from(args).expect("test config parses");
            let running = trellis_api::start(config, shutdown.clone()).await.expect("app starts");
            (running.api_addr, running.admin_addr, Some(running), None)
        };
        let client = Client::new(addr);
        Self { addr, admin_addr, db, prefix, nats_url, http: client.http.clone(), client, shutdown, running, process }
    }

    /// Shuts the app down gracefully and hands back its database and prefix.
    pub async fn stop(mut self) -> (TestDb, String) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await.expect("clean shutdown");
        }
        if let Some(mut process) = self.process.take() {
            process.terminate().await;
            assert_eq!(process.wait_exit(Duration::from_secs(30)).await, Some(0), "clean shutdown");
        }
        let db = std::mem::replace(&mut self.db, placeholder_db());
        (db, std::mem::take(&mut self.prefix))
    }

    pub fn url(&self, path: &str) -> String {
        self.client.url(path)
    }

    pub async fn request(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Resp {
        self.client.request(method, path, token, body).await
    }

    pub fn build(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::RequestBuilder {
        self.client.build(method, path, token, body)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        self.client.send(req).await
    }

    /// `/readyz` on the admin port: the status with every check and its error.
    pub async fn admin_readyz(&self) -> Resp {
        self.send(self.http.get(format!("http://{}/readyz", self.admin_addr))).await
    }

    /// Polls `/readyz` on the admin port until its `status` is `want` (`ready` or `degraded`,
    /// answered with 200) with every check named in `failing` failing, and returns that report.
    /// A status alone does not tell which check caused it: right after NATS stops, a report may
    /// be `degraded` by its `jetstream` check alone (a request to the stopped server timing out)
    /// while the client has not yet noticed the lost connection.
    pub async fn wait_for_readiness(&self, want: &str, failing: &[&str], timeout: Duration) -> Value {
        let what = format!("/readyz to say {want} with {failing:?} failing");
        trellis_testkit::eventually(&what, timeout, || async {
            let r = self.admin_readyz().await;
            let failed = |name: &str| readiness_check(&r.body, name)["ok"] == false;
            (r.body["status"] == want && failing.iter().all(|name| failed(name))).then(|| {
                assert_eq!(r.status, 200, "readyz answers 200 when {want}: {:?}", r.body);
                r.body
            })
        })
        .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.request(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.request(Method::POST, path, token, Some(body)).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.request(Method::PUT, path, token, Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.request(Method::PATCH, path, token, Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Resp {
        self.request(Method::DELETE, path, token, None).await
    }

    /// Registers `handle` (display name `<handle> name`, e-mail `<handle>@example.com`,
    /// password [`PASSWORD`]).
    pub async fn register(&self, handle: &str) -> TestUser {
        self.client.register_named(handle, &format!("{handle} name")).await.into()
    }

    /// Gives `user` a role the way `trellisctl users grant-role` does (audited).
    pub async fn grant_role(&self, user: &TestUser, role: &str) {
        let actor = trellis_store::user_admin::Actor { name: "api-tests", user_id: None };
        let reason = trellis_domain::identity::AdminReason::parse("test set-up").unwrap();
        let role = role.parse().expect("a role");
        let mut tx = self.db.pool.begin().await.unwrap();
        let granted = trellis_commands::users::grant_role(&mut tx, user.id.parse().unwrap(), role, &actor, &reason)
            .await
            .expect("granting a role");
        trellis_commands::commit(tx, granted).await.expect("committing a role").expect("a new role");
    }

    /// A reader of this app's `EVENTS` stream.
    pub async fn events(&self) -> StreamReader {
        StreamReader::connect(&self.nats_url, &format!("{}_EVENTS", self.prefix)).await.expect("stream reader")
    }

    /// The subject as this app's prefix makes it.
    pub fn subject(&self, base: &str) -> String {
        format!("{}.{base}", self.prefix)
    }

    /// Waits up to 10 s for `count` events on `events.<filter>`.
    pub async fn wait_for_events(&self, filter: &str, count: usize) -> Vec<trellis_testkit::StoredMessage> {
        self.events()
            .await
            .wait_for(&self.subject(&format!("events.{filter}")), count, Duration::from_secs(10))
            .await
            .expect("events reach the stream")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn placeholder_db() -> TestDb {
    // Only used to move the real one out of a value that implements Drop.
    TestDb {
        name: String::new(),
        url: String::new(),
        pool: sqlx::PgPool::connect_lazy("postgres://localhost/x").unwrap(),
    }
}

/// Helpers of the outbox, idempotency, errors and OpenAPI tests.
impl TestApp {
    /// `GET` on the admin listener, as text.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(format!("http://{}{}", self.admin_addr, path)).send().await.expect("admin request");
        (resp.status().as_u16(), resp.text().await.expect("admin body"))
    }

    /// The value of an unlabelled gauge or counter on the admin `/metrics`, if it is there.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "/metrics answers");
        trellis_testkit::metrics::series(&text, name)
    }

    /// The value of the series `name{labels}` on the admin `/metrics` (`labels` as Prometheus
    /// prints them, e.g. `limiter="login_account"`), if it is there.
    pub async fn labelled_metric(&self, name: &str, labels: &str) -> Option<f64> {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "/metrics answers");
        trellis_testkit::metrics::series(&text, &format!("{name}{{{labels}}}"))
    }

    /// An HTTP client whose connections come from `ip` (a loopback address such as
    /// `127.0.0.2`): tests tell clients apart by source address.
    pub fn client_from(ip: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .local_address(ip.parse::<std::net::IpAddr>().expect("an IP address"))
            .build()
            .expect("http client")
    }

    /// A request on another client (see [`client_from`](Self::client_from)).
    pub fn build_on(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::RequestBuilder {
        self.client.build_on(client, method, path, token, body)
    }

    /// Rows of `ops.outbox` not yet published.
    pub async fn unpublished(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")
            .fetch_one(&self.db.pool)
            .await
            .expect("counting the outbox")
    }

    /// Waits (up to `timeout`) until every outbox row is marked published.
    pub async fn wait_all_published(&self, timeout: Duration) {
        trellis_testkit::eventually("every outbox row published", timeout, || async {
            (self.unpublished().await == 0).then_some(())
        })
        .await;
    }
}

/// Shortcuts for the contacts, circles, disputes, scores and authorization tests.
impl TestApp {
    /// `owner` adds `contact` (201 expected).
    pub async fn add_contact(&self, owner: &TestUser, contact: &TestUser) {
        let r = self.put(&format!("/v1/me/contacts/{}", contact.id), Some(&owner.token), json!({"label": ""})).await;
        assert_eq!(r.status, 201, "{} adding {}: {:?}", owner.handle, contact.handle, r.body);
    }

    /// `owner` creates a circle (201 expected); returns its id.
    pub async fn create_circle(&self, owner: &TestUser, name: &str) -> String {
        let r = self.post("/v1/me/circles", Some(&owner.token), json!({"name": name})).await;
        assert_eq!(r.status, 201, "{} creating circle {name}: {:?}", owner.handle, r.body);
        r.body["id"].as_str().unwrap().to_owned()
    }

    /// `reporter` files a dispute of `kind` against `target` (201 expected); returns the dispute.
    pub async fn file_dispute(&self, reporter: &TestUser, target: &TestUser, kind: &str) -> Value {
        let r = self
            .post(
                "/v1/disputes",
                Some(&reporter.token),
                json!({"target_id": target.id, "kind": kind, "description": format!("{} reports {kind}", reporter.handle)}),
            )
            .await;
        assert_eq!(r.status, 201, "{} filing {kind} against {}: {:?}", reporter.handle, target.handle, r.body);
        r.body
    }

    /// Suspends `user` directly in the database (as an upheld dispute or on-call would).
    pub async fn suspend_in_db(&self, user: &TestUser) {
        let done = sqlx::query("UPDATE identity.users SET status = 'suspended' WHERE id = $1::uuid")
            .bind(&user.id)
            .execute(&self.db.pool)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }

    /// Follows `next_cursor` from `path` (which may already have a query) until the last page;
    /// returns every page's items, page by page. Every page must answer 200.
    pub async fn pages(&self, path: &str, token: &str) -> Vec<Vec<Value>> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let url = match &cursor {
                None => path.to_owned(),
                Some(c) => format!("{path}{sep}cursor={c}"),
            };
            let r = self.get(&url, Some(token)).await;
            assert_eq!(r.status, 200, "{url}: {:?}", r.body);
            pages.push(r.body["items"].as_array().expect("a list has items").clone());
            assert!(pages.len() <= 1000, "{path}: the cursor never ends");
            match r.body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => {
                    assert!(r.body["next_cursor"].is_null(), "{url}: next_cursor is a string or null");
                    return pages;
                }
            }
        }
    }
}

impl TestApp {
    /// Starts a graceful shutdown (what SIGTERM does) without waiting for it.
    pub async fn begin_shutdown(&self) {
        self.shutdown.cancel();
        if let Some(process) = &self.process {
            process.terminate().await;
        }
    }
}

/// The API's database backends, as `pg_stat_activity` shows them.
impl TestApp {
    /// Waits (up to 10 s) until a statement of the API's request pool waits on a lock; returns
    /// that backend's pid.
    pub async fn wait_for_lock_wait(&self) -> i32 {
        waiting_on_lock(&self.db).await
    }

    /// Backends of the API's request pool that are in a transaction.
    pub async fn api_backends_in_transaction(&self) -> i64 {
        api_backends_in_transaction(&self.db).await
    }

    /// Ends every backend of the API's request pool (`pg_terminate_backend`); returns how many.
    pub async fn terminate_api_backends(&self) -> usize {
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'trellis-api'",
        )
        .bind(&self.db.name)
        .fetch_all(&self.db.pool)
        .await
        .expect("terminating the API's backends");
        ended.into_iter().filter(|e| *e).count()
    }
}

/// Waits (up to 10 s) until a statement of a `trellis-api` request pool on `db` waits on a lock;
/// returns that backend's pid.
pub async fn waiting_on_lock(db: &TestDb) -> i32 {
    trellis_testkit::eventually("a request of the API waiting on a lock", Duration::from_secs(10), || async {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'trellis-api' AND wait_event_type = 'Lock'",
        )
        .bind(&db.name)
        .fetch_optional(&db.pool)
        .await
        .expect("reading pg_stat_activity")
    })
    .await
}

/// Backends of a `trellis-api` request pool on `db` that are in a transaction.
pub async fn api_backends_in_transaction(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = $1 AND application_name = 'trellis-api' AND xact_start IS NOT NULL",
    )
    .bind(&db.name)
    .fetch_one(&db.pool)
    .await
    .expect("reading pg_stat_activity")
}

/// The check `name` of a `/readyz` report.
pub fn readiness_check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("{name} check"))
}
