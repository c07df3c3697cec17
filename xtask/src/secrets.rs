//! The log scan that follows the test suite in `cargo xtask test`: every process the tests
//! start, and every in-process app, logs to a file under `TRELLIS_TEST_LOG_DIR` (see
//! `trellis_testkit::log_dir`); none of those files may contain a secret the suite used — the
//! test users' passwords, the test login roles' password, or the password of the suite's own
//! DATABASE_URL. A finding names the file, the line and which secret, never the secret itself.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A secret the suite uses: what to call it in a finding, and its value.
pub struct Known {
    pub name: &'static str,
    pub value: String,
}

/// The passwords the test code sends or sets: those listed here, and every password literal
/// the workspace's Rust sources hold (`"password": "…"`, `"current_password": "…"`,
/// `…PASSWORD: &str = "…"`, `("…_NATS_PASSWORD", "…")`), so that a new test password is
/// scanned for without being listed.
pub fn test_passwords(root: &Path) -> anyhow::Result<Vec<Known>> {
    let mut known: Vec<Known> = [
        // "correct horse battery staple" and the unit tests' "correct horse battery".
        ("the test users' password", "correct horse battery"),
        // trellis_testkit::TEST_ROLE_PASSWORD
        ("the test login roles' password", "role-password-for-tests-5f3a9c"),
    ]
    .into_iter()
    .map(|(name, value)| Known { name, value: value.to_owned() })
    .collect();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    pending.push(path);
                }
            } else if name.ends_with(".rs") {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                for value in password_literals(&text) {
                    if !known.iter().any(|k| value.contains(&k.value)) {
                        known.push(Known { name: "a password in the test code", value });
                    }
                }
            }
        }
    }
    Ok(known)
}

/// The password literals of a Rust source: long enough to be a valid password (10
/// characters); shorter ones are refused by the API before anything could log them.
fn password_literals(text: &str) -> Vec<String> {
    // The last: testkit's DEPLOYED_NATS_PASSWORDS, `("TRELLIS_API_NATS_PASSWORD", "…")`.
    const MARKERS: [&str; 5] = [
        "\"password\": \"",
        "\"current_password\": \"",
        "PASSWORD: &str = \"",
        "\"password\":\"",
        "_NATS_PASSWORD\", \"",
    ];
    let mut found = Vec::new();
    for marker in MARKERS {
        for (at, _) in text.match_indices(marker) {
            let rest = &text[at + marker.len()..];
            if let Some(end) = rest.find('"')
                && end >= 10
                && !rest[..end].contains(['{', '\\'])
            {
                found.push(rest[..end].to_owned());
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[derive(Debug, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    pub line: usize,
    pub secret: &'static str,
}

/// What a scan read and found.
pub struct Scan {
    pub files: usize,
    pub bytes: u64,
    pub findings: Vec<Finding>,
}

/// Reads every file under `dir` (recursively) and reports each line that contains a secret.
pub fn scan(dir: &Path, secrets: &[Known]) -> anyhow::Result<Scan> {
    let mut scan = Scan { files: 0, bytes: 0, findings: Vec::new() };
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).with_context(|| format!("reading {}", next.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            scan.files += 1;
            scan.bytes += bytes.len() as u64;
            let text = String::from_utf8_lossy(&bytes);
            for (number, line) in text.lines().enumerate() {
                for secret in secrets.iter().filter(|s| !s.value.is_empty()) {
                    if line.contains(&secret.value) {
                        scan.findings.push(Finding { file: path.clone(), line: number + 1, secret: secret.name });
                    }
                }
            }
        }
    }
    scan.findings.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    Ok(scan)
}

/// Fails when any log under `dir` holds a secret, and, when `logs_expected` (the whole suite
/// ran), when there is no log at all: the check would prove nothing.
pub fn check(dir: &Path, secrets: &[Known], logs_expected: bool) -> anyhow::Result<()> {
    let scan = scan(dir, secrets)?;
    if scan.files == 0 || scan.bytes == 0 {
        if logs_expected {
            bail!("no test process logged anything to {}: the secret scan would prove nothing", dir.display());
        }
        eprintln!("secrets: the tests that ran logged nothing to scan");
        return Ok(());
    }
    if !scan.findings.is_empty() {
        let lines: Vec<String> =
            scan.findings.iter().map(|f| format!("  {}:{}: {}", f.file.display(), f.line, f.secret)).collect();
        bail!("secrets in the test logs ({} lines):\n{}", scan.findings.len(), lines.join("\n"));
    }
    eprintln!(
        "secrets: {} log files ({} KiB) hold none of the suite's {} secrets",
        scan.files,
        scan.bytes / 1024,
        secrets.len()
    );
    Ok(())
}

/// A random password for the suite's DATABASE_URL: 128 bits from the OS's hasher seeds.
pub fn random_password() -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..2)
        .map(|_| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
            format!("{:016x}", hasher.finish())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-secrets-{}", random_password()));
        std::fs::create_dir_all(dir.join("nested")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    fn known() -> Vec<Known> {
        let mut secrets = test_passwords(&crate::util::project_root()).unwrap();
        secrets.push(Known { name: "DATABASE_URL's password", value: "9f8e7d6c5b4a".into() });
        secrets
    }

    #[test]
    fn a_logged_password_or_url_credential_fails_the_check_and_names_where() {
        let dir = dir_with(&[
            (
                "api.log",
                "{\"msg\":\"started\"}\n{\"body\":\"Login { login: \\\"alice\\\", password: \\\"correct horse battery staple\\\" }\"}\n",
            ),
            ("nested/worker.log", "connecting to postgres://trellis_test_runner:9f8e7d6c5b4a@127.0.0.1:5432/x\n"),
        ]);
        let scan = scan(&dir, &known()).unwrap();
        assert_eq!(scan.files, 2);
        assert_eq!(
            scan.findings,
            [
                Finding { file: dir.join("api.log"), line: 2, secret: "the test users' password" },
                Finding { file: dir.join("nested/worker.log"), line: 1, secret: "DATABASE_URL's password" },
            ]
        );
        let err = check(&dir, &known(), true).unwrap_err().to_string();
        assert!(err.contains("api.log:2") && !err.contains("correct horse") && !err.contains("9f8e7d6c5b4a"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_test_passwords_are_found_in_the_sources() {
        let values: Vec<String> = known().into_iter().map(|k| k.value).collect();
        for wanted in
            ["correct horse battery", "a brand new password", "wrong password!", "role-password-for-tests-5f3a9c"]
        {
            assert!(values.iter().any(|v| v == wanted), "{wanted:?} not among {values:?}");
        }
        assert!(!values.iter().any(|v| v.len() < 10), "{values:?}");
        assert_eq!(
            password_literals("json!({\"password\": \"short\", \"current_password\": \"long enough pw\"})"),
            ["long enough pw"]
        );
    }

    #[test]
    fn redacted_logs_pass_and_an_empty_log_directory_fails() {
        let dir = dir_with(&[(
            "api.log",
            "{\"url\":\"postgres://trellis_test_runner:***@127.0.0.1:5432/x\",\"password\":\"<redacted>\"}\n",
        )]);
        check(&dir, &known(), true).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let empty = dir_with(&[]);
        assert!(check(&empty, &known(), true).is_err(), "no log proves nothing");
        check(&empty, &known(), false).unwrap();
        std::fs::remove_dir_all(empty).unwrap();
    }
}
