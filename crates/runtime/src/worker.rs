//! What every worker binary does around its processor: flags, logging, metrics, the admin
//! listener, connecting, declaring the streams, running consumer groups, and draining on
//! SIGTERM within a grace period.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CommonArgs;
use crate::consumer::{ConsumerGroup, Handler, RunnerConfig, RunnerContext};
use crate::health::{self, Health, Severity};
use crate::nats::{self, Topology, TopologyError};

/// Flags every worker takes, on top of [`CommonArgs`].
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Messages per pull request (and per handler batch).
    #[arg(long, env = "BATCH_SIZE", default_value_t = 256)]
    pub batch_size: usize,

    /// How long a batch waits for more messages after its first one (across pull requests)
    /// before it is handled; it is handled at once when full. Zero: what has arrived.
    #[arg(long, env = "BATCH_WINDOW", value_parser = humantime::parse_duration, default_value = "0s")]
    pub batch_window: Duration,

    /// Messages a per-message handler works on at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,

    /// Deliveries before a failing message is dead-lettered.
    #[arg(long, env = "MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,

    /// How long JetStream waits for an ack before redelivering.
    #[arg(long, env = "ACK_WAIT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub ack_wait: Duration,

    /// Unacknowledged messages the whole group may hold.
    #[arg(long, env = "MAX_ACK_PENDING", default_value_t = 4096)]
    pub max_ack_pending: i64,

    /// Smallest retry delay (doubling, with jitter, up to --retry-max).
    #[arg(long, env = "RETRY_MIN", value_parser = humantime::parse_duration, default_value = "200ms")]
    pub retry_min: Duration,

    /// Largest retry delay.
    #[arg(long, env = "RETRY_MAX", value_parser = humantime::parse_duration, default_value = "30s")]
    pub retry_max: Duration,

    /// How often the cutover flags are read when no change notification arrives.
    #[arg(long, env = "FLAG_POLL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub flag_poll: Duration,

    /// Connections in the worker's database pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,
}

impl WorkerArgs {
    pub fn runner_config(&self) -> RunnerConfig {
        RunnerConfig {
            batch_size: self.batch_size,
            batch_window: self.batch_window,
            max_deliver: self.max_deliver,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            retry_min: self.retry_min,
            retry_max: self.retry_max,
            ..RunnerConfig::default()
        }
    }
}

/// A connected worker process, before its groups run.
pub struct Worker {
    pub name: &'static str,
    pub args: WorkerArgs,
    pub pool: PgPool,
    pub client: async_nats::Client,
    pub ctx: RunnerContext,
    pub health: Health,
    /// The cutover flags: a processor runs here while its flag says `worker` (see
    /// [`crate::flags::Flags::gate`]).
    pub flags: crate::flags::Flags,
    pub shutdown: CancellationToken,
    tracker: TaskTracker,
    stop: CancellationToken,
    admin: tokio::task::JoinHandle<()>,
    pub admin_addr: std::net::SocketAddr,
    failures: Arc<std::sync::Mutex<Vec<anyhow::Error>>>,
}

impl Worker {
    /// Connects (lazily: a database or NATS outage at start-up is waited out, and reported by
    /// `/readyz`), starts the admin listener and declares the streams.
    pub async fn start(name: &'static str, args: WorkerArgs, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let common = &args.common;
        let topology = Topology::new(&common.nats_prefix)?;
        let metrics = crate::telemetry::install_metrics();
        crate::shadow::init_metrics();
        let mut pool_config = trellis_store::PoolConfig::new(name);
        pool_config.max_connections = args.db_pool_size;
        pool_config.acquire_timeout = common.io_timeout;
        pool_config.statement_timeout = common.batch_timeout;
        let pool = trellis_store::connect_lazy(common.database_url.expose(), &pool_config)?;
        let client = nats::connect(&common.nats_url, name, common.io_timeout).await?;
        let js = nats::jetstream(client.clone(), common.io_timeout);
        let health = Health::new();
        health.add("database", Severity::Critical, health::database_check(pool.clone()));
        health.add("nats", Severity::Critical, health::nats_check(client.clone()));
        let (admin_addr, admin) =
            crate::admin::serve(common.admin_addr, health.clone(), metrics, shutdown.clone()).await?;
        let host = hostname();
        let ctx = RunnerContext { js, topology, host, version: env!("CARGO_PKG_VERSION").to_owned() };
        declare_streams(&ctx, &shutdown).await?;
        let stop = CancellationToken::new();
        let flags = crate::flags::Flags::watch(pool.clone(), args.flag_poll, stop.clone());
        Ok(Self {
            name,
            args,
            pool,
            client,
            ctx,
            health,
            flags,
            shutdown,
            tracker: TaskTracker::new(),
            stop,
            admin,
            admin_addr,
            failures: Arc::default(),
        })
    }

    /// Starts a consumer group; `/readyz` waits for it to be bound (or standing by, when its
    /// cutover flag names the other side).
    pub fn spawn_group<H: Handler>(&self, group: ConsumerGroup<H>) {
        let bound = group.bound_flag();
        let standing_by = group.standing_by_flag();
        let name = group.name().to_owned();
        self.health.add(format!("consumer {name}"), Severity::Critical, move || {
            let ok = bound.load(Ordering::Acquire) || standing_by.load(Ordering::Acquire);
            async move { if ok { Ok(()) } else { Err("not bound yet".to_owned()) } }
        });
        let stop = self.stop.clone();
        let failures = self.failures.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            if let Err(e) = group.run(stop).await {
                tracing::error!(consumer = %name, error = %e, "consumer group cannot run");
                failures.lock().expect("failures lock").push(e.into());
                shutdown.cancel();
            }
        });
    }

    /// Runs `flag`'s shadow candidate (the group `make` builds, see
    /// [`crate::shadow::run_candidate`]) while this worker is the candidate, and `comparer`
    /// (started each time a period begins, its token cancelled when it ends) beside it.
    pub fn spawn_candidate<H, F, C, Fut>(&self, flag: trellis_domain::flags::Flag, make: F, comparer: C)
    where
        H: Handler,
        F: Fn() -> ConsumerGroup<H> + Send + Sync + 'static,
        C: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let gate = self.flags.candidate_gate(flag, trellis_domain::flags::Executor::Worker);
        self.tracker.spawn(crate::shadow::run_candidate(make, gate.clone(), self.stop.clone()));
        self.tracker.spawn(crate::flags::while_open(gate, self.stop.clone(), comparer));
    }

    /// Runs `task` (e.g. a processor that drives several groups itself) like a group: the
    /// shutdown waits for it within the grace period, and an error stops the worker.
    pub fn spawn_task<F>(&self, name: &str, task: F)
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.to_owned();
        let failures = self.failures.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            if let Err(e) = task.await {
                tracing::error!(task = %name, error = format!("{e:#}"), "task cannot run");
                failures.lock().expect("failures lock").push(e);
                shutdown.cancel();
            }
        });
    }

    /// A token that is cancelled when the groups must stop fetching.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs until shutdown, then stops fetching, waits up to the grace period for in-flight
    /// work, drains the NATS connection and returns.
    pub async fn run(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        tracing::info!(worker = self.name, "stopping: no new fetches; finishing in-flight messages");
        self.stop.cancel();
        self.tracker.close();
        let grace = self.args.common.shutdown_grace;
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(?grace, "in-flight work did not finish within the grace period; shutdown was not graceful");
        }
        // `drain` only queues the drain and returns: flush first, so that the acks of the
        // messages just finished reach the server before the process exits (otherwise they are
        // lost and the messages redelivered to another replica after ack_wait).
        match tokio::time::timeout(self.args.common.io_timeout, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the NATS connection failed; some acks may be lost"),
            Err(_) => tracing::warn!("flushing the NATS connection timed out; some acks may be lost"),
        }
        if let Err(e) = self.client.drain().await {
            tracing::warn!(error = %e, "draining the NATS connection failed");
        }
        let _ = self.admin.await;
        let failures = std::mem::take(&mut *self.failures.lock().expect("failures lock"));
        match failures.into_iter().next() {
            Some(e) => Err(e),
            None => {
                tracing::info!(worker = self.name, "stopped");
                Ok(())
            }
        }
    }
}

async fn declare_streams(ctx: &RunnerContext, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        match nats::ensure_streams(&ctx.js, &ctx.topology).await {
            Ok(()) => return Ok(()),
            Err(e @ TopologyError::Mismatch { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "declaring JetStream streams failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// This machine's name, for dead-letter headers.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into())
}

/// The `main` of a worker binary: logging, signals, start, `setup` (which spawns the groups),
/// run, and the exit code.
pub async fn main<F>(name: &'static str, args: WorkerArgs, setup: F) -> std::process::ExitCode
where
    F: for<'w> FnOnce(&'w Worker) -> futures::future::BoxFuture<'w, anyhow::Result<()>>,
{
    crate::telemetry::init_logging(args.common.log_format);
    let shutdown = crate::shutdown::on_signal();
    let result = async {
        let worker = Worker::start(name, args, shutdown).await?;
        tracing::info!(worker = name, admin = %worker.admin_addr, "started");
        setup(&worker).await?;
        // Once its groups are registered: whoever reads the addresses may wait for `/readyz`.
        crate::admin::write_addr_file(worker.args.common.addr_file.as_deref(), &[("admin", worker.admin_addr)])?;
        worker.run().await
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(worker = name, error = format!("{e:#}"), "stopped with an error");
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
