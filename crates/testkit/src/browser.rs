//! A headless Chromium of the test's own, driven over WebDriver, for end-to-end tests of
//! server-rendered pages: [`Browser::start`] runs a chromedriver on a free loopback port (its
//! output, and Chromium's, in a file under [`log_dir`](crate::log_dir)) and opens a session on
//! a fresh profile; dropping the [`Browser`] kills chromedriver and Chromium. A test drives the
//! page with the thin helpers here (or fantoccini's [`Client`] itself), saves screenshots under
//! `target/screenshots/` and checks the page with the vendored axe-core
//! ([`Browser::serious_violations`]).
//!
//! The programs are `CHROMEDRIVER_BIN` and `CHROMIUM_BIN`, or Debian's `chromium-driver` and
//! `chromium` (which `cargo xtask test` installs when missing).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use serde::Deserialize;

/// How long [`Browser::start`] waits for chromedriver to answer `/status`.
pub const START_WITHIN: Duration = Duration::from_secs(30);

/// How long [`Browser::wait_for`] waits for an element, and a page may take to load.
pub const WAIT: Duration = Duration::from_secs(30);

/// axe-core 4.14.1 (`npm pack axe-core@4`), MPL-2.0: its licence and that of the code it
/// bundles are in `assets/` beside it. Its sha256 is the one axe-core publishes for the release
/// (`sri-history.json`): `KTSJmUUM3yhJqOcLeRL8LahahJ2jnA0NU5T1HUqe2Vw=`.
const AXE: &str = include_str!("../assets/axe.min.js");

/// Runs axe on the whole document and hands the violations to WebDriver's callback, reduced to
/// what [`Violation`] keeps. A node's `target` is a list of selectors, one per document it is
/// nested in (a frame or a shadow root, themselves lists inside a shadow root).
const RUN_AXE: &str = r#"
const done = arguments[arguments.length - 1];
const selector = (target) => target.map((t) => (Array.isArray(t) ? t.join(" >>> ") : t)).join(" >>> ");
window.axe
  .run(document, { resultTypes: ["violations"] })
  .then(
    (results) =>
      done({
        violations: results.violations.map((v) => ({
          id: v.id,
          impact: v.impact,
          help: v.help,
          help_url: v.helpUrl,
          targets: v.nodes.map((n) => selector(n.target)),
        })),
      }),
    (error) => done({ error: String(error) }),
  );
"#;

/// One rule the page breaks, as axe-core reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Violation {
    /// The rule, such as `label` or `color-contrast`.
    pub id: String,
    /// `minor`, `moderate`, `serious` or `critical`.
    pub impact: Option<String>,
    /// What the rule asks for, in a sentence.
    pub help: String,
    /// Where axe-core explains the rule.
    pub help_url: String,
    /// A CSS selector of each offending element (parts joined by ` >>> ` for one in a frame or
    /// a shadow root).
    pub targets: Vec<String>,
}

impl Violation {
    /// Whether its impact is `serious` or `critical`.
    pub fn is_serious(&self) -> bool {
        matches!(self.impact.as_deref(), Some("serious" | "critical"))
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let impact = self.impact.as_deref().unwrap_or("unknown impact");
        write!(f, "{} ({impact}): {} [{}] ({})", self.id, self.help, self.targets.join(", "), self.help_url)
    }
}

/// A headless Chromium under a chromedriver of its own. Dropping it kills both.
pub struct Browser {
    client: Client,
    driver: Chromedriver,
}

/// The chromedriver process (and Chromium's profile), killed (and removed) on drop.
struct Chromedriver {
    child: Child,
    profile: PathBuf,
    log: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free loopback port, waits until it is ready and opens a session
    /// of headless Chromium (1280×900, a fresh profile).
    pub async fn start() -> anyhow::Result<Browser> {
        // The port is free when picked, not reserved: another process may take it before
        // chromedriver binds it. Then chromedriver exits at once and another port is tried.
        let mut attempt = 1;
        let (chromedriver, port, log) = loop {
            match spawn_chromedriver().await? {
                Ok(started) => break started,
                Err(why) if attempt < 3 => {
                    eprintln!("browser: {why}; trying another port");
                    attempt += 1;
                }
                Err(why) => bail!(why),
            }
        };
        let profile = std::env::temp_dir().join(format!("trellis-chromium-{}", uuid::Uuid::new_v4().simple()));
        // From here `driver` owns chromedriver and the profile: an error drops (kills) them.
        let driver = Chromedriver { child: chromedriver, profile, log };
        let client = connect(port, &driver.profile).await.with_context(|| {
            format!("opening a Chromium session on chromedriver (its log: {})", driver.log.display())
        })?;
        Ok(Browser { client, driver })
    }

    /// The file chromedriver's and Chromium's output go to.
    pub fn log(&self) -> &Path {
        &self.driver.log
    }

    /// chromedriver's process id: the process group of chromedriver and Chromium.
    pub fn pid(&self) -> u32 {
        self.driver.child.id()
    }

    /// The WebDriver client, for what the helpers here do not do.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Opens `url` and waits until it has loaded.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await.with_context(|| format!("opening {url}"))
    }

    /// The URL of the page shown now.
    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self.client.current_url().await.context("reading the current URL")?.to_string())
    }

    /// The first element that matches the CSS selector `css`, waiting for it (up to [`WAIT`])
    /// if the page has none yet.
    pub async fn wait_for(&self, css: &str) -> anyhow::Result<Element> {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .with_context(|| format!("waiting {WAIT:?} for an element that matches `{css}`"))
    }

    /// Replaces the value of the field `css` with `text`, typed as a person would.
    pub async fn fill(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let field = self.find(css).await?;
        field.clear().await.with_context(|| format!("clearing `{css}`"))?;
        field.send_keys(text).await.with_context(|| format!("typing into `{css}`"))
    }

    /// Clicks the element `css`.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.find(css).await?.click().await.with_context(|| format!("clicking `{css}`"))
    }

    /// The rendered text of the element `css`.
    pub async fn text_of(&self, css: &str) -> anyhow::Result<String> {
        self.find(css).await?.text().await.with_context(|| format!("reading the text of `{css}`"))
    }

    /// Submits the form `css` with its first submit button, as a click on it would.
    pub async fn submit(&self, css: &str) -> anyhow::Result<()> {
        let form = self.client.form(Locator::Css(css)).await.with_context(|| format!("finding the form `{css}`"))?;
        form.submit().await.with_context(|| format!("submitting the form `{css}`"))
    }

    /// A PNG of the viewport, saved as `target/screenshots/<name>.png` of the workspace (made
    /// anew each time); its path. `name` is a file name: letters, digits, `-`, `_` and `.`.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        anyhow::ensure!(
            !name.is_empty() && !name.starts_with('.') && name.chars().all(plain),
            "a screenshot's name is a plain file name, not {name:?}"
        );
        let png = self.client.screenshot().await.context("taking a screenshot")?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Every axe-core rule the page shown now breaks (axe's default rules: WCAG 2.x A and AA and
    /// its best practices), with the elements that break it.
    ///
    /// axe is injected through WebDriver's script execution, which the page's
    /// Content-Security-Policy does not govern in Chromium: it runs on pages whose CSP forbids
    /// inline script (`script-src 'self'`), as the console's does (the tests of this harness
    /// serve their pages with such a policy).
    pub async fn accessibility_violations(&self) -> anyhow::Result<Vec<Violation>> {
        let present = self.client.execute("return typeof window.axe === 'object';", Vec::new()).await?;
        if present != serde_json::Value::Bool(true) {
            self.client
                .execute(&format!("{AXE}\nreturn typeof window.axe === 'object';"), Vec::new())
                .await
                .context("injecting axe-core")?;
        }
        let result = self.client.execute_async(RUN_AXE, Vec::new()).await.context("running axe-core")?;
        if let Some(error) = result.get("error") {
            bail!("axe-core failed: {error}");
        }
        serde_json::from_value(result["violations"].clone()).context("reading axe-core's violations")
    }

    /// The violations of impact `serious` or `critical` ([`Self::accessibility_violations`]):
    /// what a page must not have.
    pub async fn serious_violations(&self) -> anyhow::Result<Vec<Violation>> {
        let mut violations = self.accessibility_violations().await?;
        violations.retain(Violation::is_serious);
        Ok(violations)
    }

    /// Ends the session, then chromedriver (dropping the value does too, without waiting for
    /// the session to end).
    pub async fn close(self) -> anyhow::Result<()> {
        let Browser { client, driver } = self;
        let closed = client.close().await.context("ending the WebDriver session");
        drop(driver);
        closed
    }

    async fn find(&self, css: &str) -> anyhow::Result<Element> {
        self.client.find(Locator::Css(css)).await.with_context(|| format!("finding `{css}`"))
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // chromedriver leads a process group of its own, which Chromium's processes join:
        // killing the group ends them all, also when chromedriver is gone already.
        if let Some(group) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Where [`Browser::screenshot`] saves: `target/screenshots` of the workspace.
pub fn screenshot_dir() -> PathBuf {
    crate::target_dir().join("screenshots")
}

/// `CHROMEDRIVER_BIN`, `/usr/bin/chromedriver` or `chromedriver` on `PATH`.
pub fn chromedriver_binary() -> PathBuf {
    program("CHROMEDRIVER_BIN", "/usr/bin/chromedriver", "chromedriver")
}

/// `CHROMIUM_BIN`, `/usr/bin/chromium` or `chromium` on `PATH`.
pub fn chromium_binary() -> PathBuf {
    program("CHROMIUM_BIN", "/usr/bin/chromium", "chromium")
}

fn program(var: &str, default: &str, name: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    if Path::new(default).exists() {
        return default.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()).unwrap_or_else(|| name.into())
}

/// Starts chromedriver on a free port and waits until `/status` says it is ready: the process,
/// its port and its log; or why it exited first (its port was taken, say).
async fn spawn_chromedriver() -> anyhow::Result<Result<(Child, u16, PathBuf), String>> {
    use std::os::unix::process::CommandExt as _;
    let binary = chromedriver_binary();
    let port = crate::free_port();
    let (log, file) = crate::log_file("chromedriver");
    let mut child = Command::new(&binary)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("the chromedriver log file")?)
        .stderr(file)
        // A group of its own, for Drop to kill with Chromium's processes.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} (install chromium-driver, or set CHROMEDRIVER_BIN)", binary.display()))?;
    let status_url = format!("http://127.0.0.1:{port}/status");
    let http = crate::process::client(Duration::from_secs(5));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let ready = crate::within_deadline(START_WITHIN, || {
        let exited = child.try_wait().ok().flatten();
        // Ours that listens there, not another process that took the port first.
        let listening = crate::process::listening_addrs(child.id() as i32).contains(&addr);
        let (http, status_url) = (&http, &status_url);
        async move {
            if let Some(status) = exited {
                return Ok(Err(status));
            }
            if !listening {
                return Err(format!("chromedriver does not listen on {addr} yet"));
            }
            let status: serde_json::Value = http
                .get(status_url)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            match status["value"]["ready"].as_bool() {
                Some(true) => Ok(Ok(())),
                _ => Err(format!("not ready: {status}")),
            }
        }
    })
    .await;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    match ready {
        Ok(Ok(())) => Ok(Ok((child, port, log))),
        Ok(Err(status)) => {
            Ok(Err(format!("chromedriver exited ({status}) before it was ready; its log:\n{}", log_text())))
        }
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromedriver not ready after {START_WITHIN:?} ({why}); its log:\n{}", log_text())
        }
    }
}

/// A WebDriver session of headless Chromium with its profile in `profile`.
async fn connect(port: u16, profile: &Path) -> anyhow::Result<Client> {
    let chromium = chromium_binary();
    let capabilities = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new",
                // The tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
        "timeouts": { "pageLoad": WAIT.as_millis() as u64, "script": WAIT.as_millis() as u64 },
    });
    let serde_json::Value::Object(capabilities) = capabilities else { unreachable!("an object") };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .with_context(|| format!("starting {} (install chromium, or set CHROMIUM_BIN)", chromium.display()))?;
    Ok(client)
}
