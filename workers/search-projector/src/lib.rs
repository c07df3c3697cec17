//! The search projector: keeps the search read model (`search.directory`, `search.contacts`,
//! `search.checkpoint`) fresh from change events. A library value ([`Projector`], a batch
//! [`Handler`]) that the runtime drives; `search-projector` is its thin binary, and
//! `trellis-api` can run the same value in-process.
//!
//! **One consumer on `events.>`.** nats-server 2.9 allows one filter subject per consumer, so
//! the choice was between one consumer on `events.>` that skips the types it does not need and
//! one consumer per domain (identity, contacts, circles, disputes, scores). One consumer wins:
//! - skipping an irrelevant event costs a type lookup and an ack, nothing more;
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
//! **Shadow.** While `search.executor` says `shadow`, the candidate side runs [`shadow`]: its
//! own copy of the events projected into `shadow.search_*`, compared with the read model on the
//! same input (docs/workers/search-projector.md).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::de::DeserializeOwned;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_domain::disputes::{DisputeKind, DisputeStatus};
use trellis_domain::events::{
    CircleChanged, CircleDeleted, CircleMember, ContactChanged, ContactRemoved, DisputeDecided, ProfileUpdated,
    ScoresUpdated, UserRef, UserRegistered, UserSuspended,
};
use trellis_runtime::consumer::{ConsumerSpec, Delivery, Handler, Outcome};
use trellis_store::search_model;
use uuid::Uuid;

pub mod shadow;

/// The durable consumer's name.
pub const CONSUMER: &str = "search-projector";

/// The projector's defaults for `--batch-size` and `--batch-window`: bigger batches gathered
/// over a short window coalesce a document's repeated events into one re-read.
pub const DEFAULT_BATCH_SIZE: &str = "1000";
pub const DEFAULT_BATCH_WINDOW: &str = "50ms";

/// The consumer group: every event (irrelevant types are skipped by the handler).
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

fn decode<T: DeserializeOwned>(delivery: &Delivery) -> Result<T, String> {
    serde_json::from_value(delivery.envelope.data.clone())
        .map_err(|e| format!("malformed {} data: {e}", delivery.envelope.event_type))
}

/// The documents an event makes dirty: `Ok(None)` for a type the read model does not depend
/// on, `Err` for a known type whose data does not decode.
pub fn dirty(delivery: &Delivery) -> Result<Option<Dirty>, String> {
    let user = |id: Uuid| Dirty { users: vec![id], ..Dirty::default() };
    let owner = |id: Uuid| Dirty { owners: vec![id], ..Dirty::default() };
    let d = match delivery.envelope.event_type.as_str() {
        "identity.user_registered" => user(decode::<UserRegistered>(delivery)?.user_id.0),
        "identity.profile_updated" => {
            let id = decode::<ProfileUpdated>(delivery)?.user_id.0;
            Dirty { users: vec![id], shown: vec![id], ..Dirty::default() }
        }
        "identity.user_suspended" => user(decode::<UserSuspended>(delivery)?.user_id.0),
        "identity.user_reinstated" | "identity.user_verified" | "identity.user_unverified" => {
            user(decode::<UserRef>(delivery)?.user_id.0)
        }
        "contacts.contact_added" | "contacts.contact_updated" => owner(decode::<ContactChanged>(delivery)?.owner_id.0),
        "contacts.contact_removed" => owner(decode::<ContactRemoved>(delivery)?.owner_id.0),
        "circles.circle_created" | "circles.circle_renamed" => owner(decode::<CircleChanged>(delivery)?.owner_id.0),
        "circles.circle_deleted" => owner(decode::<CircleDeleted>(delivery)?.owner_id.0),
        "circles.member_added" | "circles.member_removed" => owner(decode::<CircleMember>(delivery)?.owner_id.0),
        "disputes.decided" => {
            let d = decode::<DisputeDecided>(delivery)?;
            if d.kind == DisputeKind::Spam && d.status == DisputeStatus::Upheld {
                user(d.target_id.0)
            } else {
                return Ok(None);
            }
        }
        "scores.updated" => {
            let d = decode::<ScoresUpdated>(delivery)?;
            Dirty { users: d.scores.iter().map(|s| s.user_id.0).collect(), ..Dirty::default() }
        }
        _ => return Ok(None),
    };
    Ok(Some(d))
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
            metrics::gauge!("trellis_search_projection_lag_seconds").set(lag);
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
            metrics::gauge!("trellis_search_projection_lag_seconds").set(freshness.lag().as_seconds_f64())
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
            Ok(Some(age)) => metrics::gauge!("trellis_search_checkpoint_age_seconds").set(age.max(0.0)),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading the search checkpoint failed"),
        }
    }
}
