//! The process skeleton every long-running Trellis binary runs on (`trellis-api` and each
//! worker): the processors' database pool, the NATS connection, the admin listener, the stream
//! declaration with its retry, the cutover flags, one [`TaskTracker`] for every task the
//! process starts, fatal errors, and the shutdown: the grace period, the ack flush, then the
//! NATS drain.
//!
//! A processor ([`Processor`]) is installed on a host for the host's side of the cutover
//! (`worker` in a worker binary, `monolith` in `trellis-api`): its consumer groups are gated by
//! that side of its flag, its shadow candidate runs while that side is the candidate, and
//! everything stands by otherwise. The same `install` serves both processes.
//!
//! Shutdown, on SIGTERM or a fatal error: the intake (`trellis-api`'s HTTP server, see
//! [`Host::spawn_intake`]) stops taking work and finishes what it holds; then the processors
//! stop pulling and finish the batches in hand; all within `SHUTDOWN_GRACE` from the signal.
//! Then the acks just sent are flushed (`drain` only queues the drain: without the flush they
//! may never reach the server, and the messages are redelivered after `ACK_WAIT`), the
//! connection is drained and the admin listener joined.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_domain::flags::{Executor, Flag};

use crate::config::CommonArgs;
use crate::consumer::{ConsumerGroup, Handler, RunnerConfig, RunnerContext};
use crate::cutover::ShadowCandidate;
use crate::cutover::flags::Flags;
use crate::health::{self, Health, Severity};
use crate::nats::{self, Topology, TopologyError};

/// A processor: a library value that a [`Host`] runs, the same in its worker binary and in
/// `trellis-api`.
pub trait Processor: Send + Sync + 'static {
    /// Its name (its worker binary's, and the label of its log lines).
    fn name(&self) -> &'static str;

    /// How its consumer groups batch unless the process's flags say otherwise
    /// (`BATCH_SIZE`, `BATCH_WINDOW`).
    fn batching(&self) -> Batching {
        Batching::default()
    }

    /// Exports every series it owns, at zero (or as the database records it), so that a
    /// scrape sees them from start-up whichever side executes it. Every host that installs the
    /// processor calls it once, before `install`.
    /// What needs the database is read in a task of the host's, so that an outage does not hold
    /// up the start.
    fn register_metrics(&self, host: &Host);

    /// Starts the processor on `host` for the host's side ([`Host::executor`]): its groups and
    /// tasks as the primary (gated by [`Host::gate`]), its shadow candidate while this side is
    /// the candidate ([`Host::spawn_candidate`]), standing by otherwise.
    fn install<'h>(&'h self, host: &'h Host) -> BoxFuture<'h, anyhow::Result<()>>;
}

/// How a processor's groups batch by default.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub size: usize,
    pub window: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        let runner = RunnerConfig::default();
        Self { size: runner.batch_size, window: runner.batch_window }
    }
}

/// What a host is started with.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The process's name (its NATS connection's).
    pub name: &'static str,
    pub common: CommonArgs,
    /// The processors' pool's `application_name` (`trellis-api` has other pools besides).
    pub pool_name: &'static str,
    /// The side of the cutover flags this process executes for: `Worker` or `Monolith`.
    pub executor: Executor,
    /// Connections in the processors' pool.
    pub pool_size: u32,
    /// How often the cutover flags are read when no change notification arrives.
    pub flag_poll: Duration,
    /// How NATS, and with it every consumer group, counts in `/readyz`: `Critical` in a worker,
    /// `Degrading` in `trellis-api` (which takes writes without NATS: the outbox holds them).
    pub nats: Severity,
    /// How groups pull and retry; `batch_size` and `batch_window` are each processor's
    /// [`Batching`] unless `batch_size` / `batch_window` below are set.
    pub runner: RunnerConfig,
    pub batch_size: Option<usize>,
    pub batch_window: Option<Duration>,
}

/// A started process, before and while its processors run.
pub struct Host {
    config: HostConfig,
    pool: PgPool,
    client: async_nats::Client,
    ctx: RunnerContext,
    health: Health,
    metrics: PrometheusHandle,
    flags: Flags,
    shutdown: CancellationToken,
    stop: CancellationToken,
    intake: TaskTracker,
    tracker: TaskTracker,
    admin: tokio::task::JoinHandle<()>,
    admin_addr: SocketAddr,
    admin_extension: crate::admin::Extension,
    declared: watch::Receiver<bool>,
    /// Set by [`Host::run`]: every processor is installed (and has added its `/readyz` checks).
    installed: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<anyhow::Error>>>,
}

impl Host {
    /// Connects (lazily: a database or NATS outage at start-up is waited out, and reported by
    /// `/readyz`), starts the admin listener, the stream declaration (retried until NATS
    /// answers; a configuration the server does not keep is fatal) and the flag watcher.
    /// `shutdown` starts the shutdown ([`Self::run`]); a fatal error cancels it too.
    pub async fn start(config: HostConfig, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let common = &config.common;
        let topology = Topology::new(&common.nats_prefix)?.with_streams(common.streams.settings());
        let metrics = crate::telemetry::install_metrics();
        crate::instrument::register();
        let pool = Self::connect_pool(common, config.pool_name, config.pool_size, common.batch_timeout)?;
        let client = nats::connect(&common.nats, config.name, common.io_timeout).await?;
        let js = nats::jetstream(client.clone(), common.io_timeout);
        let health = Health::new();
        health.add("database", Severity::Critical, health::database_check(pool.clone()));
        health.add("nats", config.nats, health::nats_check(client.clone()));
        // Until then a group's check does not exist yet: without this one, `/readyz` would say
        // ready while nothing is bound.
        let installed = Arc::new(AtomicBool::new(false));
        let installing = installed.clone();
        health.add("processors", Severity::Critical, move || {
            let done = installing.load(Ordering::Acquire);
            async move { if done { Ok(()) } else { Err("installing the processors".to_owned()) } }
        });
        let admin_extension = crate::admin::Extension::default();
        let (admin_addr, admin) = crate::admin::serve(
            common.admin_addr,
            health.clone(),
            metrics.clone(),
            admin_extension.clone(),
            shutdown.clone(),
        )
        .await?;
        let ctx = RunnerContext { js, topology, host: hostname(), version: env!("CARGO_PKG_VERSION").to_owned() };
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let flags = Flags::watch(pool.clone(), config.flag_poll, &tracker, stop.clone());
        let (declared_tx, declared) = watch::channel(false);
        let host = Self {
            config,
            pool,
            client,
            ctx,
            health,
            metrics,
            flags,
            shutdown,
            stop,
            intake: TaskTracker::new(),
            tracker,
            admin,
            admin_addr,
            admin_extension,
            declared,
            installed,
            failures: Arc::default(),
        };
        let (ctx, stop) = (host.ctx.clone(), host.stop.clone());
        host.spawn_task("stream declaration", async move {
            declare_streams(&ctx, &stop).await?;
            declared_tx.send_replace(true);
            Ok(())
        });
        Ok(host)
    }

    /// A pool of this process on the host's database (`trellis-api` has one for requests and
    /// one for the relay besides the processors').
    pub fn connect_pool(
        common: &CommonArgs,
        name: &str,
        size: u32,
        statement_timeout: Duration,
    ) -> anyhow::Result<PgPool> {
        let mut pool_config = trellis_store::PoolConfig::new(name);
        pool_config.max_connections = size;
        pool_config.acquire_timeout = common.io_timeout;
        pool_config.statement_timeout = statement_timeout;
        Ok(trellis_store::connect_lazy(common.database_url.expose(), &pool_config)?)
    }

    pub fn name(&self) -> &'static str {
        self.config.name
    }

    pub fn common(&self) -> &CommonArgs {
        &self.config.common
    }

    /// The side this process executes for.
    pub fn executor(&self) -> Executor {
        self.config.executor
    }

    /// The processors' pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn ctx(&self) -> &RunnerContext {
        &self.ctx
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn metrics(&self) -> &PrometheusHandle {
        &self.metrics
    }

    pub fn flags(&self) -> &Flags {
        &self.flags
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where routes added to the admin listener go (see [`crate::admin::Extension`]).
    pub fn admin_extension(&self) -> &crate::admin::Extension {
        &self.admin_extension
    }

    /// Cancelled when the processors must stop pulling (after the intake has finished).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Cancelled when the shutdown starts (the signal, or a fatal error).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// How a group of a processor that batches as `batching` pulls here.
    pub fn runner(&self, batching: Batching) -> RunnerConfig {
        RunnerConfig {
            batch_size: self.config.batch_size.unwrap_or(batching.size),
            batch_window: self.config.batch_window.unwrap_or(batching.window),
            ..self.config.runner.clone()
        }
    }

    /// Open while this side executes `flag`'s processor.
    pub fn gate(&self, flag: Flag) -> watch::Receiver<bool> {
        self.flags.gate(flag, self.config.executor)
    }

    /// Resolves true once the streams are declared (false if the process stops first).
    pub fn streams_declared(&self) -> impl Future<Output = bool> + Send + 'static {
        let mut declared = self.declared.clone();
        async move { declared.wait_for(|d| *d).await.is_ok() }
    }

    /// Where tasks started later (by a request) are tracked like [`Self::spawn`]'s: the
    /// shutdown waits for them within the grace period.
    pub fn task_tracker(&self) -> TaskTracker {
        self.tracker.clone()
    }

    /// Runs `task` until it ends; the shutdown waits for it within the grace period. It must
    /// end once [`Self::stop_token`] is cancelled.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Runs `task` like [`Self::spawn`]; its error is fatal: logged, kept as the process's
    /// error, and the shutdown starts.
    pub fn spawn_task<F>(&self, name: &str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.to_owned();
        let (failures, shutdown) = (self.failures.clone(), self.shutdown.clone());
        self.tracker.spawn(async move {
            if let Err(e) = task.await {
                tracing::error!(task = %name, error = format!("{e:#}"), "cannot run; stopping the process");
                failures.lock().expect("failures lock").push(e.context(format!("{name} cannot run")));
                shutdown.cancel();
            }
        });
    }

    /// Runs what takes work from outside the process (an HTTP server): it must stop taking work
    /// when [`Self::shutdown_token`] is cancelled. The processors are stopped only once it has
    /// finished, within the grace period.
    pub fn spawn_intake<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.intake.spawn(task);
    }

    /// Runs a consumer group (its error is fatal); `/readyz` waits for it to be bound, or
    /// standing by while its gate is closed.
    pub fn spawn_group<H: Handler>(&self, group: ConsumerGroup<H>) {
        self.report_readiness(group.name().to_owned(), group.readiness());
        let name = format!("consumer group {}", group.name());
        let stop = self.stop.clone();
        self.spawn_task(&name, async move { group.run(stop).await.map_err(Into::into) });
    }

    /// Adds the `/readyz` check `consumer <name>` of a group driven by its processor (see
    /// [`Self::spawn_group`]).
    pub fn report_readiness(&self, name: String, readiness: crate::consumer::Readiness) {
        self.health.add(format!("consumer {name}"), self.config.nats, move || {
            let ready = readiness.is_ready();
            async move { if ready { Ok(()) } else { Err("not bound yet".to_owned()) } }
        });
    }

    /// Runs `task` while this side executes `flag`'s processor: started each time the gate
    /// opens, its token cancelled when it closes (for the parts of a processor that are not a
    /// consumer group, e.g. a schedule).
    pub fn spawn_while_executor<F, Fut>(&self, flag: Flag, task: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(crate::cutover::flags::while_open(self.gate(flag), self.stop.clone(), task));
    }

    /// Runs `candidate` while this side is the candidate of a shadow period of its flag: its
    /// group from new messages only, and the comparer beside it (see [`crate::cutover`]).
    pub fn spawn_candidate<C: ShadowCandidate>(&self, candidate: C) {
        let gate = self.flags.candidate_gate(C::FLAG, self.config.executor);
        let runner = self.runner(candidate.batching());
        self.tracker.spawn(crate::cutover::run_shadow(
            Arc::new(candidate),
            gate,
            self.pool.clone(),
            self.ctx.clone(),
            runner,
            self.stop.clone(),
        ));
    }

    /// Installs `processor` (its metrics, then its groups and tasks).
    pub async fn install(&self, processor: &dyn Processor) -> anyhow::Result<()> {
        processor.register_metrics(self);
        processor.install(self).await
    }

    /// Runs until the shutdown starts, then stops within the grace period (see the module
    /// doc). Returns the first fatal error, if any. It is called once every processor is
    /// installed: from then on the `processors` check of `/readyz` passes.
    pub async fn run(self) -> anyhow::Result<()> {
        self.installed.store(true, Ordering::Release);
        self.shutdown.cancelled().await;
        let grace = self.config.common.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        tracing::info!(process = self.config.name, "stopping: no new work; finishing the work in hand");
        self.intake.close();
        if tokio::time::timeout_at(deadline, self.intake.wait()).await.is_err() {
            tracing::warn!(?grace, "requests still in flight after the grace period; shutdown was not graceful");
        }
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait()).await.is_err() {
            tracing::warn!(?grace, "in-flight work did not finish within the grace period; shutdown was not graceful");
        }
        match tokio::time::timeout(self.config.common.io_timeout, self.client.flush()).await {
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
                tracing::info!(process = self.config.name, "stopped");
                Ok(())
            }
        }
    }
}

/// Declares the streams, retrying while NATS is unreachable; a configuration the server does
/// not keep is an error. Returns early (Ok) at `stop`.
async fn declare_streams(ctx: &RunnerContext, stop: &CancellationToken) -> Result<(), TopologyError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match nats::ensure_streams(&ctx.js, &ctx.topology).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "declaring JetStream streams failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A process's exit code for how it ended; an error is logged and printed on stderr.
pub fn exit_code(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    let code = match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(process = name, error = format!("{e:#}"), "stopped with an error");
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    crate::telemetry::shutdown_tracing();
    code
}

/// This machine's name, for dead-letter headers.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into())
}
