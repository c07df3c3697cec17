//! testkit's `trellis-nats-cluster` (a three-node JetStream cluster on loopback) as a child: its
//! `NATS_URL` read from its first line, its nodes killed and restarted through its command
//! lines; it stops its nodes when its standard input closes, on drop.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::util::LineChild;

pub struct NatsCluster {
    child: LineChild,
    pub nats_url: String,
}

impl NatsCluster {
    /// Starts `bin` with `env` (`NATS_SERVER_BIN` picks the server) and waits for its
    /// `NATS_URL` line: the cluster has a meta leader.
    pub fn start(bin: &Path, env: &[(&str, &Path)]) -> anyhow::Result<NatsCluster> {
        eprintln!("xtask: starting a three-node NATS cluster ({})", bin.display());
        let mut cmd = Command::new(bin);
        cmd.envs(env.iter().copied());
        let (child, first) = LineChild::start(cmd, Duration::from_secs(15))?;
        let Some(nats_url) = first.strip_prefix("NATS_URL=").map(str::to_owned) else {
            drop(child);
            bail!("trellis-nats-cluster did not start (see its output above)");
        };
        eprintln!("xtask: NATS cluster up: NATS_URL={nats_url}");
        Ok(NatsCluster { child, nats_url })
    }

    /// Kills (SIGKILL) the node leading `stream`'s RAFT group; returns its name.
    pub fn kill_leader(&mut self, stream: &str) -> anyhow::Result<String> {
        let answer = self.child.command(&format!("kill-leader {stream}"))?;
        answer.strip_prefix("killed ").map(str::to_owned).with_context(|| format!("kill-leader {stream}: {answer}"))
    }

    /// Starts node `name` again and waits until the cluster has a meta leader.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let answer = self.child.command(&format!("restart {name}"))?;
        if answer != format!("restarted {name}") {
            bail!("restart {name}: {answer}");
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // The child itself stops when dropped, after this.
        eprintln!("xtask: stopping the NATS cluster");
    }
}
