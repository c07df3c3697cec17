//! `cargo xtask up [--stage a|b] [--nats-cluster]`: the whole system on this machine, for a new user.
//! With `--nats-cluster`, NATS is a three-node JetStream cluster on loopback (testkit's
//! `trellis-nats-cluster`, stores in a temporary directory) and every process gets the three
//! client URLs as `NATS_URL`.
//!
//! Services (see `services.rs`) → build → migrate → trellis-api and the workers that exist →
//! wait for `/readyz` → demo data on first run (four users, a score run, and the operator `ops`
//! for the on-call console, its role granted with `trellisctl`) → stream logs until Ctrl-C or
//! SIGTERM, then SIGTERM every child (they drain), wait a bounded time, stop the private services
//! we started.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::cluster::NatsCluster;
use crate::flags::{self, Stage};
use crate::services::{self, Stack};
use crate::util;

const DEFAULT_API_ADDR: &str = "127.0.0.1:8080";
const API_ADMIN_ADDR: &str = "127.0.0.1:9080";
/// The extracted workers and their admin (health/metrics) addresses. Each starts only if its
/// binary has been built, so `up` works at every step of the extraction.
const WORKERS: [(&str, &str); 3] = [
    ("score-orchestrator", "127.0.0.1:9081"),
    ("search-projector", "127.0.0.1:9082"),
    ("dispute-processor", "127.0.0.1:9083"),
];
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the children get to drain after SIGTERM before they are killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(45);

const DEMO_PASSWORD: &str = "correct horse battery staple";
const DEMO_HANDLES: [&str; 4] = ["alice", "bob", "carol", "dave"];
/// The demo operator: a fifth demo user with the `operator` role, to sign in to the console with.
const DEMO_OPERATOR: &str = "ops";

pub fn run(flags: &flags::Up) -> anyhow::Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = Arc::clone(&interrupted);
        ctrlc::set_handler(move || interrupted.store(true, Ordering::SeqCst))
            .context("cannot install the Ctrl-C / SIGTERM handler")?;
    }
    let stop_requested = || interrupted.load(Ordering::SeqCst);

    // Dropping `stack` (on return or error) stops the private services started here.
    let mut stack = if flags.nats_cluster { Stack::ensure_postgres()? } else { Stack::ensure()? };
    let bin_dir = util::target_dir().join("debug");
    let mut build = util::cargo();
    build.args(["build", "--workspace", "--bins", "--exclude", "xtask"]);
    eprintln!("xtask: build: {}", util::display(&build));
    let built = util::run(&mut build);
    if stop_requested() {
        return Ok(());
    }
    built.context("build failed")?;
    // Dropping `cluster` (on return or error) stops its three nodes, after the children.
    let cluster = if flags.nats_cluster {
        let cluster = NatsCluster::start(&bin_dir.join("trellis-nats-cluster"), &[])?;
        stack.nats_url = cluster.nats_url.clone();
        Some(cluster)
    } else {
        None
    };
    let mut steps: Vec<(&str, Command)> = vec![("migrate", {
        let mut cmd = Command::new(bin_dir.join("trellisctl"));
        cmd.args(["migrate", "up"]).env("DATABASE_URL", &stack.database_url).env("NATS_URL", &stack.nats_url);
        cmd
    })];
    // Stage A: trellis-api executes every processor; stage B: the workers do. A development
    // stack has no shadow period to pass the promotion gate with: the move to the workers is
    // forced (and audited as such).
    let executor = if flags.stage == Stage::A { "monolith" } else { "worker" };
    for flag in ["score.executor", "search.executor", "dispute.executor"] {
        let mut cmd = Command::new(bin_dir.join("trellisctl"));
        cmd.args(["flags", "set", flag, executor, "--reason"])
            .arg(format!("cargo xtask up --stage {}", flags.stage.as_str()))
            .args(["--actor", "xtask", "--force"])
            .env("DATABASE_URL", &stack.database_url);
        steps.push(("flags", cmd));
    }
    for (name, mut cmd) in steps {
        if stop_requested() {
            return Ok(());
        }
        eprintln!("xtask: {name}: {}", util::display(&cmd));
        let result = util::run(&mut cmd);
        // A Ctrl-C reaches cargo too (same process group): that is a stop, not a failure.
        if stop_requested() {
            return Ok(());
        }
        result.with_context(|| format!("{name} failed"))?;
    }

    let api_addr = std::env::var("API_ADDR").unwrap_or_else(|_| DEFAULT_API_ADDR.to_owned());
    let api_url = format!("http://{api_addr}");
    let mut children = Vec::new();
    let mut api = child_command(&bin_dir, "trellis-api", &stack, API_ADMIN_ADDR);
    api.env("API_ADDR", &api_addr).env("TRELLIS_STAGE", flags.stage.as_str());
    children.push(Supervised::spawn("trellis-api", &mut api)?);
    if flags.stage == Stage::B {
        for (name, admin_addr) in WORKERS {
            if bin_dir.join(name).exists() {
                let mut worker = child_command(&bin_dir, name, &stack, admin_addr);
                children.push(Supervised::spawn(name, &mut worker)?);
            } else {
                eprintln!("xtask: {name} is not built (no such binary yet); not started");
            }
        }
    }

    // A trust-score run over the demo data once it is seeded, so that a newcomer's first
    // `GET /v1/users/bob/score` has a score to show.
    let mut score_run = Command::new(bin_dir.join("trellisctl"));
    score_run.args(["score", "run", "--wait"]).env("DATABASE_URL", &stack.database_url);
    // The demo operator's role, granted as in production: with trellisctl, audited.
    let mut grant = Command::new(bin_dir.join("trellisctl"));
    grant
        .args(["users", "grant-role", DEMO_OPERATOR, "operator", "--reason", "demo operator"])
        .args(["--actor", "cargo xtask up"])
        .env("DATABASE_URL", &stack.database_url)
        .env("NATS_URL", &stack.nats_url);
    let demo = DemoCommands { score_run: &mut score_run, grant: &mut grant };
    let outcome = serve(&api_url, &mut children, demo, &stop_requested);
    shutdown(&mut children);
    drop(cluster);
    drop(stack);
    outcome
}

/// The trellisctl commands of the demo data: the score run, the demo operator's role.
struct DemoCommands<'a> {
    score_run: &'a mut Command,
    grant: &'a mut Command,
}

/// Waits for readiness, seeds, prints the banner, then waits for a stop request.
/// Returns an error if a child exits on its own.
fn serve(
    api_url: &str,
    children: &mut [Supervised],
    demo: DemoCommands<'_>,
    stop_requested: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    let http = util::local_http_agent(Duration::from_secs(10));
    eprintln!("xtask: waiting for {api_url}/readyz");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if stop_requested() {
            return Ok(());
        }
        check_alive(children)?;
        let ready = http.get(&format!("{api_url}/readyz")).call().is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        if Instant::now() >= deadline {
            bail!("trellis-api did not become ready within {}s", READY_TIMEOUT.as_secs());
        }
        thread::sleep(Duration::from_millis(250));
    }

    let demo_data = match seed_demo_data(&http, api_url) {
        Ok(true) => {
            eprintln!("xtask: score run: {}", util::display(demo.score_run));
            match util::run(demo.score_run) {
                Ok(()) => "created just now, with a completed score run",
                Err(err) => {
                    eprintln!("xtask: the demo score run failed: {err:#}");
                    "created just now; its score run FAILED, see above"
                }
            }
        }
        Ok(false) => "already there",
        Err(err) => {
            eprintln!("xtask: could not seed the demo data: {err:#}");
            "NOT seeded, see above"
        }
    };
    let console = console_url(api_url);
    let operator = match seed_demo_operator(&http, api_url, console.as_deref(), demo.grant) {
        Ok(true) => "created just now",
        Ok(false) => "already there",
        Err(err) => {
            eprintln!("xtask: could not seed the demo operator: {err:#}");
            "NOT seeded, see above"
        }
    };
    print_banner(api_url, console.as_deref(), children, demo_data, operator);

    while !stop_requested() {
        check_alive(children)?;
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("\nxtask: stopping");
    Ok(())
}

fn child_command(bin_dir: &Path, name: &str, stack: &Stack, admin_addr: &str) -> Command {
    let mut cmd = Command::new(bin_dir.join(name));
    // NATS_PREFIX, RUST_LOG and the like are inherited from our environment.
    cmd.env("DATABASE_URL", &stack.database_url).env("NATS_URL", &stack.nats_url).env("ADMIN_ADDR", admin_addr);
    if std::env::var_os("LOG_FORMAT").is_none() {
        cmd.env("LOG_FORMAT", "pretty");
    }
    // nats-server reserves each stream's byte limit when the stream is made; the production
    // limits (10 GiB of events, …) are more than a development machine's JetStream store has, so
    // the development stack's streams have none unless the environment says otherwise.
    for (name, value) in crate::bench::UNLIMITED_STREAMS {
        if std::env::var_os(name).is_none() {
            cmd.env(name, value);
        }
    }
    cmd
}

/// A child process whose output is copied to ours, each line prefixed with its name.
struct Supervised {
    name: &'static str,
    child: Child,
    exited: Option<ExitStatus>,
    copiers: Vec<JoinHandle<()>>,
}

impl Supervised {
    fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Supervised> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: the terminal's Ctrl-C reaches only us, and we decide the
            // order of shutdown (children drain while PostgreSQL and NATS are still up).
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let copiers = vec![copy_lines(name, stdout, std::io::stdout), copy_lines(name, stderr, std::io::stderr)];
        eprintln!("xtask: started {name} (pid {})", child.id());
        Ok(Supervised { name, child, exited: None, copiers })
    }

    fn poll(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }
}

fn copy_lines<R, W>(name: &'static str, from: R, to: fn() -> W) -> JoinHandle<()>
where
    R: Read + Send + 'static,
    W: Write + 'static,
{
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            let _ = writeln!(to(), "{name:>18} | {}", text.trim_end());
            line.clear();
        }
    })
}

fn check_alive(children: &mut [Supervised]) -> anyhow::Result<()> {
    for child in children.iter_mut() {
        if let Some(status) = child.poll()? {
            bail!("{} exited on its own ({status})", child.name);
        }
    }
    Ok(())
}

/// SIGTERM to every child still running, then wait up to [`SHUTDOWN_GRACE`]; kill the rest.
fn shutdown(children: &mut [Supervised]) {
    for child in children.iter_mut() {
        if matches!(child.poll(), Ok(None))
            && let Err(err) = services::terminate(child.child.id())
        {
            eprintln!("xtask: cannot signal {}: {err:#}", child.name);
        }
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    for child in children.iter_mut() {
        loop {
            match child.poll() {
                Ok(Some(status)) => {
                    eprintln!("xtask: {} stopped ({status})", child.name);
                    break;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
                _ => {
                    eprintln!(
                        "xtask: {} did not stop within {}s; killing it (not a graceful shutdown)",
                        child.name,
                        SHUTDOWN_GRACE.as_secs()
                    );
                    let _ = child.child.kill();
                    let _ = child.child.wait();
                    break;
                }
            }
        }
        for copier in child.copiers.drain(..) {
            let _ = copier.join();
        }
    }
}

/// Seeds the demo users, contacts and circle unless `alice` can already sign in. Returns
/// whether it seeded.
fn seed_demo_data(http: &ureq::Agent, api_url: &str) -> anyhow::Result<bool> {
    let probe = http
        .post(&format!("{api_url}/v1/sessions"))
        .send_json(json!({ "login": "alice", "password": DEMO_PASSWORD }))?;
    match probe.status().as_u16() {
        401 => {}
        201 => return Ok(false),
        other => bail!("POST /v1/sessions for alice answered {other}; not seeding"),
    }
    eprintln!("xtask: seeding demo data");
    let api = Api { http, url: api_url };
    let mut users = Vec::new();
    for handle in DEMO_HANDLES {
        let mut display_name = handle.to_owned();
        display_name[..1].make_ascii_uppercase();
        let created = api.send(
            "POST",
            "/v1/users",
            None,
            json!({
                "handle": handle,
                "display_name": display_name,
                "email": format!("{handle}@example.com"),
                "password": DEMO_PASSWORD,
            }),
        )?;
        let id = string_at(&created, "/user/id")?;
        let token = string_at(&created, "/token")?;
        users.push(DemoUser { id, token });
    }
    let [alice, bob, carol, _dave] = &users[..] else { unreachable!("four demo users") };
    for (owner, contact, label) in
        [(alice, bob, "Bob"), (alice, carol, "Carol"), (bob, carol, "Carol"), (carol, alice, "Alice")]
    {
        api.send("PUT", &format!("/v1/me/contacts/{}", contact.id), Some(&owner.token), json!({ "label": label }))?;
    }
    let circle = api.send("POST", "/v1/me/circles", Some(&alice.token), json!({ "name": "friends" }))?;
    let circle_id = string_at(&circle, "/id")?;
    api.send("PUT", &format!("/v1/me/circles/{circle_id}/members/{}", bob.id), Some(&alice.token), json!({}))?;
    Ok(true)
}

/// Where the console is, as trellis-api serves it (`CONSOLE`, inherited from our environment):
/// on the API's listener (the default), on its admin listener, or nowhere.
fn console_url(api_url: &str) -> Option<String> {
    match std::env::var("CONSOLE").unwrap_or_default().to_ascii_lowercase().as_str() {
        "off" => None,
        "admin" => Some(format!("http://{API_ADMIN_ADDR}/console")),
        _ => Some(format!("{api_url}/console")),
    }
}

/// Creates the demo operator and grants it the `operator` role, unless it can already sign in
/// to the console (without a console: unless it can sign in at all). Returns whether it seeded.
fn seed_demo_operator(
    http: &ureq::Agent,
    api_url: &str,
    console: Option<&str>,
    grant: &mut Command,
) -> anyhow::Result<bool> {
    let exists = match console {
        Some(console) => {
            let probe = http
                .post(&format!("{console}/sign-in"))
                .send_form([("login", DEMO_OPERATOR), ("password", DEMO_PASSWORD)])?;
            match probe.status().as_u16() {
                // Signed in: the account exists and has a console role.
                303 => return Ok(false),
                // The account exists without a console role (a run stopped before the grant).
                403 => true,
                401 => false,
                other => bail!("POST {console}/sign-in for {DEMO_OPERATOR} answered {other}; not seeding"),
            }
        }
        None => {
            let probe = http
                .post(&format!("{api_url}/v1/sessions"))
                .send_json(json!({ "login": DEMO_OPERATOR, "password": DEMO_PASSWORD }))?;
            match probe.status().as_u16() {
                201 => return Ok(false),
                401 => false,
                other => bail!("POST /v1/sessions for {DEMO_OPERATOR} answered {other}; not seeding"),
            }
        }
    };
    if !exists {
        eprintln!("xtask: seeding the demo operator `{DEMO_OPERATOR}`");
        let api = Api { http, url: api_url };
        api.send(
            "POST",
            "/v1/users",
            None,
            json!({
                "handle": DEMO_OPERATOR,
                "display_name": "Ops",
                "email": format!("{DEMO_OPERATOR}@example.com"),
                "password": DEMO_PASSWORD,
            }),
        )?;
    }
    eprintln!("xtask: grant: {}", util::display(grant));
    util::run(grant).context("granting the demo operator its role")?;
    Ok(true)
}

struct DemoUser {
    id: String,
    token: String,
}

struct Api<'a> {
    http: &'a ureq::Agent,
    url: &'a str,
}

impl Api<'_> {
    /// Sends a JSON request; fails unless the answer is 2xx. Returns the body (`null` if none).
    fn send(&self, method: &str, path: &str, token: Option<&str>, body: Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url);
        let mut request = match method {
            "POST" => self.http.post(&url),
            "PUT" => self.http.put(&url),
            _ => bail!("unsupported method {method}"),
        };
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = request.send_json(&body).with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        if !status.is_success() {
            bail!("{method} {path} answered {status}: {text}");
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: body is not JSON"))
    }
}

fn string_at(value: &Value, pointer: &str) -> anyhow::Result<String> {
    value
        .pointer(pointer)
        .and_then(|v| v.as_str().map(str::to_owned).or_else(|| Some(v.to_string())))
        .filter(|s| s != "null")
        .with_context(|| format!("no `{pointer}` in {value}"))
}

fn print_banner(api_url: &str, console: Option<&str>, children: &[Supervised], demo_data: &str, operator: &str) {
    let names: Vec<&str> = children.iter().map(|c| c.name).collect();
    let console = match console {
        Some(url) => format!(
            "on-call console: {url}\n\
             \x20 sign in as \"{DEMO_OPERATOR}\" (an operator; {operator}) with the demo password"
        ),
        None => "on-call console: off (CONSOLE=off)".to_owned(),
    };
    eprintln!(
        "\n\
         ==============================================================\n\
         Trellis is up: {api_url}\n\
         running: {}\n\
         demo users ({demo_data}): {}\n\
         \x20 emails <handle>@example.com, password \"{DEMO_PASSWORD}\"\n\
         {console}\n\
         Ctrl-C stops everything.\n\
         ==============================================================\n",
        names.join(", "),
        DEMO_HANDLES.join(", "),
    );
}
