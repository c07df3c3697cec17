//! testkit's `trellis-nats-cluster` (a three-node JetStream cluster on loopback) as a child: its
//! `NATS_URL` read from its first line, its nodes killed and restarted through its command
//! lines; it stops its nodes when its standard input closes, on drop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::util;

pub struct NatsCluster {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub nats_url: String,
}

impl NatsCluster {
    /// Starts `bin` with `env` (`NATS_SERVER_BIN` picks the server) and waits for its
    /// `NATS_URL` line: the cluster has a meta leader.
    pub fn start(bin: &Path, env: &[(&str, &Path)]) -> anyhow::Result<NatsCluster> {
        eprintln!("xtask: starting a three-node NATS cluster ({})", bin.display());
        let mut child = Command::new(bin)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // The terminal's Ctrl-C reaches only us: the cluster stops after the services.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut first = String::new();
        stdout.read_line(&mut first).context("reading the cluster's NATS_URL")?;
        let Some(nats_url) = first.trim().strip_prefix("NATS_URL=").map(str::to_owned) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("trellis-nats-cluster did not start (see its output above)");
        };
        eprintln!("xtask: NATS cluster up: NATS_URL={nats_url}");
        Ok(NatsCluster { child, stdin, stdout, nats_url })
    }

    /// Kills (SIGKILL) the node leading `stream`'s RAFT group; returns its name.
    pub fn kill_leader(&mut self, stream: &str) -> anyhow::Result<String> {
        let answer = self.command(&format!("kill-leader {stream}"))?;
        answer.strip_prefix("killed ").map(str::to_owned).with_context(|| format!("kill-leader {stream}: {answer}"))
    }

    /// Starts node `name` again and waits until the cluster has a meta leader.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let answer = self.command(&format!("restart {name}"))?;
        if answer != format!("restarted {name}") {
            bail!("restart {name}: {answer}");
        }
        Ok(())
    }

    fn command(&mut self, line: &str) -> anyhow::Result<String> {
        let stdin = self.stdin.as_mut().context("the cluster is stopping")?;
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).context("writing to trellis-nats-cluster")?;
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer).context("reading trellis-nats-cluster's answer")? == 0 {
            bail!("trellis-nats-cluster exited");
        }
        Ok(answer.trim().to_owned())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        eprintln!("xtask: stopping the NATS cluster");
        // Closing its standard input is its signal to stop; kill it if it does not.
        drop(self.stdin.take());
        util::await_exit(&mut self.child, Duration::from_secs(15));
    }
}
