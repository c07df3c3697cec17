//! A PostgreSQL primary with a streaming replica of the test's own, for the read-replica tests
//! (and `cargo xtask bench api --replica`, through `trellis-pg-replica`): the shared server has
//! no replication access, so the primary is a new cluster (`initdb`, trust authentication on
//! loopback, `wal_level = replica`) in a temporary directory, and the replica a
//! `pg_basebackup -R` of it in another, each on a free port. Both are stopped (immediate
//! shutdown) and their directories removed when the value is dropped.
//!
//! `initdb` refuses to run as root: as root, the clusters run as `PG_RUN_AS` (default
//! `postgres`, the user of Debian's server package). The programs come from `PG_BIN_DIR`, else
//! the newest `/usr/lib/postgresql/<version>/bin`, else `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::PgPool;

use crate::wait::within_deadline;

/// How long the replica may take to stream from the primary, and to replay what it is asked to.
pub const CATCH_UP_WITHIN: Duration = Duration::from_secs(30);

pub struct ReplicatedPostgres {
    pub primary_port: u16,
    pub replica_port: u16,
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
}

impl ReplicatedPostgres {
    /// Creates and starts the primary, then the replica from its base backup; returns once the
    /// replica streams from the primary.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let run_as = if rustix::process::geteuid().is_root() {
            Some(std::env::var("PG_RUN_AS").unwrap_or_else(|_| "postgres".into()))
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!("trellis-pg-replica-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pair = Self { primary_port: crate::free_port(), replica_port: crate::free_port(), dir, bin, run_as };
        if let Some(user) = &pair.run_as {
            run(Command::new("chown").arg(format!("{user}:")).arg(&pair.dir))?;
        }
        run(Command::new("chmod").arg("700").arg(&pair.dir))?;
        let primary = pair.dir.join("primary");
        pair.tool("initdb")
            .arg("-D")
            .arg(&primary)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "-N"])
            .status_ok()?;
        append(
            &primary.join("postgresql.conf"),
            &format!(
                "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\nmax_connections = 100\n\
                 wal_level = replica\nmax_wal_senders = 4\nwal_keep_size = '512MB'\n\
                 # Throwaway clusters: nothing must survive a power cut.\nfsync = off\n",
                pair.primary_port
            ),
        )?;
        pair.pg_ctl_start(&primary)?;
        let replica = pair.dir.join("replica");
        pair.tool("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &pair.primary_port.to_string(), "-U", "postgres", "-D"])
            .arg(&replica)
            .args(["-R", "-X", "stream", "-c", "fast"])
            .status_ok()?;
        append(&replica.join("postgresql.conf"), &format!("port = {}\n", pair.replica_port))?;
        pair.pg_ctl_start(&replica)?;
        pair.wait_streaming().await?;
        Ok(pair)
    }

    /// The primary's URL of database `database` (user `postgres`, no password).
    pub fn primary_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.primary_port)
    }

    /// The replica's URL of database `database`.
    pub fn replica_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.replica_port)
    }

    /// The process id of the primary's postmaster (its backends are its children).
    pub fn primary_pid(&self) -> Option<u32> {
        postmaster_pid(&self.dir.join("primary"))
    }

    /// The process id of the replica's postmaster.
    pub fn replica_pid(&self) -> Option<u32> {
        postmaster_pid(&self.dir.join("replica"))
    }

    async fn primary(&self) -> anyhow::Result<PgPool> {
        PgPool::connect(&self.primary_url("postgres")).await.context("connecting to the primary")
    }

    async fn replica(&self) -> anyhow::Result<PgPool> {
        PgPool::connect(&self.replica_url("postgres")).await.context("connecting to the replica")
    }

    async fn wait_streaming(&self) -> anyhow::Result<()> {
        let primary = self.primary().await?;
        let streaming = within_deadline(CATCH_UP_WITHIN, || async {
            let state: Option<String> = sqlx::query_scalar("SELECT state FROM pg_stat_replication LIMIT 1")
                .fetch_optional(&primary)
                .await
                .map_err(|e| e.to_string())?;
            match state.as_deref() {
                Some("streaming") => Ok(()),
                other => Err(format!("replication state {other:?}")),
            }
        })
        .await;
        primary.close().await;
        streaming.map_err(|why| anyhow::anyhow!("the replica did not stream within {CATCH_UP_WITHIN:?}: {why}"))
    }

    /// Waits until the replica has replayed everything the primary had written when called.
    pub async fn catch_up(&self) -> anyhow::Result<()> {
        let primary = self.primary().await?;
        let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&primary).await?;
        primary.close().await;
        let replica = self.replica().await?;
        let caught_up = within_deadline(CATCH_UP_WITHIN, || async {
            let replayed: Option<bool> = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn")
                .bind(&target)
                .fetch_one(&replica)
                .await
                .map_err(|e| e.to_string())?;
            if replayed == Some(true) { Ok(()) } else { Err(format!("not replayed up to {target} yet")) }
        })
        .await;
        replica.close().await;
        caught_up.map_err(|why| anyhow::anyhow!("the replica did not catch up: {why}"))
    }

    /// Pauses the replica's replay (`pg_wal_replay_pause()`): it still receives WAL, and applies
    /// none of it, until [`Self::resume_replay`]. Returns once the pause is in effect.
    ///
    /// Replay pauses before the next record it would apply: while the primary writes nothing the
    /// request stays a request, so each check writes a commit record on the primary
    /// (`txid_current()`), which the paused replica then does not apply.
    pub async fn pause_replay(&self) -> anyhow::Result<()> {
        let (primary, replica) = (self.primary().await?, self.replica().await?);
        sqlx::query("SELECT pg_wal_replay_pause()").execute(&replica).await?;
        let paused = within_deadline(CATCH_UP_WITHIN, || async {
            let state: String = sqlx::query_scalar("SELECT pg_get_wal_replay_pause_state()")
                .fetch_one(&replica)
                .await
                .map_err(|e| e.to_string())?;
            if state == "paused" {
                return Ok(());
            }
            sqlx::query("SELECT txid_current()").execute(&primary).await.map_err(|e| e.to_string())?;
            Err(format!("replay pause state {state}"))
        })
        .await;
        primary.close().await;
        replica.close().await;
        paused.map_err(|why| anyhow::anyhow!("replay did not pause: {why}"))
    }

    /// Resumes the replica's replay (`pg_wal_replay_resume()`).
    pub async fn resume_replay(&self) -> anyhow::Result<()> {
        let replica = self.replica().await?;
        sqlx::query("SELECT pg_wal_replay_resume()").execute(&replica).await?;
        replica.close().await;
        Ok(())
    }

    /// Waits until database `name`, created on the primary, exists on the replica.
    pub async fn wait_for_database(&self, name: &str) -> anyhow::Result<()> {
        let replica = self.replica().await?;
        let found = within_deadline(CATCH_UP_WITHIN, || async {
            let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_optional(&replica)
                .await
                .map_err(|e| e.to_string())?;
            found.map(|_| ()).ok_or_else(|| format!("no database {name} on the replica yet"))
        })
        .await;
        replica.close().await;
        found.map_err(|why| anyhow::anyhow!("{why}"))
    }

    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        // Our working directory may be out of the server user's reach.
        command.current_dir("/").stdin(Stdio::null());
        command
    }

    fn pg_ctl_start(&self, data: &Path) -> anyhow::Result<()> {
        let log = data.with_extension("log");
        let started = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .status_ok();
        if let Err(e) = started {
            bail!("{e:#}\n--- {} ---\n{}", log.display(), std::fs::read_to_string(&log).unwrap_or_default());
        }
        Ok(())
    }

    fn pg_ctl_stop(&self, data: &Path) {
        if data.join("postmaster.pid").exists() {
            let _ = self
                .tool("pg_ctl")
                .arg("-D")
                .arg(data)
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for ReplicatedPostgres {
    fn drop(&mut self) {
        self.pg_ctl_stop(&self.dir.join("replica"));
        self.pg_ctl_stop(&self.dir.join("primary"));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postmaster_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

/// The directory of `initdb`, `pg_ctl` and `pg_basebackup`.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse().ok()?, entry.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("pg_basebackup").exists())
        .collect();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    if let Some((_, dir)) = versions.into_iter().next() {
        return Ok(dir);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_basebackup").exists());
    on_path.context("the PostgreSQL server programs (initdb, pg_ctl, pg_basebackup) are not found: set PG_BIN_DIR")
}

fn append(file: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", file.display()))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    command.status_ok()
}

trait StatusOk {
    fn status_ok(&mut self) -> anyhow::Result<()>;
}

impl StatusOk for Command {
    /// Runs the command; an error with its output when it fails.
    fn status_ok(&mut self) -> anyhow::Result<()> {
        let output = self.stderr(Stdio::piped()).output().with_context(|| format!("running {self:?}"))?;
        if !output.status.success() {
            bail!("{self:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(())
    }
}
