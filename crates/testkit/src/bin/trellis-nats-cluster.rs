//! `trellis-nats-cluster`: a three-node JetStream cluster on loopback (`trellis_testkit::cluster`)
//! for `cargo xtask up --nats-cluster`. Prints `NATS_URL=<the three client URLs>` on stdout once
//! the meta leader is elected, then runs until its standard input closes (its parent exited or
//! closed the pipe), SIGTERM or Ctrl-C; the nodes and their stores go with it.

use std::io::Read;

use trellis_testkit::cluster::NatsCluster;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = NatsCluster::start().await?;
    println!("NATS_URL={}", cluster.nats_url());
    eprintln!(
        "trellis-nats-cluster: nodes {} up, meta leader {}",
        cluster.names().join(", "),
        cluster.meta_leader().await?
    );
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = stdin_closed => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(cluster);
    Ok(())
}
