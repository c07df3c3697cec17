//! The one test harness of every crate's integration tests: each test gets its own database
//! (created and migrated, dropped afterwards) and its own NATS prefix, so the suite runs in
//! parallel against one PostgreSQL and one NATS server. It starts the workspace's binaries as
//! real processes and waits for their readiness ([`process`]), talks to the API ([`http`]),
//! reads `/metrics` ([`metrics`]), waits for conditions ([`eventually`]) and compares the
//! search read model with a rebuild ([`search_model`]). `PrivateNats`
//! starts a nats-server of the test's own, for outage scenarios; [`cluster::NatsCluster`] a
//! three-node JetStream cluster. [`browser::Browser`] is a headless Chromium of the test's own
//! under its own chromedriver, for the web console's end-to-end tests: it drives pages, saves
//! screenshots under `target/screenshots/` and checks pages with a vendored axe-core.
//!
//! Every process a test starts, and the in-process apps' `tracing` output, log to files under
//! [`log_dir`]: `cargo xtask test` scans them for the suite's passwords and credentials after
//! the run.

pub mod browser;
pub mod cluster;
pub mod http;
pub mod metrics;
pub mod otlp;
pub mod probe;
pub mod process;
pub mod replica;
pub mod search_model;
pub mod wait;

pub use process::{ClosedPort, Process, Spawn, free_port};
pub use wait::{eventually, eventually_ok, within_deadline};

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

/// `DATABASE_URL` (any database on the server; the tests create their own) or the local default.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `NATS_URL` or the local default.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The environment of every process a test starts: streams without byte limits, as
/// `trellis_runtime::nats::Topology::new` declares them in a test. nats-server reserves each
/// stream's `max_bytes` against its whole store when the stream is created, so the production
/// defaults would exhaust a server shared by every test's prefix after a few tests. The tests
/// of the limits set their own.
pub const UNLIMITED_STREAMS: [(&str, &str); 4] = [
    ("TRELLIS_EVENTS_STREAM_MAX_BYTES", "unlimited"),
    ("TRELLIS_DLQ_STREAM_MAX_BYTES", "unlimited"),
    ("TRELLIS_REPLAY_STREAM_MAX_BYTES", "unlimited"),
    ("TRELLIS_ADVISORIES_STREAM_MAX_BYTES", "unlimited"),
];

/// [`UNLIMITED_STREAMS`] as flags, for an app started in the test's process.
pub fn unlimited_stream_args() -> Vec<String> {
    UNLIMITED_STREAMS
        .iter()
        .flat_map(|(env, value)| {
            let flag = format!("--{}", env.trim_start_matches("TRELLIS_").to_ascii_lowercase().replace('_', "-"));
            [flag, (*value).to_owned()]
        })
        .collect()
}

/// A fresh prefix for stream, subject and consumer names.
pub fn nats_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A database of the test's own, dropped (with its connections) when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// A new database with every migration applied.
    pub async fn migrated() -> anyhow::Result<Self> {
        Self::migrated_on(&server_url()).await
    }

    /// [`TestDb::migrated`] on the server of `server` (a URL of any database on it).
    pub async fn migrated_on(server: &str) -> anyhow::Result<Self> {
        let db = Self::empty_on(server).await?;
        trellis_store::migrate::up(&db.pool).await.context("migrating the test database")?;
        Ok(db)
    }

    /// A new database with nothing in it (the cluster-wide database roles exist: the
    /// migrations grant to them).
    pub async fn empty() -> anyhow::Result<Self> {
        Self::empty_on(&server_url()).await
    }

    /// [`TestDb::empty`] on the server of `server`.
    pub async fn empty_on(server: &str) -> anyhow::Result<Self> {
        let server = server.to_owned();
        let name = format!("trellis_test_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(&server).await.context("connecting to DATABASE_URL")?;
        trellis_store::roles::ensure(&admin).await.context("creating the database roles")?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await?;
        admin.close().await;
        let options: PgConnectOptions = server.parse()?;
        let options = options.database(&name);
        let url = with_database(&server, &name);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect_with(options).await?;
        Ok(Self { name, url, pool })
    }

    /// The URL of the server's maintenance database: `DATABASE_URL`'s server, or the one the
    /// database was made on.
    fn server(&self) -> String {
        with_database(&self.url, "postgres")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let name = self.name.clone();
        let server = self.server();
        // Drop is synchronous: a thread of its own runs the async DROP to completion.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async move {
                let admin = PgPool::connect(&server).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await.ok()?;
                admin.close().await;
                Some(())
            })
        })
        .join();
    }
}

/// The password of every login role the tests make ([`TestDb::login_url`]); known to the log
/// scan of `cargo xtask test`, which fails if it appears in a log.
pub const TEST_ROLE_PASSWORD: &str = "role-password-for-tests-5f3a9c";

impl TestDb {
    /// A URL of this database that logs in as a member of `role` (one of
    /// `trellis_store::roles::ALL`) that acts as `role` (`SET role` is its default), with a
    /// password: `<role>_login`, created on first use (login roles are cluster-wide, shared by
    /// every test database).
    pub async fn login_url(&self, role: &str) -> anyhow::Result<String> {
        anyhow::ensure!(trellis_store::roles::ALL.contains(&role), "{role} is not a Trellis database role");
        let login = format!("{role}_login");
        let admin = PgPool::connect(&self.server()).await.context("connecting to DATABASE_URL")?;
        let create = format!(
            "DO $login$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{login}') THEN
                     BEGIN
                         CREATE ROLE {login} LOGIN PASSWORD '{TEST_ROLE_PASSWORD}' IN ROLE {role};
                         -- acts as {role}: what the owner's login creates, {role} owns
                         ALTER ROLE {login} SET role = '{role}';
                     EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
                     END;
                 END IF;
             END $login$"
        );
        sqlx::raw_sql(&create).execute(&admin).await.with_context(|| format!("creating the login role {login}"))?;
        admin.close().await;
        Ok(with_login(&self.url, &login, TEST_ROLE_PASSWORD))
    }
}

/// `url` logging in as `user` with `password`.
pub fn with_login(url: &str, user: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host = rest[..authority_end].rsplit_once('@').map_or(&rest[..authority_end], |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}{}", &rest[authority_end..])
}

/// The workspace's `target` directory, where the tests leave their logs and screenshots.
pub fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// Where the tests' logs go: `TRELLIS_TEST_LOG_DIR`, or `target/test-logs` of the workspace.
pub fn log_dir() -> PathBuf {
    let dir =
        std::env::var_os("TRELLIS_TEST_LOG_DIR").map(PathBuf::from).unwrap_or_else(|| target_dir().join("test-logs"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating the test log directory {}: {e}", dir.display()));
    dir
}

/// A new file in [`log_dir`] for the output of a process named `name`, to hand to
/// `Command::stdout` (or `stderr`): its path and the file.
pub fn log_file(name: &str) -> (PathBuf, std::fs::File) {
    let path = log_dir().join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
    let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    (path, file)
}

/// Sends this test process's `tracing` output (an in-process app's logs) to a file in
/// [`log_dir`], as JSON like the binaries write, filtered by `RUST_LOG` or
/// `info,trellis=debug` (the dev overlay's level). Once per process; later calls do nothing.
pub fn capture_logs(name: &str) {
    static CAPTURED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let (_, file) = log_file(name);
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,trellis=debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::sync::Mutex::new(file))
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init();
    });
}

/// `url` with its database path replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..].find('/').map(|i| i + scheme_end).unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..host_end], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The passwords of `deploy/nats/auth.conf`'s users on [`PrivateNats::deployed`]: (the server's
/// variable, the password). The user is the variable's middle part in lower case with `-`.
pub const DEPLOYED_NATS_PASSWORDS: [(&str, &str); 6] = [
    ("TRELLIS_API_NATS_PASSWORD", "api-nats-pw"),
    ("TRELLIS_API_MONOLITH_NATS_PASSWORD", "monolith-nats-pw"),
    ("TRELLIS_SEARCH_PROJECTOR_NATS_PASSWORD", "projector-nats-pw"),
    ("TRELLIS_SCORE_ORCHESTRATOR_NATS_PASSWORD", "orchestrator-nats-pw"),
    ("TRELLIS_DISPUTE_PROCESSOR_NATS_PASSWORD", "disputes-nats-pw"),
    ("TRELLISCTL_NATS_PASSWORD", "ctl-nats-pw"),
];

/// A nats-server with JetStream of the test's own, on a loopback port it picks (and reports in
/// its log) when it first starts.
pub struct PrivateNats {
    pub port: u16,
    store: PathBuf,
    child: Option<Child>,
    /// Its configuration file and environment, when started with [`PrivateNats::configured`].
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl PrivateNats {
    pub fn binary() -> String {
        if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
            return bin;
        }
        for candidate in ["/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server"] {
            if std::path::Path::new(candidate).exists() {
                return candidate.into();
            }
        }
        "nats-server".into()
    }

    pub fn start() -> anyhow::Result<Self> {
        let mut nats = Self::unstarted()?;
        nats.restart()?;
        Ok(nats)
    }

    fn unstarted() -> anyhow::Result<Self> {
        let store = std::env::temp_dir().join(format!("trellis-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(store.join("jetstream"))?;
        Ok(Self { port: 0, store, child: None, config: None, env: Vec::new() })
    }

    /// A directory of the server's own (removed with it), for the files its configuration names
    /// (certificates, included configuration files): make them with [`Self::configured`]'s `files`.
    pub fn dir(&self) -> &std::path::Path {
        &self.store
    }

    /// A server started with the configuration `config` (nats-server's syntax; its listen
    /// address, port and JetStream store are set on the command line) and the environment `env`
    /// (the configuration's `$VARIABLES`). `files(dir)` writes what the configuration refers to
    /// into the server's directory first (paths in `config` are relative to that directory).
    pub fn configured(
        config: &str,
        env: &[(&str, &str)],
        files: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let mut nats = Self::unstarted()?;
        files(&nats.store)?;
        let path = nats.store.join("nats-server.conf");
        std::fs::write(&path, config)?;
        nats.config = Some(path);
        nats.env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        nats.restart()?;
        Ok(nats)
    }

    /// A server with the production users and permissions (`deploy/nats/auth.conf`), their
    /// passwords [`DEPLOYED_NATS_PASSWORDS`], no TLS. Subjects have no prefix there: use an empty
    /// prefix on it.
    pub fn deployed() -> anyhow::Result<Self> {
        let auth = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/auth.conf");
        Self::configured("include \"auth.conf\"\n", &DEPLOYED_NATS_PASSWORDS, |dir| {
            std::fs::copy(&auth, dir.join("auth.conf")).with_context(|| format!("copying {}", auth.display()))?;
            Ok(())
        })
    }

    /// The server's URL with `user` and `password` in it.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and returns once it says it is ready: the first time on a port it picks,
    /// then again on that port and store (its clients reconnect to the address they know).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the server is running");
        // `-p -1`: a random free port, which the server logs.
        let port = if self.port == 0 { "-1".to_owned() } else { self.port.to_string() };
        let mut command = Command::new(Self::binary());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config).current_dir(&self.store);
        }
        let mut child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(self.store.join("jetstream"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} (set NATS_SERVER_BIN)", Self::binary()))?;
        let stderr = child.stderr.take().context("nats-server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            let line = lines.next().context("nats-server exited before it was ready")??;
            anyhow::ensure!(!line.contains("[FTL]"), "nats-server could not start: {line}");
            if let Some((_, addr)) = line.split_once("Listening for client connections on ") {
                let port = addr.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                self.port = port.with_context(|| format!("no port in the server's log line: {line}"))?;
            }
            if line.contains("Server is ready") {
                break;
            }
        }
        anyhow::ensure!(self.port != 0, "nats-server was ready without saying its port");
        // Keep draining its log so the server never blocks on a full pipe; into a log file.
        let (_, mut log) = log_file("nats-server");
        std::thread::spawn(move || {
            use std::io::Write as _;
            for line in lines.map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
            }
        });
        self.child = Some(child);
        Ok(())
    }

    /// Kills the server and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Reads what is in a stream, without disturbing any consumer of the application.
pub struct StreamReader {
    pub js: async_nats::jetstream::Context,
    pub stream: String,
}

/// One message as it sits in a stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub subject: String,
    pub sequence: u64,
    pub msg_id: Option<String>,
    pub payload: serde_json::Value,
}

impl StreamReader {
    pub async fn connect(url: &str, stream: &str) -> anyhow::Result<Self> {
        let client = async_nats::connect(url).await?;
        Ok(Self { js: async_nats::jetstream::new(client), stream: stream.to_owned() })
    }

    /// Waits (up to `timeout`) until the stream holds at least `count` messages on `filter`,
    /// then returns them all in stream order.
    pub async fn wait_for(&self, filter: &str, count: usize, timeout: Duration) -> anyhow::Result<Vec<StoredMessage>> {
        use async_nats::jetstream::consumer;
        let stream = self.js.get_stream(&self.stream).await?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < count {
            let next = tokio::time::timeout_at(deadline, messages.next()).await.with_context(|| {
                format!("only {} of {count} messages on {filter} in {} after {timeout:?}", out.len(), self.stream)
            })?;
            let msg = next.context("message stream ended")?.map_err(|e| anyhow::anyhow!(e))?;
            let info = msg.info().map_err(|e| anyhow::anyhow!(e))?;
            out.push(StoredMessage {
                subject: msg.subject.to_string(),
                sequence: info.stream_sequence,
                msg_id: msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.to_string()),
                payload: serde_json::from_slice(&msg.payload)?,
            });
        }
        Ok(out)
    }

    /// Messages currently in the stream on `filter` (the stream's own count).
    pub async fn count(&self, filter: &str) -> anyhow::Result<u64> {
        let mut stream = self.js.get_stream(&self.stream).await?;
        let info = stream.info().await?;
        if filter.ends_with('>') && info.config.subjects.iter().any(|s| s == filter) {
            return Ok(info.state.messages);
        }
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                ..Default::default()
            })
            .await?;
        let mut consumer = consumer;
        Ok(consumer.info().await?.num_pending)
    }
}

impl TestDb {
    /// Another handle on the same database (its URL and a clone of its pool) that does not drop
    /// the database: for a second application replica over one database.
    pub fn handle(&self) -> TestDb {
        TestDb { name: String::new(), url: self.url.clone(), pool: self.pool.clone() }
    }
}

impl StreamReader {
    /// Waits (up to `timeout`) until the stream exists: applications declare their streams in
    /// the background after they start. Panics after `timeout`.
    pub async fn wait_until_declared(&self, timeout: Duration) {
        let what = format!("stream {} to be declared", self.stream);
        eventually(&what, timeout, || async { self.js.get_stream(&self.stream).await.ok().map(|_| ()) }).await
    }
}
