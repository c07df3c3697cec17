//! The search projector: keeps the search read model (`search.directory`, `search.contacts`,
//! `search.checkpoint`) fresh from change events. A library value ([`Projector`], a batch
//! [`Handler`]) that the runtime drives; `search-projector` is its thin binary, and
//! `trellis-api` can run the same value in-process.
//!
//! **One consumer on `events.>`.** nats-server 2.9 allows one filter subject per consumer, so
//! the choice was between one consumer on `events.>` that skips the types it does not need and
//! one consumer per domain (identity, contacts, circles, disputes, scores). One consumer wins:
//! - skipping an irrelevant event costs decoding it and an ack, nothing more (an event this code
//!   cannot decode, of an unknown type or version, is dead-lettered, not skipped: a newer
//!   producer may have meant it for the projector);
//! - the read model has a single checkpoint (last applied event time and stream sequence): with
//!   five consumers it would be five positions, and the freshness of the model the minimum of
//!   them;
//! - a document is dirtied by events of several domains (a contact document by contacts,
//!   circles and identity events): one batch coalesces them all into one re-read of each
//!   distinct document, where five consumers would re-read it once per domain;
//! - one durable consumer, one DLQ subject, one replay consumer and one set of metrics to run.
//!
//! **Order-independent and idempotent.** An event only means "these documents are dirty". For a
//! batch, the distinct dirty documents are re-read from the base tables and upserted (or
//! deleted) in set-based statements, in one transaction that also advances the checkpoint; the
//! batch is acked after the commit. Duplicates and reordering therefore cannot corrupt the
//! model; concurrent replicas are serialised per document by advisory locks
//! ([`trellis_store::search_model::lock`]).
//!
//! **Shadow.** While `search.executor` says `shadow`, the candidate side runs [`cutover`]: its
//! own copy of the events projected into `shadow.search_*`, compared with the read model on the
//! same input (docs/workers/search-projector.md).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_domain::UserId;
use trellis_domain::disputes::{DisputeKind, DisputeStatus};
use trellis_domain::events::EventPayload;
use trellis_domain::flags::Flag;
use trellis_runtime::consumer::{ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome};
use trellis_runtime::host::{Batching, Host, Processor};
use trellis_store::search_model;
use uuid::Uuid;

pub mod cutover;
pub mod instrument;

use instrument::{CheckpointAgeSampled, ProjectionLagMeasured};

/// The durable consumer's name.
pub const CONSUMER: &str = "search-projector";

/// The projector's batching unless `--batch-size` / `--batch-window` say otherwise: bigger
/// batches gathered over a short window coalesce a document's repeated events into one re-read.
pub const BATCHING: Batching = Batching { size: 1000, window: Duration::from_millis(50) };

/// What the `search-projector` binary does.
pub const ABOUT: &str = "Keeps the search read model fresh from change events";

/// The projector's settings (`search-projector` and `trellis-api` take the same flags).
#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    /// How often `trellis_search_checkpoint_age_seconds` is refreshed.
    #[arg(long, env = "CHECKPOINT_AGE_EVERY", value_parser = humantime::parse_duration, default_value = "5s")]
    pub checkpoint_age_every: Duration,

    #[command(flatten)]
    pub shadow: cutover::ShadowArgs,
}

/// The projector as a host runs it (in `search-projector` and in `trellis-api`).
pub struct SearchProjector {
    args: SearchArgs,
}

impl SearchProjector {
    pub fn new(args: SearchArgs) -> Self {
        Self { args }
    }
}

impl Processor for SearchProjector {
    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn batching(&self) -> Batching {
        BATCHING
    }

    /// The lag and the checkpoint age, from the database at once and then every
    /// `--checkpoint-age-every` (on both sides: they describe the read model).
    fn register_metrics(&self, host: &Host) {
        instrument::register();
        host.spawn(report_checkpoint_age(host.pool().clone(), self.args.checkpoint_age_every, host.stop_token()));
    }

    /// The projector's group while this side executes `search.executor`; its shadow candidate
    /// while this side is the candidate.
    fn install<'h>(&'h self, host: &'h Host) -> BoxFuture<'h, anyhow::Result<()>> {
        Box::pin(async move {
            let comparer = self.args.shadow.config().map_err(anyhow::Error::msg)?;
            let projector = Arc::new(Projector::new(host.pool().clone()));
            let runner = host.runner(self.batching());
            let group = ConsumerGroup::new(host.ctx().clone(), consumer_spec(), runner, projector);
            host.spawn_group(group.gated(host.gate(Flag::SearchExecutor)));
            let candidate = cutover::SearchCandidate::new(
                host.pool().clone(),
                host.ctx().clone(),
                comparer,
                cutover::DocumentRules::PRODUCTION,
            );
            host.spawn_candidate(candidate);
            Ok(())
        })
    }
}

/// The consumer group: every event (the types the read model does not depend on are skipped by
/// the handler).
pub fn consumer_spec() -> ConsumerSpec {
    ConsumerSpec { name: CONSUMER.into(), filter_subject: "events.>".into() }
}

/// What one event makes dirty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Directory documents (one per user).
    pub users: Vec<Uuid>,
    /// Contact documents of these owners.
    pub owners: Vec<Uuid>,
    /// Users whose handle or display name may have changed: the contact documents that show
    /// them (of every owner who has them as a contact) are dirty too.
    pub shown: Vec<Uuid>,
}

/// The documents a delivery's event makes dirty: `Ok(None)` for a type the read model does not
/// depend on, `Err` for a delivery that does not decode (an unknown type or version, or
/// malformed data: it is rejected).
pub fn dirty(delivery: &Delivery) -> Result<Option<Dirty>, String> {
    let event = EventPayload::decode(&delivery.envelope).map_err(|e| e.to_string())?;
    Ok(dirtied_by(&event))
}

/// The documents an event makes dirty; `None` for a type the read model does not depend on
/// (the catalogue lists the projector as a consumer of exactly the other types).
pub fn dirtied_by(event: &EventPayload) -> Option<Dirty> {
    let user = |id: UserId| Dirty { users: vec![id.0], ..Dirty::default() };
    let owner = |id: UserId| Dirty { owners: vec![id.0], ..Dirty::default() };
    Some(match event {
        EventPayload::UserRegistered(e) => user(e.user_id),
        EventPayload::ProfileUpdated(e) => {
            Dirty { users: vec![e.user_id.0], shown: vec![e.user_id.0], ..Dirty::default() }
        }
        EventPayload::UserSuspended(e) => user(e.user_id),
        EventPayload::UserReinstated(e) | EventPayload::UserVerified(e) | EventPayload::UserUnverified(e) => {
            user(e.user_id)
        }
        EventPayload::ContactAdded(e) | EventPayload::ContactUpdated(e) => owner(e.owner_id),
        EventPayload::ContactRemoved(e) => owner(e.owner_id),
        EventPayload::CircleCreated(e) | EventPayload::CircleRenamed(e) => owner(e.owner_id),
        EventPayload::CircleDeleted(e) => owner(e.owner_id),
        EventPayload::CircleMemberAdded(e) | EventPayload::CircleMemberRemoved(e) => owner(e.owner_id),
        // Only an upheld spam dispute changes a document (it hides its target).
        EventPayload::DisputeDecided(d) if d.kind == DisputeKind::Spam && d.status == DisputeStatus::Upheld => {
            user(d.target_id)
        }
        EventPayload::DisputeDecided(_) => Dirty::default(),
        EventPayload::ScoresUpdated(e) => {
            Dirty { users: e.scores.iter().map(|s| s.user_id.0).collect(), ..Dirty::default() }
        }
        EventPayload::RoleGranted(_) | EventPayload::DisputeFiled(_) | EventPayload::ScoreRunRequested(_) => {
            return None;
        }
    })
}

/// A batch's dirty documents, deduplicated, and how far it reaches.
#[derive(Debug, Default)]
pub struct BatchPlan {
    pub users: BTreeSet<Uuid>,
    pub owners: BTreeSet<Uuid>,
    pub shown: BTreeSet<Uuid>,
    pub newest_event_at: Option<OffsetDateTime>,
    pub max_stream_sequence: Option<u64>,
    /// One entry per delivery: `Some(reason)` for a rejected one.
    pub rejected: Vec<Option<String>>,
}

impl BatchPlan {
    pub fn of(batch: &[Delivery]) -> Self {
        let mut plan = BatchPlan::default();
        for delivery in batch {
            match dirty(delivery) {
                Err(reason) => {
                    plan.rejected.push(Some(reason));
                    continue;
                }
                Ok(Some(d)) => {
                    plan.users.extend(d.users);
                    plan.owners.extend(d.owners);
                    plan.shown.extend(d.shown);
                }
                Ok(None) => {}
            }
            plan.rejected.push(None);
            let at = delivery.envelope.occurred_at;
            plan.newest_event_at = Some(plan.newest_event_at.map_or(at, |n| n.max(at)));
            plan.max_stream_sequence =
                Some(plan.max_stream_sequence.map_or(delivery.stream_sequence, |n| n.max(delivery.stream_sequence)));
        }
        plan
    }
}

/// The projector: a batch handler over the events.
#[derive(Clone)]
pub struct Projector {
    pool: PgPool,
}

impl Projector {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Applies a plan in one transaction: lock, project the distinct dirty documents, advance
    /// the checkpoint, commit.
    pub async fn apply(&self, plan: &BatchPlan) -> Result<(), sqlx::Error> {
        let Some(newest) = plan.newest_event_at else { return Ok(()) };
        let users: Vec<Uuid> = plan.users.iter().copied().collect();
        let shown: Vec<Uuid> = plan.shown.iter().copied().collect();
        let mut tx = self.pool.begin().await?;
        let mut owners = plan.owners.clone();
        owners.extend(search_model::owners_showing(&mut tx, &shown).await?);
        let owners: Vec<Uuid> = owners.into_iter().collect();
        search_model::lock(&mut tx, &users, &owners).await?;
        search_model::project_users(&mut tx, &users).await?;
        search_model::project_contacts(&mut tx, &owners).await?;
        let sequence = i64::try_from(plan.max_stream_sequence.unwrap_or(0)).unwrap_or(i64::MAX);
        search_model::advance_checkpoint(&mut tx, newest, sequence).await?;
        tx.commit().await
    }
}

impl Handler for Projector {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let plan = BatchPlan::of(batch);
        let applied = self.apply(&plan).await;
        if applied.is_ok()
            && let Some(newest) = plan.newest_event_at
        {
            let lag = (OffsetDateTime::now_utc() - newest).as_seconds_f64().max(0.0);
            ProjectionLagMeasured { seconds: lag }.emit();
        }
        let error = applied.err().map(|e| {
            tracing::warn!(error = %e, messages = batch.len(), "projecting a batch failed; it will be retried");
            format!("projecting the batch failed: {e}")
        });
        outcomes(plan.rejected, error)
    }
}

/// One outcome per delivery of a batch applied in one transaction: the rejected ones (`Some`
/// reason) are rejected; the others are done, or all retried with `error` when the batch failed.
pub fn outcomes(rejected: Vec<Option<String>>, error: Option<String>) -> Vec<Outcome> {
    rejected
        .into_iter()
        .map(|rejected| match (rejected, &error) {
            (Some(reason), _) => Outcome::Reject(reason),
            (None, Some(e)) => Outcome::Retry(e.clone()),
            (None, None) => Outcome::Done,
        })
        .collect()
}

/// Refreshes `trellis_search_checkpoint_age_seconds` every `every` until `stop`. Before that,
/// exports the projection lag as the database has it (newest event written against newest
/// applied), so that a restarted replica shows a lag before its first batch.
pub async fn report_checkpoint_age(pool: PgPool, every: Duration, stop: CancellationToken) {
    match trellis_store::search::freshness(&pool).await {
        Ok(freshness) if freshness.lag() < time::Duration::MAX => {
            ProjectionLagMeasured { seconds: freshness.lag().as_seconds_f64() }.emit()
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "reading the search freshness failed"),
    }
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match search_model::checkpoint_age_seconds(&pool).await {
            Ok(Some(age)) => CheckpointAgeSampled { seconds: age.max(0.0) }.emit(),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading the search checkpoint failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_domain::events::catalogue::{self, Service};
    use trellis_domain::events::subject_matches;

    use super::*;

    /// What the projector's match handles is what the catalogue says it consumes, and its
    /// consumer receives every subject of those types.
    #[test]
    fn the_projector_consumes_exactly_the_types_the_catalogue_names() {
        let receives = |subject: &str| {
            let received = subject_matches(&consumer_spec().filter_subject, subject);
            if received { Ok(()) } else { Err(format!("{subject} is not received")) }
        };
        let found = catalogue::disagreements(Service::SearchProjector, |p| dirtied_by(&p).is_some(), receives);
        assert!(found.is_empty(), "{found:#?}");
    }
}
