//! The dispute processor: drains filed disputes strictly by priority (P0 first), with aging so
//! that no priority starves, and decides each by the auto-adjudication rules
//! (`trellis_domain::adjudication`), handing the rest to moderators with reasons. A library
//! value ([`Processor`]) that the runtime drives; `dispute-processor` is its thin binary, and
//! `trellis-api` can run the same value in-process ([`Groups::run`] with its own context and
//! stop token).
//!
//! **Four consumers, one scheduler.** A dispute is filed on `events.disputes.filed.p<N>`; there is one
//! durable consumer per priority (`dispute-processor-p0` … `-p3`, each with one filter subject,
//! as nats-server 2.9 requires), each with its own replay consumer and DLQ subject, all run by
//! the runtime's consumer-group runner (ack, nak with backoff, DLQ, replay unchanged). What
//! makes it a priority queue is the [`scheduler::PriorityScheduler`] their handlers share: a process decides
//! `--concurrent-batches` batches at once (2 by default: one commits while the next is judged),
//! and when a slot frees up the next turn goes to the highest waiting priority, except that a
//! lower priority whose oldest message has waited longer than its maximum wait (P1 1 min, P2
//! 10 min, P3 60 min by default) takes the next turn. Aging turns alternate with strict ones,
//! so an entirely overdue backlog cannot starve the others. P0 has one more slot than the
//! others: it starts even while every regular slot is busy with lower-priority batches.
//!
//! **Why strict.** Every group always has a pull outstanding, so a new P0 reaches the scheduler
//! as soon as it is published; the scheduler never grants a lower priority while a higher one
//! waits (save the alternating aging turn), and a P0 never waits for a lower-priority batch at
//! all. At start-up the groups begin pulling in priority order (P1 only once P0's first pull is
//! on the wire, and so on), so a backlog that was queued while the processor was down is also
//! served P0 first.
//!
//! **The in-flight bound.** A group holds at most one pull (its batch size) at a time, and each
//! priority has one group per slot. P1–P3 pull short batches (`--short-batch-size`, 64 by
//! default): they bound the work a P0 shares the database with (P0 does not wait for them, it
//! runs beside them), and a process holds at most `concurrent-batches × short-batch-size` (128)
//! messages of a lower priority, leaving the rest in JetStream for other replicas.
//!
//! **Deciding a batch** is one transaction: lock the batch's pending disputes (in id order;
//! a redelivered or concurrently decided dispute is no longer pending and is acked with no
//! effect, so two replicas never decide one dispute twice), gather the facts of all of them in
//! one statement, judge them in filing order (a decision earlier in the batch is visible to the
//! later ones, exactly as one at a time: `batch`), apply the effects of upheld disputes, record
//! the decisions and their audit rows in one statement (in the order they were made, with the
//! clock and snapshot the facts were read with: what the shadow candidate needs to read the
//! same facts again, see [`cutover`]), write the outbox events, commit; then ack.

mod batch;
pub mod cutover;
pub mod instrument;
pub mod scheduler;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::future::BoxFuture;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use trellis_commands::Emitted;
use trellis_commands::disputes::{Decided, DecidedBy};
use trellis_domain::adjudication::Facts;
use trellis_domain::disputes::{DisputeStatus, Priority};
use trellis_domain::events::{EventPayload, filed_subject};
use trellis_domain::flags::Flag;
use trellis_domain::{DisputeId, UserId};
use trellis_runtime::consumer::{
    ConsumerError, ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome, Readiness, RunnerConfig, RunnerContext,
};
use trellis_runtime::host::{self, Host};
use trellis_store::disputes::DisputeRow;
use uuid::Uuid;

use batch::Batch;
pub use batch::JudgingRules;
pub use cutover::DisputeCandidate;
use instrument::{AutoAdjudicationSampled, DecisionLatency, DisputeDecided, OldestWaitingSampled, QueueSampled};
pub use scheduler::MaxWaits;

/// The durable consumer of a priority: `dispute-processor-p0` … `dispute-processor-p3`.
pub fn consumer_name(p: Priority) -> String {
    format!("dispute-processor-{}", label(p))
}

/// The consumer group of a priority.
pub fn consumer_spec(p: Priority) -> ConsumerSpec {
    ConsumerSpec { name: consumer_name(p), filter_subject: filed_subject(p) }
}

/// The metric label of a priority: `p0` … `p3`.
pub fn label(p: Priority) -> &'static str {
    match p {
        Priority::P0 => "p0",
        Priority::P1 => "p1",
        Priority::P2 => "p2",
        Priority::P3 => "p3",
    }
}

/// The rule label of a moderator's decision in `trellis_dispute_decisions_total`.
pub use trellis_domain::adjudication::MODERATOR_RULE;

/// The processor's settings (flags of the binary; `trellis-api` flattens the same).
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessorArgs {
    /// Longest a P1 dispute waits behind higher priorities before it takes the next turn.
    #[arg(long, env = "MAX_WAIT_P1", value_parser = humantime::parse_duration, default_value = "1m")]
    pub max_wait_p1: Duration,
    /// The same for P2.
    #[arg(long, env = "MAX_WAIT_P2", value_parser = humantime::parse_duration, default_value = "10m")]
    pub max_wait_p2: Duration,
    /// The same for P3.
    #[arg(long, env = "MAX_WAIT_P3", value_parser = humantime::parse_duration, default_value = "60m")]
    pub max_wait_p3: Duration,
    /// Batch size of P1–P3 (P0 uses --batch-size): bounds how long a new P0 waits.
    #[arg(long, env = "SHORT_BATCH_SIZE", default_value_t = 64)]
    pub short_batch_size: usize,
    /// Batches a process decides at once (the scheduler's slots; each priority pulls this many
    /// batches in parallel): overlaps one batch's commit and acks with the next one's work.
    #[arg(long, env = "CONCURRENT_BATCHES", default_value_t = 2)]
    pub concurrent_batches: usize,
    /// How often the queue gauges (depth, oldest waiting, auto-adjudication ratio) are refreshed.
    #[arg(long, env = "METRICS_EVERY", value_parser = humantime::parse_duration, default_value = "5s")]
    pub metrics_every: Duration,
    /// Shadow candidate: how often the comparer looks for filings the primary has decided.
    #[arg(long, env = "DISPUTE_SHADOW_COMPARE_EVERY", value_parser = humantime::parse_duration, default_value = "1s")]
    pub dispute_shadow_compare_every: Duration,
    /// Shadow candidate: a filing the primary has not decided this long after the candidate
    /// received it is recorded as missing (and never compared). Above `--max-wait-p3`: a P3
    /// filing may wait that long behind higher priorities.
    #[arg(long, env = "DISPUTE_SHADOW_MISSING_AFTER", value_parser = humantime::parse_duration, default_value = "2h")]
    pub dispute_shadow_missing_after: Duration,
}

impl Default for ProcessorArgs {
    fn default() -> Self {
        let waits = MaxWaits::default();
        Self {
            max_wait_p1: waits.p1,
            max_wait_p2: waits.p2,
            max_wait_p3: waits.p3,
            short_batch_size: 64,
            concurrent_batches: 2,
            metrics_every: Duration::from_secs(5),
            dispute_shadow_compare_every: Duration::from_secs(1),
            dispute_shadow_missing_after: Duration::from_secs(2 * 3600),
        }
    }
}

impl ProcessorArgs {
    pub fn max_waits(&self) -> MaxWaits {
        MaxWaits { p1: self.max_wait_p1, p2: self.max_wait_p2, p3: self.max_wait_p3 }
    }
}

/// The processor: a pool, its settings and the priority scheduler shared by its four handlers.
#[derive(Clone)]
pub struct Processor {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    args: ProcessorArgs,
    scheduler: scheduler::PriorityScheduler,
}

impl Processor {
    pub fn new(pool: PgPool, args: ProcessorArgs) -> Self {
        let scheduler = scheduler::PriorityScheduler::new(args.max_waits(), args.concurrent_batches);
        Self { inner: Arc::new(Inner { pool, args, scheduler }) }
    }

    /// The consumer groups, P0 first: `--concurrent-batches` pull loops on each priority's
    /// consumer (like that many replicas). `runner` is P0's configuration; P1–P3 take the same
    /// with the short batch size.
    pub fn groups(&self, ctx: RunnerContext, runner: RunnerConfig) -> Groups {
        let lanes = self.inner.args.concurrent_batches.max(1);
        let groups = Priority::ALL
            .into_iter()
            .flat_map(|p| std::iter::repeat_n(p, lanes))
            .map(|p| {
                let mut config = runner.clone();
                if p != Priority::P0 {
                    config.batch_size = self.inner.args.short_batch_size.max(1);
                }
                let handler = Arc::new(PriorityHandler { processor: self.clone(), priority: p });
                ConsumerGroup::new(ctx.clone(), consumer_spec(p), config, handler)
            })
            .collect();
        Groups { processor: self.clone(), ctx, groups }
    }

    /// Decides the pending disputes among `ids` in one transaction and returns the ids it
    /// found pending (the others were already decided, or do not exist).
    ///
    /// Before a judgement upholds a dispute, its target's row is locked and their role read
    /// again: a target the facts read as a plain user who has since become a moderator or an
    /// admin fails the batch ([`DecideError::TargetPrivileged`]), which is rolled back and
    /// judged again on new facts. Under the lock no role change can commit before the
    /// decision does, so no rule ever upholds a dispute against a moderator or an admin.
    pub async fn decide(&self, ids: &[Uuid]) -> Result<HashSet<Uuid>, DecideError> {
        let rules = JudgingRules::PRODUCTION;
        let mut tx = self.inner.pool.begin().await?;
        let locked = trellis_store::disputes::lock_pending(&mut tx, ids).await?;
        if locked.is_empty() {
            return Ok(HashSet::new());
        }
        let locked_ids: Vec<Uuid> = locked.iter().map(|r| r.id).collect();
        let gathered = trellis_store::disputes::gather_facts(&mut tx, &locked_ids).await?;
        let Some(clock) = gathered.clock else { return Ok(HashSet::new()) };
        let mut facts: HashMap<Uuid, Facts> = gathered.facts.into_iter().map(|f| (f.dispute_id, f)).collect();
        let mut rows: Vec<&DisputeRow> = locked.iter().collect();
        rows.sort_by_key(|r| (r.created_at, r.id));

        let mut batch = Batch::default();
        let mut emitted = Emitted::none();
        for row in rows {
            if batch.has_decided(row.id) {
                continue; // upheld with an earlier one of the batch (R4)
            }
            let Some(f) = facts.remove(&row.id) else { continue };
            let (f, judgement) = batch.judge(f, &rules);
            let others = batch.co_upheld(&judgement);
            let locked = if others.is_empty() {
                Vec::new()
            } else {
                trellis_store::disputes::lock_undecided(&mut tx, &others).await?.iter().map(|o| o.id).collect()
            };
            let decided = batch.record(&f, &judgement, &locked);
            if judgement.status == DisputeStatus::Upheld {
                let target = trellis_store::user_admin::lock(&mut tx, UserId(f.target_id)).await?;
                if target.is_some_and(|t| t.role.can_moderate()) {
                    return Err(DecideError::TargetPrivileged(f.target_id));
                }
            }
            // The judged dispute first: an upheld one's effects are recorded with it.
            for id in decided {
                let decision = Decided {
                    dispute: DisputeId(id),
                    target: UserId(f.target_id),
                    kind: f.kind,
                    status: judgement.status,
                    by: DecidedBy::Rule(judgement.rule.id()),
                };
                emitted.absorb(trellis_commands::disputes::apply_decision(&mut tx, &decision).await?);
            }
        }
        let recorded =
            trellis_store::disputes::record_auto_decisions(&mut tx, &batch.decisions, rules.version, &clock).await?;
        trellis_commands::commit(tx, emitted).await?;
        for r in &recorded {
            let latency = (r.decided_at - r.created_at).as_seconds_f64().max(0.0);
            DecisionLatency { priority: r.priority, seconds: latency }.emit();
        }
        for d in &batch.decisions {
            DisputeDecided { dispute: d.id, status: d.status, rule: d.rule }.emit();
        }
        Ok(locked_ids.into_iter().collect())
    }

    /// Refreshes the queue gauges every `metrics_every` until `stop`.
    pub async fn report_metrics(self, ctx: RunnerContext, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.args.metrics_every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            for p in Priority::ALL {
                let durable = ctx.topology.name(&consumer_name(p));
                let info = async {
                    let mut c: consumer::PullConsumer =
                        ctx.js.get_consumer_from_stream(durable, ctx.topology.events_stream()).await.ok()?;
                    c.info().await.ok().map(|i| i.num_pending + i.num_ack_pending as u64)
                };
                if let Some(depth) = info.await {
                    QueueSampled { priority: p, depth }.emit();
                }
            }
            match trellis_store::disputes::oldest_pending_age_seconds(&self.inner.pool).await {
                Ok(ages) => {
                    for p in Priority::ALL {
                        let age = ages.iter().find(|(rank, _)| *rank == p.rank()).map_or(0.0, |(_, a)| a.max(0.0));
                        OldestWaitingSampled { priority: p, seconds: age }.emit();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "reading the oldest pending disputes failed"),
            }
            match trellis_store::disputes::auto_adjudication_ratio(&self.inner.pool, AUTO_RATIO_WINDOW).await {
                Ok(Some(ratio)) => AutoAdjudicationSampled { ratio }.emit(),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "reading the auto-adjudication ratio failed"),
            }
        }
    }
}

/// Why a batch was not decided: it is rolled back and retried.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A judgement would uphold a dispute against this user, whom the facts read as a plain
    /// user but who is a moderator or an admin by now.
    #[error("user {0} became a moderator or an admin while the batch was judged; it is judged again")]
    TargetPrivileged(Uuid),
}

/// The window of `trellis_dispute_auto_adjudication_ratio`.
pub const AUTO_RATIO_WINDOW: Duration = Duration::from_secs(3600);

/// What the `dispute-processor` binary does.
pub const ABOUT: &str = "Drains disputes strictly by priority and auto-adjudicates them";

/// The dispute processor as a host runs it (in `dispute-processor` and in `trellis-api`).
pub struct DisputeProcessor {
    args: ProcessorArgs,
}

impl DisputeProcessor {
    pub fn new(args: ProcessorArgs) -> Self {
        Self { args }
    }
}

impl host::Processor for DisputeProcessor {
    fn name(&self) -> &'static str {
        "dispute-processor"
    }

    fn register_metrics(&self, _host: &Host) {
        instrument::register();
    }

    /// The four priorities' groups, started in order, while this side executes
    /// `dispute.executor`; the shadow candidate while this side is the candidate.
    fn install<'h>(&'h self, host: &'h Host) -> BoxFuture<'h, anyhow::Result<()>> {
        Box::pin(async move {
            let processor = Processor::new(host.pool().clone(), self.args.clone());
            let runner = host.runner(self.batching());
            let groups = processor.groups(host.ctx().clone(), runner).gated(host.gate(Flag::DisputeExecutor));
            for (name, readiness) in groups.readiness() {
                host.report_readiness(name, readiness);
            }
            let stop = host.stop_token();
            host.spawn_task("dispute consumer groups", async move { groups.run(stop).await.map_err(Into::into) });
            host.spawn_candidate(DisputeCandidate::new(host.pool().clone(), &self.args, JudgingRules::PRODUCTION));
            Ok(())
        })
    }
}

/// The handler of one priority's group: decode, wait for the scheduler, decide.
struct PriorityHandler {
    processor: Processor,
    priority: Priority,
}

/// The dispute a `disputes.filed` delivery files; any other delivery is rejected (dead-lettered):
/// it does not decode, or it is a type the dispute subjects never carry.
fn decode_filed(d: &Delivery) -> Result<Uuid, String> {
    let event = EventPayload::decode(&d.envelope).map_err(|e| e.to_string())?;
    filed(&event).map(|id| id.0)
}

/// The dispute an event files: the processor consumes `disputes.filed` and nothing else.
pub fn filed(event: &EventPayload) -> Result<DisputeId, String> {
    match event {
        EventPayload::DisputeFiled(f) => Ok(f.dispute_id),
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
        | EventPayload::DisputeDecided(_)
        | EventPayload::ScoreRunRequested(_)
        | EventPayload::ScoresUpdated(_) => {
            Err(format!("unexpected event type {} on a dispute subject", event.event_type()))
        }
    }
}

impl Handler for PriorityHandler {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let decoded: Vec<Result<Uuid, String>> = batch.iter().map(decode_filed).collect();
        let ids: Vec<Uuid> = decoded.iter().filter_map(|d| d.as_ref().ok().copied()).collect();
        let oldest = batch.iter().map(|d| d.envelope.occurred_at).min().unwrap_or_else(OffsetDateTime::now_utc);
        let result = if ids.is_empty() {
            Ok(Vec::new())
        } else {
            let turn = self.processor.inner.scheduler.enter(self.priority, oldest).await;
            if turn.aged {
                tracing::debug!(priority = self.priority.as_str(), "an overdue batch takes an aging turn");
            }
            // One decision span per filing, in its message's trace (the batch is decided at
            // once, in the runner's batch span, which links every message).
            let decisions: Vec<tracing::Span> = batch
                .iter()
                .zip(&decoded)
                .filter_map(|(d, id)| id.as_ref().ok().map(|id| (d, id)))
                .map(|(d, id)| {
                    trellis_runtime::trace::started(tracing::info_span!(parent: &d.span, "dispute decision", trellis.dispute.id = %id, priority = self.priority.as_str()))
                })
                .collect();
            let decided = self
                .processor
                .decide(&ids)
                .instrument(trellis_runtime::trace::started(tracing::info_span!("decide batch", disputes = ids.len())))
                .await;
            drop(decisions);
            match decided {
                // Not pending: already decided (a redelivery, another replica, a moderator), or
                // missing, which only a corrupt or foreign event can cause.
                Ok(pending) => {
                    let rest: Vec<Uuid> = ids.iter().copied().filter(|id| !pending.contains(id)).collect();
                    if rest.is_empty() {
                        Ok(Vec::new())
                    } else {
                        trellis_store::disputes::missing(&self.processor.inner.pool, &rest).await.map_err(Into::into)
                    }
                }
                Err(e) => Err(e),
            }
        };
        let result = result.map(|missing| missing.into_iter().collect::<HashSet<Uuid>>()).map_err(|e| {
            tracing::warn!(error = %e, priority = self.priority.as_str(), messages = batch.len(), "deciding a batch failed; it will be retried");
            format!("deciding the batch failed: {e}")
        });
        decoded
            .into_iter()
            .map(|d| match (d, &result) {
                (Err(reason), _) => Outcome::Reject(reason),
                (Ok(_), Err(e)) => Outcome::Retry(e.clone()),
                (Ok(id), Ok(missing)) if missing.contains(&id) => {
                    Outcome::Reject(format!("dispute {id} does not exist"))
                }
                (Ok(_), Ok(_)) => Outcome::Done,
            })
            .collect()
    }
}

/// The processor's four consumer groups, ready to run.
pub struct Groups {
    processor: Processor,
    ctx: RunnerContext,
    groups: Vec<ConsumerGroup<PriorityHandler>>,
}

impl Groups {
    /// Every group pulls only while `gate` is open (the cutover flag `dispute.executor` names
    /// this process): see [`ConsumerGroup::gated`].
    pub fn gated(mut self, gate: tokio::sync::watch::Receiver<bool>) -> Self {
        self.groups = self.groups.into_iter().map(|g| g.gated(gate.clone())).collect();
        self
    }

    /// Each group's name (with its lane) and what `/readyz` asks of it. A group starts once the
    /// priority above it pulls, so while the flag names the other side only P0's groups run
    /// (and stand by); the others are not started, and their closed gate makes them ready too.
    pub fn readiness(&self) -> Vec<(String, Readiness)> {
        let mut lanes: HashMap<&str, usize> = HashMap::new();
        self.groups
            .iter()
            .map(|g| {
                let lane = lanes.entry(g.name()).or_default();
                *lane += 1;
                (format!("{} lane {lane}", g.name()), g.readiness())
            })
            .collect()
    }

    /// Runs the groups, starting them in priority order, and the metrics reporter, until
    /// `stop`: then they stop fetching and finish the batches they hold. Returns the first
    /// group's error (a configuration the server will not keep).
    pub async fn run(self, stop: CancellationToken) -> Result<(), ConsumerError> {
        let reporter = tokio::spawn(self.processor.clone().report_metrics(self.ctx.clone(), stop.clone()));
        let mut running = Vec::new();
        for group in self.groups {
            let mut pulling = group.pulling();
            let name = group.name().to_owned();
            let group_stop = stop.clone();
            let task = tokio::spawn(async move {
                let result = group.run(group_stop).await;
                if let Err(e) = &result {
                    tracing::error!(consumer = %name, error = %e, "a dispute consumer group stopped");
                }
                result
            });
            tokio::select! {
                _ = pulling.wait_for(|p| *p) => {}
                _ = stop.cancelled() => {}
            }
            running.push(task);
        }
        let mut first_error = Ok(());
        for task in running {
            match task.await {
                Ok(Err(e)) if first_error.is_ok() => first_error = Err(e),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "a dispute consumer group panicked"),
            }
        }
        let _ = reporter.await;
        first_error
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

    /// What the processor's match handles is what the catalogue says it consumes, and its
    /// consumers (and its shadow candidate's) receive every subject of those types.
    #[test]
    fn the_processor_consumes_exactly_the_types_the_catalogue_names() {
        let receives = |subject: &str| {
            if !Priority::ALL.into_iter().any(|p| subject_matches(&consumer_spec(p).filter_subject, subject)) {
                return Err(format!("no priority's consumer receives {subject}"));
            }
            if !subject_matches(cutover::FILED_SUBJECTS, subject) {
                return Err(format!("the candidate misses {subject}"));
            }
            Ok(())
        };
        let found = catalogue::disagreements(Service::DisputeProcessor, |p| filed(&p).is_ok(), receives);
        assert!(found.is_empty(), "{found:#?}");
    }

    #[test]
    fn a_filing_decodes_and_anything_else_is_rejected() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let filing = Event::new(&EventType::DisputeFiled.example(), None, now);
        let EventPayload::DisputeFiled(expected) = EventType::DisputeFiled.example() else { unreachable!() };
        assert_eq!(decode_filed(&delivery(&filing)), Ok(expected.dispute_id.0));

        let mut newer = delivery(&filing);
        newer.envelope.version = 2;
        let rejected = decode_filed(&newer).unwrap_err();
        assert!(rejected.contains("version 2"), "{rejected}");

        let decided = Event::new(&EventType::DisputeDecided.example(), None, now);
        assert_eq!(
            decode_filed(&delivery(&decided)),
            Err("unexpected event type disputes.decided on a dispute subject".to_owned())
        );
        let mut unknown = delivery(&filing);
        unknown.envelope.event_type = "disputes.withdrawn".into();
        assert_eq!(decode_filed(&unknown), Err("unknown event type \"disputes.withdrawn\"".to_owned()));
    }
}
