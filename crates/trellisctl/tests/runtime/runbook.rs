//! `docs/runbooks/cutover.md`: every `trellisctl` command of the runbook, run in order as an
//! operator would (through `sh`, with the page's variables), for each of the three processors.

use std::path::Path;
use std::process::Stdio;

use trellis_domain::flags::{Executor, Flag};
use trellis_domain::shadow::{Comparison, ComparisonResult, processor};
use trellis_store::cutover::flags::Change;

use crate::helpers::Env;

/// The shell lines of the runbook's `sh` blocks, in order.
fn runbook_lines() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/runbooks/cutover.md");
    let text = std::fs::read_to_string(&path).expect("reading the cutover runbook");
    let (mut lines, mut in_sh) = (Vec::new(), false);
    for line in text.lines() {
        match (in_sh, line.trim()) {
            (false, "```sh") => in_sh = true,
            (true, "```") => in_sh = false,
            (true, l) if !l.is_empty() => lines.push(l.to_owned()),
            _ => {}
        }
    }
    lines
}

#[tokio::test]
async fn every_command_of_the_cutover_runbook_works_for_each_processor() {
    let lines = runbook_lines();
    let commands: Vec<&String> = lines.iter().filter(|l| l.starts_with("trellisctl ")).collect();
    // Every line is either the variables or a trellisctl command that this test runs.
    assert!(lines.iter().all(|l| l.starts_with("trellisctl ") || l.starts_with("PROCESSOR=")), "{lines:?}");
    assert!(commands.len() >= 9, "the six steps' commands: {commands:?}");
    let bin = Path::new(env!("CARGO_BIN_EXE_trellisctl")).parent().unwrap().to_owned();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    for flag in Flag::ALL {
        let env = Env::new().await;
        // Stage A: the monolith executes.
        let stage_a = Change { flag, value: Executor::Monolith, actor: "test", reason: "stage A", forced: false };
        trellis_store::cutover::flags::set(&env.db.pool, &stage_a).await.unwrap();
        for command in &commands {
            if command.contains("\"$FLAG\" worker") {
                // What a clean candidate has recorded by the time parity is read and cut-over comes.
                let clean =
                    Comparison { key: "clean".into(), result: ComparisonResult::Matched, count: 1000, diffs: vec![] };
                trellis_store::cutover::record(&env.db.pool, flag, &[clean]).await.unwrap();
            }
            let out = tokio::process::Command::new("sh")
                .args(["-c", command])
                .env("PATH", &path)
                .env("FLAG", flag.as_str())
                .env("PROCESSOR", processor(flag))
                .env("DATABASE_URL", &env.db.url)
                .envs(trellis_testkit::UNLIMITED_STREAMS)
                .env("NATS_URL", &env.nats_url)
                .env("NATS_PREFIX", &env.prefix)
                .env("TRELLIS_ACTOR", "on-call")
                .stdin(Stdio::null())
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{} / `{command}` failed: {}{}",
                flag.as_str(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Shadow, cut over (through the gate, not forced), roll back.
        let audit = trellis_store::cutover::flags::audit(&env.db.pool, Some(flag), 10).await.unwrap();
        let steps: Vec<(&str, bool)> = audit.iter().rev().map(|a| (a.to_value.as_str(), a.forced)).collect();
        assert_eq!(steps, [("monolith", false), ("shadow", false), ("worker", false), ("monolith", false)]);
        assert!(audit.iter().take(3).all(|a| a.actor == "on-call"), "{audit:?}");
    }
}
