//! The workspace's binaries (`trellis-api`, the workers, `trellis-probe-worker`) as real child
//! processes of a test. Every listener binds port 0 and the process writes the addresses it got
//! to its address file (`ADDR_FILE`), so no test guesses a free port. Output goes to a file in
//! [`log_dir`](crate::log_dir). A process is killed when its value is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use crate::wait::eventually;

/// How long [`Spawn::ready`] waits for `/readyz`.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// How long a test waits for one `/readyz` answer: longer than the server's own bound on each
/// check (2 s), so that a check that timed out is reported as such, not taken for no answer.
pub const READYZ_TIMEOUT: Duration = Duration::from_secs(5);

/// A binary of the workspace, built next to the running test (in `target/<profile>/`). Cargo
/// builds only the binaries of the package under test; `cargo build --workspace --bins` (a step
/// of `cargo xtask test`) builds the others.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("the test executable's directory");
    let dir = if dir.ends_with("deps") { dir.parent().expect("the profile directory") } else { dir };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The addresses a process reported in its address file.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
    /// The public HTTP listener of `trellis-api`.
    pub api: Option<SocketAddr>,
}

impl Addrs {
    fn read(path: &Path) -> Option<Addrs> {
        let text = std::fs::read_to_string(path).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the address file {} is not JSON ({e}): {text}", path.display()));
        let addr = |name: &str| json[name].as_str().map(|a| a.parse().expect("a socket address"));
        Some(Addrs { admin: addr("admin").expect("the admin listener's address"), api: addr("api") })
    }
}

/// How to start a process: the binary, the test's settings, and what the test adds.
pub struct Spawn {
    name: String,
    command: tokio::process::Command,
    addr_file: PathBuf,
    log: PathBuf,
}

impl Spawn {
    /// `name`, a binary of the workspace, with what every test process gets: listeners on port
    /// 0 (`ADMIN_ADDR`, and `API_ADDR` for `trellis-api`), an address file, JSON logs to a
    /// log file, `NATS_URL` of the suite and a 2 s `SHUTDOWN_GRACE`. Later settings win.
    pub fn new(name: &str) -> Spawn {
        let (log, file) = crate::log_file(name);
        let addr_file = log.with_extension("addr");
        let mut command = tokio::process::Command::new(binary(name));
        command
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("ADDR_FILE", &addr_file)
            .env("NATS_URL", crate::nats_url())
            .envs(crate::UNLIMITED_STREAMS)
            .env("LOG_FORMAT", "json")
            .env("SHUTDOWN_GRACE", "2s")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log file"))
            .stderr(file)
            .kill_on_drop(true);
        if name == "trellis-api" {
            command.env("API_ADDR", "127.0.0.1:0");
        }
        Spawn { name: name.to_owned(), command, addr_file, log }
    }

    /// On the test's database (`DATABASE_URL`) and NATS prefix (`NATS_PREFIX`).
    pub fn on(self, database_url: &str, prefix: &str) -> Spawn {
        self.env("DATABASE_URL", database_url).env("NATS_PREFIX", prefix)
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Spawn {
        self.command.env(key, value);
        self
    }

    pub fn envs<'a>(self, vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> Spawn {
        vars.into_iter().fold(self, |spawn, (k, v)| spawn.env(k, v))
    }

    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Spawn {
        self.command.args(args);
        self
    }

    /// Starts the process without waiting for anything.
    pub fn spawn(mut self) -> Process {
        let child = self.command.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        let pid = child.id().expect("a running child's pid") as i32;
        Process { name: self.name, pid, child, addr_file: self.addr_file, addrs: OnceLock::new(), log: self.log }
    }

    /// Starts the process and waits (up to [`READY_WITHIN`]) until its `/readyz` answers 200.
    pub async fn ready(self) -> Process {
        let mut process = self.spawn();
        process.wait_ready(READY_WITHIN).await;
        process
    }
}

/// A child process of the test, killed (SIGKILL) when dropped.
pub struct Process {
    pub name: String,
    pub pid: i32,
    /// Where its output goes.
    pub log: PathBuf,
    child: tokio::process::Child,
    addr_file: PathBuf,
    addrs: OnceLock<Addrs>,
}

impl Process {
    /// What it reported in its address file, once it has written it.
    pub fn addrs(&self) -> Option<Addrs> {
        if let Some(addrs) = self.addrs.get() {
            return Some(*addrs);
        }
        let addrs = Addrs::read(&self.addr_file)?;
        Some(*self.addrs.get_or_init(|| addrs))
    }

    /// The admin listener's address; the process must have reported it ([`Process::wait_ready`]).
    pub fn admin(&self) -> SocketAddr {
        self.addrs().unwrap_or_else(|| panic!("{} has not reported its addresses yet", self.name)).admin
    }

    /// The public listener of `trellis-api`.
    pub fn api(&self) -> SocketAddr {
        self.addrs().and_then(|a| a.api).unwrap_or_else(|| panic!("{} reported no API listener", self.name))
    }

    /// Its output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the process has reported its addresses (its listeners are bound; it may
    /// not be ready yet); panics, with the process's log, if it exits first or does not report
    /// them within `within`.
    pub async fn wait_listening(&mut self, within: Duration) {
        let what = format!("{} to report its addresses", self.name);
        eventually(&what, within, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before it was listening; its log:\n{}", self.name, self.log_text());
            }
            let listening = self.addrs().map(|_| ());
            async move { listening }
        })
        .await;
    }

    /// The `/readyz` status code, or `None` while nothing answers.
    pub async fn readyz(&self) -> Option<u16> {
        readyz_at(self.addrs()?.admin).await
    }

    /// The `/readyz` status code and its body (the admin listener names each check), or `None`
    /// while nothing answers.
    pub async fn readyz_checks(&self) -> Option<(u16, serde_json::Value)> {
        let admin = self.addrs()?.admin;
        let resp = client(READYZ_TIMEOUT).get(format!("http://{admin}/readyz")).send().await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.json().await.ok()?))
    }

    /// Waits until `/readyz` answers 200; panics, with the process's log, if it exits first or
    /// is not ready within `within`.
    pub async fn wait_ready(&mut self, within: Duration) {
        let what = format!("{} to be ready", self.name);
        eventually(&what, within, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before it was ready; its log:\n{}", self.name, self.log_text());
            }
            let admin = self.addrs().map(|a| a.admin);
            async move { (readyz_at(admin?).await == Some(200)).then_some(()) }
        })
        .await;
    }

    /// The admin `/metrics` text. A busy process (a score run keeps every core busy) may take
    /// seconds to answer on a loaded machine.
    pub async fn metrics(&self) -> String {
        let resp = client(Duration::from_secs(30))
            .get(format!("http://{}/metrics", self.admin()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} /metrics: {e}", self.name));
        assert_eq!(resp.status(), 200, "{} /metrics", self.name);
        resp.text().await.expect("the metrics text")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("polling the child").is_none()
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap_or_else(|e| panic!("killing {}: {e}", self.name));
    }

    /// Sends SIGTERM (what Kubernetes sends to stop a pod).
    pub async fn terminate(&self) {
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid);
    }

    /// Waits for the process to exit; its exit code (`None` when a signal ended it).
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the child").code(),
            Err(_) => panic!("{} still running after {within:?}; its log:\n{}", self.name, self.log_text()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.addr_file);
    }
}

async fn readyz_at(admin: SocketAddr) -> Option<u16> {
    let resp = client(READYZ_TIMEOUT).get(format!("http://{admin}/readyz")).send().await.ok()?;
    Some(resp.status().as_u16())
}

/// An HTTP client for the test's own processes (no proxy) with a `timeout` on each request.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(timeout).build().expect("an HTTP client")
}

/// A loopback port nothing listens on now: the OS's pick, released for a server the test starts
/// to take (unlike [`ClosedPort`], which keeps it from every other process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("binding a loopback port").port()
}

/// A loopback port that nothing listens on while this value lives: a socket bound to it that
/// never listens holds it, so a connection to it is refused (a server that is down), and no
/// other process can take it.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("binding a loopback port");
        let port = socket.local_addr().expect("the bound address").port();
        ClosedPort { _socket: socket, port }
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        Self::new()
    }
}

/// The TCP addresses process `pid` listens on, from `/proc` (for a program that cannot report
/// the port it got, such as Prometheus).
pub fn listening_addrs(pid: i32) -> Vec<SocketAddr> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(inode) = target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']'))
            {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local address, remote address, state (0A = LISTEN), …, inode (the tenth field)
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            if *state != "0A" || !inodes.contains(*inode) {
                return None;
            }
            let (ip, port) = local.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some(SocketAddr::from((std::net::Ipv4Addr::from(u32::from_be(ip)), port)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listening_addrs_finds_a_listener_of_this_process() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(listening_addrs(std::process::id() as i32).contains(&addr));
        drop(listener);
        assert!(!listening_addrs(std::process::id() as i32).contains(&addr));
    }

    #[tokio::test]
    async fn a_closed_port_refuses_connections() {
        let closed = ClosedPort::new();
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", closed.port)).await;
        assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
