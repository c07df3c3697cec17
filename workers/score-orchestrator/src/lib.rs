//! The score orchestrator: computes every active user's trust score in batch runs.
//!
//! A run is requested by `events.scores.run_requested` (from `trellisctl score run` or
//! `POST /v1/admin/score-runs`, through the outbox), by the schedule, or at start-up when no run
//! ever succeeded. One run at a time across every replica: the lease is a PostgreSQL session
//! advisory lock, which frees itself when its holder's connection dies. Requests that arrive
//! during a run set `score.scheduler.run_pending`; the holder starts one follow-up run for all
//! of them.
//!
//! A run loads the graph from one snapshot (COPY), computes on every core, and writes the
//! changed scores, their `events.scores.updated` chunks and the run record in one transaction.
//! Nothing here assumes which process it runs in: `trellis-api` can run it in-process.
//!
//! Every run records the digest of its input ([`trellis_domain::score::InputDigest`]), so that a
//! shadow candidate ([`cutover::ScoreCandidate`]) can be compared with the primary run of the same
//! input.

pub mod cutover;
pub mod instrument;
mod run_once;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::{Connection, PgConnection, PgPool};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_domain::events::{EventPayload, ScoreRunRequested};
use trellis_domain::flags::Flag;
use trellis_domain::score::{self, Graph, GraphBuilder, TrustResult};
use trellis_runtime::config::SecretUrl;
use trellis_runtime::consumer::{ConsumerGroup, ConsumerSpec, Delivery, EachMessage, MessageHandler, Outcome};
use trellis_runtime::host::{Host, Processor, hostname};
use trellis_runtime::worker::{OneOff, WorkerArgs};
use trellis_store::scores::{self as store, NewScore, RunResult};
use uuid::Uuid;

use instrument::{LastSuccessRead, Phase, PhaseDone, RunFailed, RunStarted, RunSucceeded, RunsAbandoned};

/// The consumer group's name (and durable consumer).
pub const CONSUMER: &str = "score-orchestrator";

/// Scores per `events.scores.updated` event.
pub use trellis_commands::scores::EVENT_CHUNK;

#[derive(Debug, Clone)]
pub struct Config {
    /// The database of the lease connections (a run's lease is a session lock on a connection
    /// of its own).
    pub database_url: SecretUrl,
    /// Run when the last successful run is older than this.
    pub schedule: Duration,
    /// How often to check whether a scheduled run is due.
    pub schedule_check: Duration,
    /// Statement timeout of a run's load and write phases.
    pub run_timeout: Duration,
    /// Threads for the compute phase (default: every core).
    pub threads: usize,
    pub host: String,
    /// How long a shadow candidate's run waits for a primary run on the same input.
    pub shadow_wait: Duration,
}

/// What the `score-orchestrator` binary does.
pub const ABOUT: &str = "Batch trust-score runs over the contact graph";

/// The `score-orchestrator` binary's own flags.
#[derive(Debug, clap::Args)]
pub struct WorkerFlags {
    #[command(flatten)]
    pub score: ScoreArgs,

    /// Make one run now, print its summary as JSON and exit (for benchmarks and on-call).
    #[arg(long)]
    pub run_once: bool,
}

/// The worker binary's processor, or its one-off run (`--run-once`).
pub fn worker(flags: WorkerFlags, worker: &WorkerArgs) -> anyhow::Result<(ScoreOrchestrator, Option<OneOff>)> {
    let one_off = flags.run_once.then(|| {
        let config = flags.score.config(&worker.common.database_url, hostname());
        Box::pin(run_once::run_once(worker.clone(), config)) as OneOff
    });
    Ok((ScoreOrchestrator::new(flags.score), one_off))
}

/// The orchestrator as a host runs it (in `score-orchestrator` and in `trellis-api`): its
/// settings; [`Processor::install`] builds the [`Orchestrator`] on the host's pool.
pub struct ScoreOrchestrator {
    args: ScoreArgs,
}

impl ScoreOrchestrator {
    pub fn new(args: ScoreArgs) -> Self {
        Self { args }
    }
}

impl Processor for ScoreOrchestrator {
    fn name(&self) -> &'static str {
        CONSUMER
    }

    /// Counters and histograms at zero, and the last success as the database records it (read
    /// in a task), so that a restarted process does not hide (or fake) a stale score.
    fn register_metrics(&self, host: &Host) {
        instrument::register();
        host.spawn(report_last_success(host.pool().clone()));
    }

    /// The orchestrator's group on the run requests (one request at a time per replica: the
    /// lease serialises replicas) and its schedule while this side executes `score.executor`;
    /// its shadow candidate while this side is the candidate.
    fn install<'h>(&'h self, host: &'h Host) -> BoxFuture<'h, anyhow::Result<()>> {
        Box::pin(async move {
            let config = self.args.config(&host.common().database_url, hostname());
            let gate = host.gate(Flag::ScoreExecutor);
            let orchestrator = Orchestrator::new(host.pool().clone(), config)?.executing_while(gate.clone());
            let handler = Arc::new(EachMessage { handler: orchestrator.clone(), concurrency: 1 });
            let runner = host.runner(self.batching());
            host.spawn_group(ConsumerGroup::new(host.ctx().clone(), consumer_spec(), runner, handler).gated(gate));
            host.spawn_candidate(cutover::ScoreCandidate::new(&orchestrator, ScoreRules::PRODUCTION));
            host.spawn_while_executor(Flag::ScoreExecutor, move |stop| orchestrator.clone().schedule(stop));
            Ok(())
        })
    }
}

/// Sets `trellis_score_last_success_timestamp_seconds` from the database.
async fn report_last_success(pool: PgPool) {
    match store::last_success(&pool).await {
        Ok(Some(at)) => LastSuccessRead { at }.emit(),
        // Never succeeded: the staleness alert fires on the absent series.
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the last successful score run; its gauge waits for the next run")
        }
    }
}

/// How often the executor's schedule looks for a pending request or a `running` run that needs
/// a lease holder (one single-row query), between its checks of whether a run is due.
pub const PENDING_CHECK: Duration = Duration::from_secs(5);

/// The orchestrator's settings as flags, shared by `score-orchestrator` and `trellis-api`
/// (which runs the orchestrator in-process when `score.executor` says `monolith`).
#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// Run when the last successful run is older than this.
    #[arg(long = "score-schedule", env = "SCORE_SCHEDULE", value_parser = humantime::parse_duration, default_value = "24h")]
    pub schedule: Duration,

    /// How often to check whether a scheduled run is due.
    #[arg(long = "score-schedule-check", env = "SCORE_SCHEDULE_CHECK", value_parser = humantime::parse_duration, default_value = "1m")]
    pub schedule_check: Duration,

    /// Statement timeout of a run's load and write phases.
    #[arg(long = "score-run-timeout", env = "SCORE_RUN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    pub run_timeout: Duration,

    /// Compute threads (default: every core).
    #[arg(long = "score-threads", env = "SCORE_THREADS")]
    pub threads: Option<usize>,

    /// Shadow: how long a candidate run waits for a primary run on the same input before it is
    /// recorded as missing.
    #[arg(long = "score-shadow-wait", env = "SCORE_SHADOW_WAIT", value_parser = humantime::parse_duration, default_value = "15m")]
    pub shadow_wait: Duration,
}

impl ScoreArgs {
    pub fn config(&self, database_url: &SecretUrl, host: String) -> Config {
        Config {
            database_url: database_url.clone(),
            schedule: self.schedule,
            schedule_check: self.schedule_check,
            run_timeout: self.run_timeout,
            threads: self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            host,
            shadow_wait: self.shadow_wait,
        }
    }
}

/// The subject this processor consumes.
pub fn consumer_spec() -> ConsumerSpec {
    ConsumerSpec { name: CONSUMER.into(), filter_subject: "events.scores.run_requested".into() }
}

/// The rules a run computes with. The orchestrator always runs [`ScoreRules::PRODUCTION`], the
/// `trellis_domain::score` functions; a shadow candidate runs the rules it is given.
#[derive(Debug, Clone, Copy)]
pub struct ScoreRules {
    /// Recorded with each run (`score.runs.algorithm`, `shadow.score_runs.algorithm`).
    pub algorithm: &'static str,
    /// The trust of every node.
    pub trust: fn(&Graph) -> TrustResult,
    /// The scores from the trust and each node's upheld disputes.
    pub scores: fn(&[f64], &[u32]) -> Vec<i32>,
}

impl ScoreRules {
    pub const PRODUCTION: ScoreRules =
        ScoreRules { algorithm: score::ALGORITHM_VERSION, trust: score::compute_trust, scores: score::scores };
}

/// What a run's compute phase produced.
struct Computed {
    trust: TrustResult,
    scores: Vec<i32>,
    edges: usize,
}

/// The orchestrator: a library value the runtime drives.
#[derive(Clone)]
pub struct Orchestrator {
    pool: PgPool,
    config: Arc<Config>,
    compute: Arc<rayon::ThreadPool>,
    /// While false, this side is not the executor (see [`Orchestrator::executing_while`]).
    executing: Option<tokio::sync::watch::Receiver<bool>>,
}

/// What one run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub run_id: Uuid,
    pub trigger: String,
    pub users: usize,
    pub edges: usize,
    pub iterations: u32,
    pub residual: f64,
    pub scores_changed: usize,
    pub load_ms: u64,
    pub compute_ms: u64,
    pub write_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Orchestrator {
    pub fn new(pool: PgPool, config: Config) -> anyhow::Result<Self> {
        let compute = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.max(1))
            .thread_name(|i| format!("score-compute-{i}"))
            .build()?;
        Ok(Self { pool, config: Arc::new(config), compute: Arc::new(compute), executing: None })
    }

    /// Serves pending requests only while `gate` is open (the cutover flag names this side):
    /// a lease holder that stops being the executor finishes the run in progress and leaves the
    /// pending request to the new executor, instead of making follow-up runs for as long as
    /// requests keep arriving during them.
    pub fn executing_while(mut self, gate: tokio::sync::watch::Receiver<bool>) -> Self {
        self.executing = Some(gate);
        self
    }

    fn is_executor(&self) -> bool {
        self.executing.as_ref().is_none_or(|gate| *gate.borrow())
    }

    /// Asks for a run and, if no other replica holds the lease, runs until no request is
    /// pending. Returns the runs this call made (none when another replica holds the lease:
    /// it will see the request).
    pub async fn request(&self, trigger: &str, requested_by: Option<Uuid>) -> Result<Vec<RunSummary>, RunError> {
        self.request_traced(trigger, requested_by, None).await
    }

    /// [`Orchestrator::request`] by a request of trace `trace_id`, which the run records (as
    /// its trace, or as a link when the request is coalesced into a run already asked for).
    pub async fn request_traced(
        &self,
        trigger: &str,
        requested_by: Option<Uuid>,
        trace_id: Option<&str>,
    ) -> Result<Vec<RunSummary>, RunError> {
        store::request_traced_run(&self.pool, trigger, requested_by, trace_id).await?;
        self.serve(None).await
    }

    /// A request made at `asked_at` (by the clock of whoever made it): served at once if a run
    /// that started since has succeeded, as when the request waited behind that run in this
    /// replica's batch. Otherwise [`Orchestrator::request`].
    pub async fn request_made_at(
        &self,
        asked_at: OffsetDateTime,
        trigger: &str,
        requested_by: Option<Uuid>,
        trace_id: Option<&str>,
    ) -> Result<Vec<RunSummary>, RunError> {
        if store::succeeded_since(&self.pool, asked_at).await? {
            tracing::info!(%asked_at, "a run that started after this request succeeded; it is served");
            return Ok(Vec::new());
        }
        self.request_traced(trigger, requested_by, trace_id).await
    }

    /// For the schedule: asks for a run only when no run is in progress anywhere (that run
    /// serves the schedule too; if it fails, the next check asks again) and the run is still
    /// due once the lease is held.
    async fn request_if_idle(&self) -> Result<Vec<RunSummary>, RunError> {
        let mut lease = PgConnection::connect(self.config.database_url.expose()).await?;
        if !store::try_lease(&mut lease).await? {
            let _ = lease.close().await;
            return Ok(Vec::new());
        }
        let due = match self.due().await {
            Ok(Some(trigger)) => store::request_run(&mut lease, trigger, None).await.map(|()| true),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        match due {
            Ok(true) => self.serve(Some(lease)).await,
            outcome => {
                let _ = store::release_lease(&mut lease).await;
                let _ = lease.close().await;
                outcome?;
                Ok(Vec::new())
            }
        }
    }

    /// The trigger of a run that is due: `startup` when none ever succeeded, `schedule` when
    /// the last success is older than the schedule.
    async fn due(&self) -> Result<Option<&'static str>, sqlx::Error> {
        Ok(match store::last_success(&self.pool).await? {
            None => Some("startup"),
            Some(at) if OffsetDateTime::now_utc() - at >= self.config.schedule => Some("schedule"),
            Some(_) => None,
        })
    }

    /// Takes the lease (or uses `held`, already taken) and runs until no request is pending.
    async fn serve(&self, mut held: Option<PgConnection>) -> Result<Vec<RunSummary>, RunError> {
        let mut done = Vec::new();
        loop {
            let mut lease = match held.take() {
                Some(lease) => lease,
                None => {
                    // The lease lives on a connection of its own: if this process dies,
                    // PostgreSQL ends the session and frees the lock.
                    let mut lease = PgConnection::connect(self.config.database_url.expose()).await?;
                    if !store::try_lease(&mut lease).await? {
                        tracing::info!("a score run is in progress elsewhere; this request joins its follow-up");
                        let _ = lease.close().await;
                        return Ok(done);
                    }
                    lease
                }
            };
            let abandoned = store::fail_abandoned_runs(&mut lease).await?;
            if abandoned > 0 {
                RunsAbandoned { runs: abandoned }.emit();
            }
            let outcome = async {
                // The pending request stays set for the new executor once this side is not.
                while self.is_executor() {
                    let run_id = Uuid::now_v7();
                    let algorithm = ScoreRules::PRODUCTION.algorithm;
                    let started = store::start_pending_run(&mut lease, run_id, &self.config.host, algorithm).await?;
                    let Some((trigger, _requested_by)) = started else { break };
                    done.push(self.run(&mut lease, run_id, &trigger).await?);
                }
                Ok::<_, RunError>(())
            }
            .await;
            let _ = store::release_lease(&mut lease).await;
            let _ = lease.close().await;
            outcome?;
            // A request may have landed between the last check and the release: look again.
            if !self.is_executor() || !store::is_run_pending(&self.pool).await? {
                return Ok(done);
            }
        }
    }

    /// Makes run `run_id`, recorded as started by [`store::start_pending_run`].
    async fn run(&self, conn: &mut PgConnection, run_id: Uuid, trigger: &str) -> Result<RunSummary, RunError> {
        let started = Instant::now();
        RunStarted { run_id, trigger }.emit();
        let result = self.phases(conn, run_id, trigger).await;
        match &result {
            Ok(summary) => RunSucceeded {
                run_id,
                users: summary.users,
                edges: summary.edges,
                iterations: summary.iterations,
                scores_changed: summary.scores_changed,
                elapsed: started.elapsed(),
            }
            .emit(),
            Err(e) => {
                RunFailed { run_id, error: e }.emit();
                // On a fresh connection: the run's own may be the broken thing.
                if let Err(mark) = store::fail_run(&self.pool, run_id, &e.to_string()).await {
                    tracing::error!(%run_id, error = %mark, "could not mark the run failed");
                }
            }
        }
        result
    }

    async fn phases(&self, conn: &mut PgConnection, run_id: Uuid, trigger: &str) -> Result<RunSummary, RunError> {
        let timeout = self.config.run_timeout;
        let t = Instant::now();
        let mut sink = BuilderSink(None);
        let loaded = store::load_graph(conn, timeout, &mut sink).await?;
        let load = t.elapsed();
        PhaseDone { phase: Phase::Load, duration: load }.emit();

        let t = Instant::now();
        let n = loaded.users.len();
        let (Computed { trust, scores, edges }, loaded) = self.compute(ScoreRules::PRODUCTION, sink, loaded).await?;
        let compute_time = t.elapsed();
        PhaseDone { phase: Phase::Compute, duration: compute_time }.emit();

        let changed: Vec<NewScore> = (0..n)
            .filter(|&i| match loaded.current[i] {
                Some((s, t)) => s != scores[i] || t.to_bits() != trust.trust[i].to_bits(),
                None => true,
            })
            .map(|i| NewScore { user_id: loaded.users[i], trust: trust.trust[i], score: scores[i] })
            .collect();
        let result = RunResult {
            run_id,
            changed: &changed,
            stale: &loaded.stale,
            users: n as i64,
            edges: edges as i64,
            iterations: trust.iterations as i32,
            residual: trust.residual,
            load_ms: load.as_millis() as i64,
            compute_ms: compute_time.as_millis() as i64,
            input_digest: loaded.input_digest,
        };
        let t = Instant::now();
        let mut tx = conn.begin().await?;
        let recorded = trellis_commands::scores::record_run(&mut tx, &result, timeout).await?;
        trellis_commands::commit_with(tx, recorded, trellis_commands::scores::finish_run(&result, t)).await?;
        let write = t.elapsed();
        PhaseDone { phase: Phase::Write, duration: write }.emit();
        let write_ms = write.as_millis() as i64;
        Ok(RunSummary {
            run_id,
            trigger: trigger.to_owned(),
            users: n,
            edges,
            iterations: trust.iterations,
            residual: trust.residual,
            scores_changed: changed.len(),
            load_ms: load.as_millis() as u64,
            compute_ms: compute_time.as_millis() as u64,
            write_ms: write_ms as u64,
        })
    }

    /// The compute phase on the compute pool: the graph the sink built, with `rules`.
    async fn compute(
        &self,
        rules: ScoreRules,
        sink: BuilderSink,
        loaded: store::LoadedGraph,
    ) -> Result<(Computed, store::LoadedGraph), RunError> {
        let mut builder = sink.0.unwrap_or_else(|| GraphBuilder::new(0));
        let compute = self.compute.clone();
        tokio::task::spawn_blocking(move || {
            compute.install(|| {
                for (i, v) in loaded.verified.iter().enumerate() {
                    if *v {
                        builder.mark_verified(i as u32);
                    }
                }
                let graph = builder.build();
                let edges = graph.edge_count();
                let trust = (rules.trust)(&graph);
                let scores = (rules.scores)(&trust.trust, &loaded.upheld);
                if trust.trust.len() != loaded.users.len() || scores.len() != loaded.users.len() {
                    return Err(RunError::Invalid(format!(
                        "the rules {} computed {} trust values and {} scores for {} users",
                        rules.algorithm,
                        trust.trust.len(),
                        scores.len(),
                        loaded.users.len()
                    )));
                }
                Ok((Computed { trust, scores, edges }, loaded))
            })
        })
        .await
        .map_err(|e| RunError::Invalid(format!("compute task: {e}")))?
    }

    /// Requests a run whenever none ever succeeded (start-up) or the last success is older
    /// than the schedule. Every replica checks; the lease and the pending flag make it one run.
    ///
    /// Between those checks it looks every [`PENDING_CHECK`] for work a lease holder must take:
    /// the executor that loses the flag finishes its pull in hand, and a request in it is left
    /// pending for this side after this side's first look (the flag reaches each side on its
    /// own clock), which the next look serves within seconds rather than a schedule check later.
    pub async fn schedule(self, stop: CancellationToken) {
        let mut pending_check = tokio::time::interval(self.config.schedule_check.min(PENDING_CHECK));
        let mut due_check = tokio::time::interval(self.config.schedule_check);
        loop {
            let check_due = tokio::select! {
                _ = pending_check.tick() => false,
                _ = due_check.tick() => true,
                _ = stop.cancelled() => return,
            };
            // A request the previous executor left pending when the flag moved here, or a run a
            // replica that died left `running` (the lease holder hands its request back).
            match store::needs_lease_holder(&self.pool).await {
                Ok(true) => match self.unless_shut_down(self.serve(None), &stop).await {
                    Some(Err(e)) => tracing::warn!(error = %e, "serving a pending score run request failed"),
                    Some(Ok(_)) => {}
                    None => return,
                },
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "checking for a pending score run request failed"),
            }
            if !check_due {
                continue;
            }
            let due = match self.due().await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "checking whether a score run is due failed");
                    None
                }
            };
            if let Some(trigger) = due {
                // A run can take a while; the check keeps ticking meanwhile.
                match self.unless_shut_down(self.request_if_idle(), &stop).await {
                    Some(Err(e)) => tracing::warn!(error = %e, trigger, "scheduled score run failed"),
                    Some(Ok(_)) => {}
                    None => return,
                }
            }
        }
    }

    /// Awaits `serving` (a run and its follow-ups) unless `stop` comes while this side is still
    /// the executor: the process is shutting down, and the run is abandoned (`None`; the next
    /// lease holder records it as failed). A `stop` that comes from a flip (this side no longer
    /// executes) lets the run in progress finish where it started, as a handler's does: dropped
    /// half-way, it would fail as abandoned, and the requests it took would be served only by
    /// the next request's run. [`Orchestrator::serve`] makes no follow-up run after a flip.
    async fn unless_shut_down<T>(&self, serving: impl Future<Output = T>, stop: &CancellationToken) -> Option<T> {
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => return Some(result),
            _ = stop.cancelled() => {}
        }
        if self.is_executor() {
            return None;
        }
        Some(serving.await)
    }
}

/// Streams the loaded edges straight into the graph builder.
struct BuilderSink(Option<GraphBuilder>);

impl store::GraphSink for BuilderSink {
    fn nodes(&mut self, count: usize, edge_estimate: usize) {
        self.0 = Some(GraphBuilder::with_edge_capacity(count, edge_estimate));
    }

    fn edge(&mut self, from: u32, to: u32) {
        self.0.as_mut().expect("nodes come before edges").add_edge(from, to);
    }
}

/// The run request a delivery carries, or the rejection (dead letter) of anything else: it does
/// not decode, or it is a type the request subject never carries.
fn check_request(delivery: &Delivery) -> Result<ScoreRunRequested, Outcome> {
    let event = EventPayload::decode(&delivery.envelope).map_err(|e| Outcome::Reject(e.to_string()))?;
    run_request(event).map_err(Outcome::Reject)
}

/// The run an event requests: the orchestrator consumes `scores.run_requested` and nothing else.
pub fn run_request(event: EventPayload) -> Result<ScoreRunRequested, String> {
    match event {
        EventPayload::ScoreRunRequested(r) => Ok(r),
        EventPayload::UserRegistered(_)
        | EventPayload::ProfileUpdated(_)
        | EventPayload::RoleGranted(_)
        | EventPayload::UserVerified(_)
        | EventPayload::UserUnverified(_)
        | EventPayload::UserSuspended(_)
        | EventPayload::UserReinstated(_)
        | EventPayload::ContactAdded(_)
        | EventPayload::ContactUpdated(_)
        | EventPayload::ContactRemoved(_)
        | EventPayload::CircleCreated(_)
        | EventPayload::CircleRenamed(_)
        | EventPayload::CircleDeleted(_)
        | EventPayload::CircleMemberAdded(_)
        | EventPayload::CircleMemberRemoved(_)
        | EventPayload::DisputeFiled(_)
        | EventPayload::DisputeDecided(_)
        | EventPayload::ScoresUpdated(_) => Err(format!("unexpected event type {:?}", event.event_type().as_str())),
    }
}

impl MessageHandler for Orchestrator {
    async fn handle_one(&self, delivery: &Delivery) -> Outcome {
        let request = match check_request(delivery) {
            Ok(request) => request,
            Err(rejected) => return rejected,
        };
        let requested_by = request.requested_by.map(|u| u.0);
        // The trace of the request that asked for the run, as the message carries it.
        let trace_id = delivery.trace.as_ref().and_then(|t| t.trace_id());
        match self.request_made_at(delivery.envelope.occurred_at, "manual", requested_by, trace_id).await {
            Ok(_) => Outcome::Done,
            Err(RunError::Invalid(e)) => Outcome::Reject(e),
            Err(e @ RunError::Database(_)) => Outcome::Retry(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_domain::events::catalogue::{self, Service};
    use trellis_domain::events::{Event, EventType, subject_matches};

    use super::*;

    fn delivery(event: &Event) -> Delivery {
        Delivery::first(event.subject.clone(), event.envelope.clone(), 1)
    }

    /// What the orchestrator's match handles is what the catalogue says it consumes, and its
    /// consumer receives every subject of those types.
    #[test]
    fn the_orchestrator_consumes_exactly_the_types_the_catalogue_names() {
        let receives = |subject: &str| {
            let received = subject_matches(&consumer_spec().filter_subject, subject);
            if received { Ok(()) } else { Err(format!("{subject} is not received")) }
        };
        let found = catalogue::disagreements(Service::ScoreOrchestrator, |p| run_request(p).is_ok(), receives);
        assert!(found.is_empty(), "{found:#?}");
    }

    #[test]
    fn a_request_with_malformed_data_or_of_another_version_is_rejected() {
        let event = Event::new(&EventType::ScoreRunRequested.example(), None, OffsetDateTime::UNIX_EPOCH);
        let EventPayload::ScoreRunRequested(expected) = EventType::ScoreRunRequested.example() else { unreachable!() };
        assert_eq!(check_request(&delivery(&event)), Ok(expected));

        let mut malformed = delivery(&event);
        malformed.envelope.data = serde_json::json!({"requested_by": "not a user id"});
        assert!(matches!(check_request(&malformed), Err(Outcome::Reject(e)) if e.starts_with("malformed")));
        let mut newer = delivery(&event);
        newer.envelope.version = 2;
        assert!(matches!(check_request(&newer), Err(Outcome::Reject(e)) if e.contains("version 2")));
    }
}
