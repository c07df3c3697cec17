//! `trellis-nats-cluster`: a three-node JetStream cluster on loopback (`trellis_testkit::cluster`)
//! for `cargo xtask up --nats-cluster` and `cargo xtask bench cluster`. Prints `NATS_URL=<the
//! three client URLs>` on stdout once the meta leader is elected, then runs until its standard
//! input closes (its parent exited or closed the pipe), SIGTERM or Ctrl-C; the nodes and their
//! stores go with it.
//!
//! Meanwhile it takes one command per line on standard input and answers each with one line on
//! standard output:
//! - `kill-leader <stream>`: SIGKILL to the node leading the stream's RAFT group; answers
//!   `killed <node>`.
//! - `restart <node>`: starts the node again on its ports and store and waits until the cluster
//!   has a meta leader; answers `restarted <node>`.
//!
//! A command that fails answers `error <why>`.

use tokio::io::AsyncBufReadExt as _;
use trellis_testkit::cluster::NatsCluster;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cluster = NatsCluster::start().await?;
    println!("NATS_URL={}", cluster.nats_url());
    eprintln!(
        "trellis-nats-cluster: nodes {} up, meta leader {}",
        cluster.names().join(", "),
        cluster.meta_leader().await?
    );
    let mut commands = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            line = commands.next_line() => match line {
                Ok(Some(line)) => {
                    let answer = run(&mut cluster, &line).await.unwrap_or_else(|e| format!("error {e:#}"));
                    println!("{answer}");
                }
                Ok(None) | Err(_) => break,
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(cluster);
    Ok(())
}

async fn run(cluster: &mut NatsCluster, line: &str) -> anyhow::Result<String> {
    match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["kill-leader", stream] => {
            let leader = stream_leader(cluster, stream).await?;
            cluster.kill(&leader);
            Ok(format!("killed {leader}"))
        }
        ["restart", node] => {
            anyhow::ensure!(cluster.names().iter().any(|n| n == node), "no node {node} in the cluster");
            anyhow::ensure!(!cluster.is_running(node), "node {node} is running");
            cluster.restart(node).await?;
            Ok(format!("restarted {node}"))
        }
        _ => anyhow::bail!("unknown command {line:?} (known: kill-leader <stream>, restart <node>)"),
    }
}

/// The server name of the node leading `stream`'s RAFT group.
async fn stream_leader(cluster: &NatsCluster, stream: &str) -> anyhow::Result<String> {
    let client = async_nats::connect(cluster.urls()).await?;
    let js = async_nats::jetstream::new(client);
    let info = js.get_stream(stream).await?.info().await?.clone();
    let leader = info.cluster.and_then(|c| c.leader);
    leader.ok_or_else(|| anyhow::anyhow!("stream {stream} has no leader"))
}
