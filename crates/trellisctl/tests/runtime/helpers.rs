//! The harness: a test's world and real `trellis-probe-worker` processes
//! (`trellis_testkit::probe`), and `trellisctl` runs.

use std::process::Stdio;

use trellis_testkit::Process;
pub use trellis_testkit::eventually;
pub use trellis_testkit::probe::{PROBE, RECORDS, create_record_table};
use uuid::Uuid;

pub use trellis_testkit::probe::Env;

/// A `trellis-probe-worker` child process.
pub type Worker = Process;

/// Rows of `ops.dlq_audit`: (action, status, reason, sequences, dry_run), oldest first.
pub async fn audit_rows(env: &Env) -> Vec<Audit> {
    sqlx::query_as::<_, (Uuid, String, String, String, Vec<i64>, bool, Option<serde_json::Value>)>(
        "SELECT id, action, status, reason, sequences, dry_run, outcome FROM ops.dlq_audit ORDER BY started_at",
    )
    .fetch_all(&env.db.pool)
    .await
    .expect("reading ops.dlq_audit")
    .into_iter()
    .map(|(id, action, status, reason, sequences, dry_run, outcome)| Audit {
        id,
        action,
        status,
        reason,
        sequences,
        dry_run,
        outcome,
    })
    .collect()
}

/// Runs `trellisctl` with the test's database, NATS server and prefix.
pub async fn ctl(env: &Env, args: &[&str]) -> Ctl {
    let connection = ["--database-url", &env.db.url, "--nats-url", &env.nats_url, "--nats-prefix", &env.prefix];
    run_ctl(&connection, args, "runtime-tests").await
}

/// Runs `trellisctl` with `connection` flags, then `args`, as `actor`.
pub async fn run_ctl(connection: &[&str], args: &[&str], actor: &str) -> Ctl {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .args(connection)
        .args(args)
        .env("TRELLIS_ACTOR", actor)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running trellisctl");
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[derive(Debug, Clone)]
pub struct Audit {
    pub id: Uuid,
    pub action: String,
    pub status: String,
    pub reason: String,
    pub sequences: Vec<i64>,
    pub dry_run: bool,
    pub outcome: Option<serde_json::Value>,
}

/// What a `trellisctl` run printed and how it exited.
#[derive(Debug)]
pub struct Ctl {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Asserts it succeeded and returns stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        assert!(self.success(), "trellisctl failed: {self:?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("trellisctl printed no JSON ({e}): {self:?}"))
    }
}
