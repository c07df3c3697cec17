//! `trellis-pg-replica`: a PostgreSQL primary with a streaming replica on loopback
//! (`trellis_testkit::replica`) for `cargo xtask bench api --replica`. Prints one line
//! `PRIMARY_PORT=<port> REPLICA_PORT=<port> PRIMARY_PID=<pid> REPLICA_PID=<pid>` on stdout once
//! the replica streams (user `postgres`, trust authentication), then runs until its standard
//! input closes (its parent exited or closed the pipe), SIGTERM or Ctrl-C; both clusters and
//! their directories go with it.
//!
//! Meanwhile it takes one command per line on standard input and answers each with one line:
//! - `catch-up`: waits until the replica has replayed everything the primary has written;
//!   answers `caught-up`.
//!
//! A command that fails answers `error <why>`.

use tokio::io::AsyncBufReadExt as _;
use trellis_testkit::replica::ReplicatedPostgres;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pair = ReplicatedPostgres::start().await?;
    let pid = |pid: Option<u32>| pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    println!(
        "PRIMARY_PORT={} REPLICA_PORT={} PRIMARY_PID={} REPLICA_PID={}",
        pair.primary_port,
        pair.replica_port,
        pid(pair.primary_pid()),
        pid(pair.replica_pid())
    );
    let mut commands = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            line = commands.next_line() => match line {
                Ok(Some(line)) => {
                    let answer = match line.trim() {
                        "catch-up" => pair.catch_up().await.map(|()| "caught-up".to_owned()),
                        other => Err(anyhow::anyhow!("unknown command {other:?} (known: catch-up)")),
                    };
                    println!("{}", answer.unwrap_or_else(|e| format!("error {e:#}")));
                }
                Ok(None) | Err(_) => break,
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(pair);
    Ok(())
}
