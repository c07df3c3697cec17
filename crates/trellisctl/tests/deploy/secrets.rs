//! Credentials in `DATABASE_URL`, `NATS_URL` and `NATS_PASSWORD` / `NATS_TOKEN` appear in no help text, no
//! error message and no log line, even at debug level.

use std::process::Stdio;

use trellis_testkit::{PrivateNats, TestDb};

use crate::harness::start;

const DATABASE_PASSWORD: &str = "db-secret-in-url-7c1e";
const NATS_PASSWORD: &str = "nats-secret-in-url-2b9d";

/// `trellisctl <args>` with credentials in both URLs: (success, stdout + stderr).
async fn trellisctl(database_url: &str, nats_url: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("NATS_URL", nats_url)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("trellisctl runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn trellisctl_shows_no_credential_in_its_help_or_its_errors() {
    let closed = trellis_testkit::ClosedPort::new();
    let database_url = format!("postgres://someone:{DATABASE_PASSWORD}@127.0.0.1:{}/trellis", closed.port);
    let nats_url = format!("nats://someone:{NATS_PASSWORD}@127.0.0.1:{}", closed.port);
    let (ok, help) = trellisctl(&database_url, &nats_url, &["--help"]).await;
    assert!(ok, "{help}");
    assert!(help.contains("DATABASE_URL") && help.contains("NATS_URL"), "{help}");
    let (ok, migrate) = trellisctl(&database_url, &nats_url, &["migrate", "status"]).await;
    assert!(!ok, "no database listens there: {migrate}");
    let (ok, dlq) = trellisctl(&database_url, &nats_url, &["dlq", "stats"]).await;
    assert!(!ok, "no NATS listens there: {dlq}");
    assert!(dlq.contains("someone:***@127.0.0.1"), "the error names the server, redacted: {dlq}");
    for output in [help, migrate, dlq] {
        assert!(!output.contains(DATABASE_PASSWORD) && !output.contains(NATS_PASSWORD), "{output}");
    }
}

#[tokio::test]
async fn a_worker_logging_at_debug_level_logs_no_credential_of_its_urls() {
    let db = TestDb::migrated().await.unwrap();
    let nats = PrivateNats::start().unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let database_url = trellis_testkit::with_login(&db.url, "postgres", DATABASE_PASSWORD);
    let nats_url = nats.url().replace("nats://", &format!("nats://someone:{NATS_PASSWORD}@"));
    let worker = start(
        "search-projector",
        &db,
        &prefix,
        &[("DATABASE_URL", database_url), ("NATS_URL", nats_url), ("RUST_LOG", "debug".into())],
    )
    .await;
    let logged = std::fs::read_to_string(&worker.log).unwrap();
    assert!(logged.contains("connect"), "the worker logged its connections at debug level: {logged}");
    for secret in [DATABASE_PASSWORD, NATS_PASSWORD] {
        assert!(!logged.contains(secret), "{} logged a password of its URLs", worker.log.display());
    }

    // The same with the password in NATS_PASSWORD (the server has no users: it takes any).
    let worker = start(
        "search-projector",
        &db,
        &prefix,
        &[
            ("NATS_URL", nats.url()),
            ("NATS_USER", "someone".into()),
            ("NATS_PASSWORD", NATS_PASSWORD.into()),
            ("RUST_LOG", "debug".into()),
        ],
    )
    .await;
    let logged = std::fs::read_to_string(&worker.log).unwrap();
    assert!(logged.contains("connect"), "the worker logged its connections at debug level: {logged}");
    assert!(!logged.contains(NATS_PASSWORD), "{} logged NATS_PASSWORD", worker.log.display());
}

#[tokio::test]
async fn the_services_help_shows_no_credential_of_the_environment() {
    for name in ["trellis-api", "score-orchestrator", "search-projector", "dispute-processor"] {
        let out = tokio::process::Command::new(crate::harness::binary(name))
            .arg("--help")
            .env("DATABASE_URL", format!("postgres://someone:{DATABASE_PASSWORD}@db/trellis"))
            .env("NATS_URL", format!("nats://someone:{NATS_PASSWORD}@nats:4222"))
            .env("NATS_PASSWORD", NATS_PASSWORD)
            .env("NATS_TOKEN", NATS_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && help.contains("DATABASE_URL") && help.contains("NATS_PASSWORD"),
            "{name}: {help}"
        );
        assert!(!help.contains(DATABASE_PASSWORD) && !help.contains(NATS_PASSWORD), "{name} --help: {help}");
    }
}
