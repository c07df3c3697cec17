//! The search projector's part of the cutover: its shadow candidate and its comparison
//! (docs/design/contracts.md §4).
//!
//! **The candidate** ([`CandidateProjector`]) pulls its own copy of `events.>` (consumer
//! `search-projector-shadow`) while `search.executor` says `shadow` and this side is not the
//! primary. For each batch it re-reads the dirty documents with the read model's own document
//! SELECT ([`search_model::directory_documents`], [`search_model::contact_documents`]: one
//! definition, shared with the projection's upsert), applies its [`DocumentRules`] on top (production:
//! [`DocumentRules::PRODUCTION`], which changes nothing), and writes them to `shadow.search_directory` /
//! `shadow.search_contacts` with its own checkpoint: nothing else, so it has no external effect.
//! Every re-read stores a new `version` of the document and raises its `through_sequence` to
//! the stream sequence of the event that dirtied *that document* (not the batch's highest).
//!
//! **The comparison** ([`SearchCandidate`]'s rounds, made by the runtime's comparer loop, with
//! a [`Comparer`] and its [`Ledger`]) compares each candidate document version with the read
//! model's document once both sides have had the same input. A document is re-read from base
//! tables, so two copies agree once both sides have applied the same events touching it; but a
//! re-read also sees writes whose events it has not applied yet. Each round reads both
//! consumers' acknowledged floors (W_p, W_c: every event at or below was applied, since the
//! projector acknowledges after its commit), then one REPEATABLE READ snapshot with the read
//! model's checkpoint (CP_p, the highest sequence the primary applied), the outbox's newest row
//! and oldest unpublished row, and the documents. A version is compared when
//! (1) W_p ≥ its `through_sequence` and (2) W_c ≥ CP_p. Equal: matched. Unequal: a suspect,
//! whose fence is the stream's last sequence once every outbox row of its snapshot is published;
//! it is confirmed mismatched only if, once both floors have passed the fence, the candidate's
//! version is unchanged (recorded with the differences *of the sighting's* two documents: the
//! primary may have applied events past the fence since); otherwise it is dropped. Why this
//! is sound (and why floors, not the checkpoints, and an outbox-based fence, not the stream's
//! last sequence at sighting): docs/workers/search-projector.md, "Shadow".

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use serde_json::Value;
use sqlx::PgPool;
use time::OffsetDateTime;
use trellis_domain::flags::Flag;
use trellis_domain::shadow::{Comparison, ComparisonResult, field_diffs};
use trellis_runtime::consumer::{ConsumerGroup, Delivery, Handler, Outcome, RunnerConfig, RunnerContext};
use trellis_runtime::cutover::{Round, ShadowCandidate};
use trellis_runtime::host::Batching;
use trellis_store::cutover::search::{self as shadow_search, DocKey, Marks, Pair, Written};
use trellis_store::search_model::{self, ContactDocument, DirectoryDocument};
use uuid::Uuid;

use crate::{CONSUMER, consumer_spec, dirty};

/// The flag whose shadow periods these are.
const FLAG: Flag = Flag::SearchExecutor;

/// How the candidate turns a document, as the shared definition builds it from the base
/// tables, into the document it stores: a transformation applied on top. Production's candidate
/// runs [`DocumentRules::PRODUCTION`]; a test passes a deliberately different one.
#[derive(Debug, Clone, Copy)]
pub struct DocumentRules {
    pub directory: fn(&mut DirectoryDocument),
    pub contact: fn(&mut ContactDocument),
}

impl DocumentRules {
    /// The documents exactly as the read model's definition builds them.
    pub const PRODUCTION: DocumentRules = DocumentRules { directory: unchanged, contact: unchanged };
}

fn unchanged<T>(_: &mut T) {}

/// The candidate's settings (`trellis-api` and `search-projector` take the same flags).
#[derive(Debug, Clone, clap::Args)]
pub struct ShadowArgs {
    /// How often, during a shadow period of `search.executor`, the candidate's documents are
    /// compared with the read model's.
    #[arg(long = "search-shadow-compare-every", env = "SEARCH_SHADOW_COMPARE_EVERY",
          value_parser = humantime::parse_duration, default_value = "1s")]
    pub compare_every: Duration,

    /// A candidate document that cannot be compared for this long (the primary has not applied
    /// its event, or a difference cannot be confirmed) is recorded as missing.
    #[arg(long = "search-shadow-missing-after", env = "SEARCH_SHADOW_MISSING_AFTER",
          value_parser = humantime::parse_duration, default_value = "5m")]
    pub missing_after: Duration,
}

impl ShadowArgs {
    pub fn config(&self) -> Result<ComparerConfig, String> {
        if self.compare_every.is_zero() {
            return Err("--search-shadow-compare-every must be longer than zero".into());
        }
        if self.missing_after.is_zero() {
            return Err("--search-shadow-missing-after must be longer than zero".into());
        }
        Ok(ComparerConfig { every: self.compare_every, missing_after: self.missing_after, batch: 1000 })
    }
}

/// How the comparer works.
#[derive(Debug, Clone, Copy)]
pub struct ComparerConfig {
    pub every: Duration,
    pub missing_after: Duration,
    /// CandidateProjector versions read per document kind and round.
    pub batch: i64,
}

/// The search projector's shadow candidate: its projection into the shadow tables with its
/// [`DocumentRules`], and the comparison of its documents with the read model's.
pub struct SearchCandidate {
    pool: PgPool,
    rules: DocumentRules,
    comparer: Comparer,
}

impl SearchCandidate {
    pub fn new(pool: PgPool, ctx: RunnerContext, config: ComparerConfig, rules: DocumentRules) -> Self {
        Self { comparer: Comparer::new(pool.clone(), ctx, config), pool, rules }
    }
}

impl ShadowCandidate for SearchCandidate {
    const FLAG: Flag = FLAG;
    type Handler = CandidateProjector;
    type Ledger = Ledger;

    fn batching(&self) -> Batching {
        crate::BATCHING
    }

    /// Its own durable consumer (`search-projector-shadow`) over `events.>`.
    fn group(&self, ctx: RunnerContext, runner: RunnerConfig) -> ConsumerGroup<CandidateProjector> {
        let spec = trellis_runtime::cutover::candidate_spec(consumer_spec());
        ConsumerGroup::new(ctx, spec, runner, Arc::new(CandidateProjector::new(self.pool.clone(), self.rules)))
    }

    fn compare_every(&self) -> Duration {
        self.comparer.config.every
    }

    /// Deletes the candidate documents of earlier periods.
    async fn begin(&self, since: OffsetDateTime) -> anyhow::Result<Ledger> {
        let deleted = shadow_search::prune(&self.pool, since).await?;
        tracing::info!(deleted, "search shadow period: earlier candidate documents deleted");
        Ok(Ledger::new(self.comparer.config.missing_after))
    }

    async fn round(&self, ledger: &mut Ledger, since: OffsetDateTime) -> anyhow::Result<Round> {
        let comparisons = self.comparer.round(ledger, since).await?;
        Ok(Round { comparisons, more: false })
    }
}

/// The stream sequence a delivery contributes: a replayed message (from the DLQ) arrives on
/// the REPLAY stream, whose sequences are not positions in `events.>`, and long after its event:
/// it re-reads its documents without raising their `through_sequence`.
fn position(delivery: &Delivery) -> i64 {
    if delivery.replays > 0 { 0 } else { i64::try_from(delivery.stream_sequence).unwrap_or(i64::MAX) }
}

/// A batch's dirty documents, each with the stream sequence of the last event that dirtied it.
#[derive(Debug, Default, PartialEq)]
pub struct DocumentPlan {
    /// Directory documents.
    pub users: BTreeMap<Uuid, i64>,
    /// Every contact document of these owners.
    pub owners: BTreeMap<Uuid, i64>,
    /// The contact documents (of any owner) that show these users.
    pub shown: BTreeMap<Uuid, i64>,
    pub newest_event_at: Option<OffsetDateTime>,
    pub max_stream_sequence: i64,
    /// One entry per delivery: `Some(reason)` for a rejected one.
    pub rejected: Vec<Option<String>>,
}

impl DocumentPlan {
    pub fn of(batch: &[Delivery]) -> Self {
        fn raise(map: &mut BTreeMap<Uuid, i64>, ids: Vec<Uuid>, seq: i64) {
            for id in ids {
                let s = map.entry(id).or_insert(seq);
                *s = (*s).max(seq);
            }
        }
        let mut plan = DocumentPlan::default();
        for delivery in batch {
            let seq = position(delivery);
            match dirty(delivery) {
                Err(reason) => {
                    plan.rejected.push(Some(reason));
                    continue;
                }
                Ok(Some(d)) => {
                    raise(&mut plan.users, d.users, seq);
                    raise(&mut plan.owners, d.owners, seq);
                    raise(&mut plan.shown, d.shown, seq);
                }
                Ok(None) => {}
            }
            plan.rejected.push(None);
            let at = delivery.envelope.occurred_at;
            plan.newest_event_at = Some(plan.newest_event_at.map_or(at, |n| n.max(at)));
            plan.max_stream_sequence = plan.max_stream_sequence.max(seq);
        }
        plan
    }
}

/// The candidate: a batch handler over its copy of the events that writes shadow tables only.
pub struct CandidateProjector {
    pool: PgPool,
    rule: DocumentRules,
}

impl CandidateProjector {
    pub fn new(pool: PgPool, rule: DocumentRules) -> Self {
        Self { pool, rule }
    }

    /// Applies a plan in one transaction: lock (the candidate's own locks), re-read the dirty
    /// documents with the shared definition, apply the rule, write them with their sequences
    /// (and a tombstone for each known document that is gone), advance the candidate's
    /// checkpoint, commit.
    pub async fn apply(&self, plan: &DocumentPlan) -> Result<(), sqlx::Error> {
        let Some(newest) = plan.newest_event_at else { return Ok(()) };
        let mut tx = self.pool.begin().await?;
        let shown: Vec<Uuid> = plan.shown.keys().copied().collect();
        let mut pairs: BTreeMap<(Uuid, Uuid), i64> = BTreeMap::new();
        for (owner, contact) in shadow_search::contacts_showing(&mut tx, &shown).await? {
            pairs.insert((owner, contact), plan.shown[&contact]);
        }
        let users: Vec<Uuid> = plan.users.keys().copied().collect();
        let read_owners: BTreeSet<Uuid> = plan.owners.keys().copied().chain(pairs.keys().map(|k| k.0)).collect();
        let read_owners: Vec<Uuid> = read_owners.into_iter().collect();
        shadow_search::lock(&mut tx, &users, &read_owners).await?;

        let mut directory: BTreeMap<Uuid, Written<Uuid>> =
            plan.users.iter().map(|(&key, &sequence)| (key, Written { key, document: None, sequence })).collect();
        for mut doc in search_model::directory_documents(&mut tx, &users).await? {
            let key = doc.user_id;
            (self.rule.directory)(&mut doc);
            if let Some(row) = directory.get_mut(&key) {
                row.document = Some(shadow_search::to_json(&doc)?);
            }
        }

        let dirtied = |key: &(Uuid, Uuid)| -> Option<i64> {
            match (plan.owners.get(&key.0), pairs.get(key)) {
                (Some(a), Some(b)) => Some(*a.max(b)),
                (a, b) => a.or(b).copied(),
            }
        };
        let owners: Vec<Uuid> = plan.owners.keys().copied().collect();
        let mut contacts: BTreeMap<(Uuid, Uuid), Written<(Uuid, Uuid)>> = BTreeMap::new();
        // Known documents of a dirty owner, and documents dirtied through a shown user, that the
        // re-read does not return are gone: tombstones.
        let known = shadow_search::contact_keys(&mut tx, &owners).await?;
        for key in known.into_iter().chain(pairs.keys().copied()) {
            if let Some(sequence) = dirtied(&key) {
                contacts.insert(key, Written { key, document: None, sequence });
            }
        }
        for mut doc in search_model::contact_documents(&mut tx, &read_owners).await? {
            let key = (doc.owner_id, doc.contact_id);
            // Another document of an owner re-read for a shown user: not dirty, not written.
            let Some(sequence) = dirtied(&key) else { continue };
            (self.rule.contact)(&mut doc);
            contacts.insert(key, Written { key, document: Some(shadow_search::to_json(&doc)?), sequence });
        }

        let directory: Vec<Written<Uuid>> = directory.into_values().collect();
        let contacts: Vec<Written<(Uuid, Uuid)>> = contacts.into_values().collect();
        shadow_search::write_directory(&mut tx, &directory).await?;
        shadow_search::write_contacts(&mut tx, &contacts).await?;
        shadow_search::advance_checkpoint(&mut tx, newest, plan.max_stream_sequence).await?;
        tx.commit().await
    }
}

impl Handler for CandidateProjector {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let plan = DocumentPlan::of(batch);
        let error = self.apply(&plan).await.err().map(|e| {
            tracing::warn!(error = %e, messages = batch.len(), "the search candidate's batch failed; it will be retried");
            format!("the search candidate's batch failed: {e}")
        });
        crate::outcomes(plan.rejected, error)
    }
}

/// The acknowledged floors of both consumers: every event at or below was applied and
/// committed by that side (or dead-lettered by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floors {
    pub primary: i64,
    pub candidate: i64,
}

/// A version whose two documents differed when first compared.
#[derive(Debug, Clone, PartialEq)]
struct Suspect {
    version: i64,
    sighted_at: OffsetDateTime,
    /// The newest outbox row of the sighting's snapshot: every change either side may have
    /// read by then has its event at or below it.
    outbox_newest: i64,
    /// The stream's last sequence once every outbox row up to `outbox_newest` was published.
    fence: Option<i64>,
    /// The two documents as the sighting's snapshot had them: the pair the fence proves were
    /// made from the same input. The read model's document read at confirmation may already
    /// reflect events past the fence that the candidate has not applied yet.
    primary: Value,
    candidate: Value,
}

/// What the comparer decided about one version.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Recorded: matched, mismatched or missing.
    Record { key: DocKey, version: i64, comparison: Comparison },
    /// Settled without a comparison: the suspicion came from inputs the sides did not share.
    Drop { key: DocKey, version: i64 },
}

impl Verdict {
    fn version(&self) -> (DocKey, i64) {
        match self {
            Verdict::Record { key, version, .. } | Verdict::Drop { key, version } => (*key, *version),
        }
    }
}

fn null_or(document: &Option<Value>) -> Value {
    document.clone().unwrap_or(Value::Null)
}

fn label(key: DocKey, version: i64) -> String {
    format!("{key} v{version}")
}

/// The comparer's decisions, apart from any I/O: which versions compare, which are suspects,
/// when a suspect's fence is set and when it is confirmed or dropped.
#[derive(Debug)]
pub struct Ledger {
    suspects: BTreeMap<DocKey, Suspect>,
    missing_after: time::Duration,
}

/// Suspects held at most: beyond, no new version is looked at until some are settled.
const MAX_SUSPECTS: usize = 20_000;

impl Ledger {
    pub fn new(missing_after: Duration) -> Self {
        Self {
            suspects: BTreeMap::new(),
            missing_after: time::Duration::try_from(missing_after).unwrap_or(time::Duration::MAX),
        }
    }

    /// The suspects' versions (not to be looked at again while they wait).
    pub fn pending(&self) -> Vec<(DocKey, i64)> {
        self.suspects.iter().map(|(k, s)| (*k, s.version)).collect()
    }

    pub fn has_room(&self) -> bool {
        self.suspects.len() < MAX_SUSPECTS
    }

    /// Suspects whose fence passes: both floors at or past it.
    pub fn due(&self, floors: Floors) -> Vec<DocKey> {
        self.suspects
            .iter()
            .filter(|(_, s)| s.fence.is_some_and(|f| floors.primary >= f && floors.candidate >= f))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Decides the due suspects from their current versions (`current`, read in one snapshot):
    /// a changed version is dropped unsettled (the new one is compared in its own right); an
    /// unchanged one is mismatched with the differences of its *sighting's* two documents (the
    /// ones the fence proved same-input), and settled without a comparison if the read model's
    /// current document now agrees with it.
    ///
    /// The read model's current document is no evidence for the mismatch: the primary may have
    /// applied events past the fence since (the floors only say both passed it), which the
    /// candidate, its version unchanged, has not applied yet.
    pub fn confirm(&mut self, due: &[DocKey], current: &[Pair]) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        for key in due {
            let Some(suspect) = self.suspects.remove(key) else { continue };
            let Some(pair) = current.iter().find(|p| p.key == *key && p.version == suspect.version) else {
                continue;
            };
            if field_diffs(&null_or(&pair.primary), &suspect.candidate).is_empty() {
                verdicts.push(Verdict::Drop { key: *key, version: suspect.version });
            } else {
                let comparison = Comparison::of(label(*key, suspect.version), &suspect.primary, &suspect.candidate);
                verdicts.push(Verdict::Record { key: *key, version: suspect.version, comparison });
            }
        }
        verdicts
    }

    /// Suspects sighted longer than `missing_after` ago are recorded missing: their difference
    /// could not be confirmed or dropped in time.
    pub fn expire(&mut self, marks: &Marks, floors: Floors) -> Vec<Verdict> {
        let old: Vec<DocKey> = self
            .suspects
            .iter()
            .filter(|(_, s)| marks.clock - s.sighted_at > self.missing_after)
            .map(|(k, _)| *k)
            .collect();
        old.into_iter()
            .filter_map(|key| {
                let s = self.suspects.remove(&key)?;
                let why = match s.fence {
                    None => format!(
                        "a difference unconfirmed after {}: the outbox had not published every event up to its row {}",
                        self.missing_after, s.outbox_newest
                    ),
                    Some(f) => format!(
                        "a difference unconfirmed after {}: the primary (at {}) or the candidate (at {}) has not \
                         applied every event up to stream sequence {f}",
                        self.missing_after, floors.primary, floors.candidate
                    ),
                };
                Some(Verdict::Record {
                    key,
                    version: s.version,
                    comparison: Comparison::missing(label(key, s.version), why),
                })
            })
            .collect()
    }

    /// Looks at unsettled versions (read in the snapshot of `marks`, after `floors`): compares
    /// those both sides have the same input for, and makes suspects of those that differ;
    /// records missing those whose event the primary has not applied within `missing_after`.
    pub fn sight(&mut self, pairs: Vec<Pair>, marks: &Marks, floors: Floors) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        // (2): the candidate has applied everything the primary has, so no document of the
        // primary reflects an event the candidate has not seen (below the candidate's floor).
        let caught_up = floors.candidate >= marks.primary_checkpoint;
        for pair in pairs {
            if pair.through_sequence > floors.primary {
                // (1) fails: the primary has not applied the event that dirtied this version.
                if marks.clock - pair.written_at > self.missing_after {
                    let why = format!(
                        "the primary has not applied stream sequence {} (its floor is {}) {} after the candidate did",
                        pair.through_sequence, floors.primary, self.missing_after
                    );
                    let comparison = Comparison::missing(label(pair.key, pair.version), why);
                    verdicts.push(Verdict::Record { key: pair.key, version: pair.version, comparison });
                }
                continue;
            }
            if !caught_up {
                continue;
            }
            // A newer version replaces a waiting suspect of the same document.
            self.suspects.remove(&pair.key);
            let (primary, candidate) = (null_or(&pair.primary), null_or(&pair.candidate));
            if field_diffs(&primary, &candidate).is_empty() {
                let comparison = Comparison::of(label(pair.key, pair.version), &primary, &candidate);
                verdicts.push(Verdict::Record { key: pair.key, version: pair.version, comparison });
            } else {
                let suspect = Suspect {
                    version: pair.version,
                    sighted_at: marks.clock,
                    outbox_newest: marks.outbox_newest,
                    fence: None,
                    primary,
                    candidate,
                };
                self.suspects.insert(pair.key, suspect);
            }
        }
        verdicts
    }

    /// Suspects whose fence can be set from this snapshot: every outbox row up to their
    /// sighting's newest is published (the stream's last sequence read after this snapshot
    /// then covers all their events).
    pub fn fence_ready(&self, marks: &Marks) -> Vec<DocKey> {
        self.suspects
            .iter()
            .filter(|(_, s)| s.fence.is_none())
            .filter(|(_, s)| marks.outbox_oldest_unpublished.is_none_or(|oldest| oldest > s.outbox_newest))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Sets the fence of `ready` suspects to `last_sequence` (the stream's, read after the
    /// snapshot that made them ready).
    pub fn set_fence(&mut self, ready: &[DocKey], last_sequence: i64) {
        for key in ready {
            if let Some(s) = self.suspects.get_mut(key)
                && s.fence.is_none()
            {
                s.fence = Some(last_sequence);
            }
        }
    }
}

/// Folds the matched comparisons of a round into one row per document kind (`count` = how many);
/// mismatched and missing ones stay one row each.
pub fn fold(comparisons: Vec<(DocKey, Comparison)>) -> Vec<Comparison> {
    let (mut directory, mut contacts) = (0i64, 0i64);
    let mut out = Vec::new();
    for (key, c) in comparisons {
        match (c.result, key) {
            (ComparisonResult::Matched, DocKey::Directory(_)) => directory += 1,
            (ComparisonResult::Matched, DocKey::Contact { .. }) => contacts += 1,
            _ => out.push(c),
        }
    }
    for (kind, n) in [("directory", directory), ("contacts", contacts)] {
        if n > 0 {
            let key = format!("{kind}: {n} document version{}", if n == 1 { "" } else { "s" });
            out.push(Comparison { key, result: ComparisonResult::Matched, count: n, diffs: Vec::new() });
        }
    }
    out
}

/// The comparer of the documents: one round at a time, with the [`Ledger`] of the period.
#[derive(Clone)]
pub struct Comparer {
    pool: PgPool,
    ctx: RunnerContext,
    pub config: ComparerConfig,
}

/// Why a comparison round failed (the next one starts afresh; nothing was settled).
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("JetStream: {0}")]
    Nats(String),
}

impl Comparer {
    pub fn new(pool: PgPool, ctx: RunnerContext, config: ComparerConfig) -> Self {
        Self { pool, ctx, config }
    }

    fn stream(&self) -> String {
        self.ctx.topology.events_stream()
    }

    /// A consumer's acknowledged floor; 0 while it does not exist (nothing applied).
    async fn floor(&self, stream: &async_nats::jetstream::stream::Stream, consumer: &str) -> Result<i64, RoundError> {
        match stream.consumer_info(self.ctx.topology.name(consumer)).await {
            Ok(info) => Ok(i64::try_from(info.ack_floor.stream_sequence).unwrap_or(i64::MAX)),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(0),
            Err(e) => Err(RoundError::Nats(format!("reading consumer {consumer}: {e}"))),
        }
    }

    async fn last_sequence(&self) -> Result<i64, RoundError> {
        let stream = self.ctx.js.get_stream(self.stream()).await.map_err(|e| RoundError::Nats(e.to_string()))?;
        Ok(i64::try_from(stream.cached_info().state.last_sequence).unwrap_or(i64::MAX))
    }

    /// One round over the candidate documents written since `since`: floors, then one
    /// snapshot (marks, confirmations, new versions), then fences, then the verdicts recorded
    /// with their versions settled, in one transaction. Returns the comparisons recorded.
    pub async fn round(&self, ledger: &mut Ledger, since: OffsetDateTime) -> Result<Vec<Comparison>, RoundError> {
        let stream = self.ctx.js.get_stream(self.stream()).await.map_err(|e| RoundError::Nats(e.to_string()))?;
        let candidate_consumer = trellis_runtime::cutover::candidate_spec(consumer_spec()).name;
        // Read before the snapshot: whatever they count as applied is committed in it.
        let floors = Floors {
            primary: self.floor(&stream, CONSUMER).await?,
            candidate: self.floor(&stream, &candidate_consumer).await?,
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let marks = shadow_search::marks(&mut tx).await?;
        let mut verdicts = Vec::new();
        let due = ledger.due(floors);
        if !due.is_empty() {
            let current = shadow_search::current(&mut tx, &due).await?;
            verdicts.extend(ledger.confirm(&due, &current));
        }
        verdicts.extend(ledger.expire(&marks, floors));
        if ledger.has_room() {
            let pairs = shadow_search::unsettled(&mut tx, since, &ledger.pending(), self.config.batch).await?;
            verdicts.extend(ledger.sight(pairs, &marks, floors));
        }
        let ready = ledger.fence_ready(&marks);
        tx.commit().await?;
        if !ready.is_empty() {
            ledger.set_fence(&ready, self.last_sequence().await?);
        }
        Ok(self.record(verdicts).await?)
    }

    /// Settles the verdicts' versions and records their comparisons in one transaction: a
    /// version another comparer settled first is left out, so each is recorded once.
    async fn record(&self, verdicts: Vec<Verdict>) -> Result<Vec<Comparison>, sqlx::Error> {
        if verdicts.is_empty() {
            return Ok(Vec::new());
        }
        let versions: Vec<(DocKey, i64)> = verdicts.iter().map(Verdict::version).collect();
        let mut tx = self.pool.begin().await?;
        let settled: HashSet<(DocKey, i64)> = shadow_search::settle(&mut tx, &versions).await?.into_iter().collect();
        let comparisons: Vec<(DocKey, Comparison)> = verdicts
            .into_iter()
            .filter_map(|v| match v {
                Verdict::Record { key, version, comparison } if settled.contains(&(key, version)) => {
                    Some((key, comparison))
                }
                _ => None,
            })
            .collect();
        let comparisons = fold(comparisons);
        trellis_store::cutover::record(&mut *tx, FLAG, &comparisons).await?;
        tx.commit().await?;
        Ok(comparisons)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn marks(clock: OffsetDateTime, primary_checkpoint: i64, newest: i64, unpublished: Option<i64>) -> Marks {
        Marks { clock, primary_checkpoint, outbox_newest: newest, outbox_oldest_unpublished: unpublished }
    }

    fn pair(key: DocKey, version: i64, through: i64, primary: Value, candidate: Value) -> Pair {
        Pair {
            key,
            version,
            through_sequence: through,
            written_at: OffsetDateTime::UNIX_EPOCH,
            candidate: Some(candidate),
            primary: Some(primary),
        }
    }

    fn key(n: u128) -> DocKey {
        DocKey::Directory(Uuid::from_u128(n))
    }

    fn t(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(seconds)
    }

    fn results(verdicts: &[Verdict]) -> Vec<(DocKey, Option<ComparisonResult>)> {
        verdicts
            .iter()
            .map(|v| match v {
                Verdict::Record { key, comparison, .. } => (*key, Some(comparison.result)),
                Verdict::Drop { key, .. } => (*key, None),
            })
            .collect()
    }

    #[test]
    fn a_version_compares_only_once_the_primary_passed_it_and_the_candidate_passed_the_primary() {
        let mut ledger = Ledger::new(Duration::from_secs(300));
        let doc = json!({"handle": "ada"});
        let m = marks(t(10), 50, 7, None);
        // (1) fails: the primary's floor is below the version's sequence.
        let v = ledger.sight(
            vec![pair(key(1), 1, 40, doc.clone(), doc.clone())],
            &m,
            Floors { primary: 39, candidate: 60 },
        );
        assert!(v.is_empty());
        // (2) fails: the candidate's floor is below the primary's checkpoint.
        let v = ledger.sight(
            vec![pair(key(1), 1, 40, doc.clone(), doc.clone())],
            &m,
            Floors { primary: 45, candidate: 49 },
        );
        assert!(v.is_empty());
        let v = ledger.sight(
            vec![pair(key(1), 1, 40, doc.clone(), doc.clone())],
            &m,
            Floors { primary: 45, candidate: 50 },
        );
        assert_eq!(results(&v), [(key(1), Some(ComparisonResult::Matched))]);
        assert!(ledger.pending().is_empty());
    }

    #[test]
    fn a_difference_is_confirmed_only_after_the_fence_with_the_version_unchanged() {
        let mut ledger = Ledger::new(Duration::from_secs(300));
        let floors = Floors { primary: 45, candidate: 50 };
        let (p, c) = (json!({"label": "work"}), json!({"label": "WORK"}));
        // Outbox row 9 is not published yet when the difference is first seen.
        let m1 = marks(t(10), 50, 9, Some(9));
        assert!(ledger.sight(vec![pair(key(1), 3, 40, p.clone(), c.clone())], &m1, floors).is_empty());
        assert_eq!(ledger.pending(), [(key(1), 3)]);
        assert!(ledger.fence_ready(&m1).is_empty(), "row 9 of the sighting is unpublished");
        // Published (the oldest unpublished is now 12): the fence is the stream's end then.
        let m2 = marks(t(11), 55, 14, Some(12));
        assert_eq!(ledger.fence_ready(&m2), [key(1)]);
        ledger.set_fence(&[key(1)], 70);
        assert!(ledger.due(Floors { primary: 70, candidate: 69 }).is_empty(), "the candidate has not passed 70");
        assert!(ledger.due(Floors { primary: 69, candidate: 70 }).is_empty(), "the primary has not passed 70");
        let due = ledger.due(Floors { primary: 70, candidate: 71 });
        assert_eq!(due, [key(1)]);
        let v = ledger.confirm(&due, &[pair(key(1), 3, 40, p.clone(), c.clone())]);
        assert_eq!(results(&v), [(key(1), Some(ComparisonResult::Mismatched))]);
        let Verdict::Record { comparison, .. } = &v[0] else { unreachable!() };
        assert_eq!(comparison.diffs[0].field, "label");
        assert_eq!(comparison.key, format!("{} v3", key(1)));
    }

    #[test]
    fn a_suspect_whose_version_changed_is_dropped_unsettled_and_one_now_equal_is_dropped_settled() {
        let mut ledger = Ledger::new(Duration::from_secs(300));
        let floors = Floors { primary: 45, candidate: 50 };
        let (p, c) = (json!({"display_name": "Ada"}), json!({"display_name": "Ada L"}));
        let m = marks(t(10), 50, 9, None);
        ledger.sight(
            vec![pair(key(1), 1, 40, p.clone(), c.clone()), pair(key(2), 1, 40, p.clone(), c.clone())],
            &m,
            floors,
        );
        let ready = ledger.fence_ready(&m);
        ledger.set_fence(&ready, 60);
        let due = ledger.due(Floors { primary: 60, candidate: 60 });
        assert_eq!(due.len(), 2);
        // key 1 was re-read since (version 2): its suspicion came from an input the candidate
        // had not applied; key 2 is unchanged but the primary now agrees.
        let current = [pair(key(1), 2, 58, c.clone(), c.clone()), pair(key(2), 1, 40, c.clone(), c.clone())];
        let v = ledger.confirm(&due, &current);
        assert_eq!(results(&v), [(key(2), None)]);
        assert!(ledger.pending().is_empty());
        // The new version of key 1 is compared in its own right.
        let v =
            ledger.sight(vec![current[0].clone()], &marks(t(12), 58, 9, None), Floors { primary: 60, candidate: 60 });
        assert_eq!(results(&v), [(key(1), Some(ComparisonResult::Matched))]);
    }

    #[test]
    fn a_confirmed_mismatch_shows_the_sightings_documents_not_what_the_primary_applied_past_the_fence() {
        let mut ledger = Ledger::new(Duration::from_secs(300));
        let contact = DocKey::Contact { owner: Uuid::from_u128(1), contact: Uuid::from_u128(2) };
        let doc = |label: &str, circles: &[&str]| json!({"label": label, "circles": circles});
        // Sighted: the candidate's rule differs (label) on the same input (no circle yet).
        let m = marks(t(10), 50, 9, None);
        let v = ledger.sight(
            vec![pair(contact, 1, 40, doc("gym", &[]), doc("GYM", &[]))],
            &m,
            Floors { primary: 45, candidate: 50 },
        );
        assert!(v.is_empty());
        ledger.set_fence(&ledger.fence_ready(&m), 60);
        // A circle membership (stream sequence 62, after the fence) is applied by the primary;
        // the candidate has passed the fence but not 62, so its version 1 is unchanged.
        let floors = Floors { primary: 62, candidate: 60 };
        let due = ledger.due(floors);
        assert_eq!(due, [contact]);
        let v = ledger.confirm(&due, &[pair(contact, 1, 40, doc("gym", &["Gym buddies"]), doc("GYM", &[]))]);
        assert_eq!(results(&v), [(contact, Some(ComparisonResult::Mismatched))]);
        let Verdict::Record { comparison, .. } = &v[0] else { unreachable!() };
        let fields: Vec<&str> = comparison.diffs.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(fields, ["label"], "only the rule's difference, not the circle the candidate has yet to apply");
    }

    #[test]
    fn versions_the_primary_never_applies_and_unconfirmable_suspects_are_recorded_missing() {
        let mut ledger = Ledger::new(Duration::from_secs(60));
        let doc = json!({"handle": "ada"});
        let mut old = pair(key(1), 1, 90, doc.clone(), doc.clone());
        old.written_at = t(0);
        let v = ledger.sight(vec![old.clone()], &marks(t(30), 50, 9, None), Floors { primary: 80, candidate: 95 });
        assert!(v.is_empty(), "not yet overdue");
        let v = ledger.sight(vec![old], &marks(t(61), 50, 9, None), Floors { primary: 80, candidate: 95 });
        assert_eq!(results(&v), [(key(1), Some(ComparisonResult::Missing))]);

        let floors = Floors { primary: 45, candidate: 50 };
        ledger.sight(vec![pair(key(2), 1, 40, json!(1), json!(2))], &marks(t(100), 50, 9, Some(3)), floors);
        assert!(ledger.expire(&marks(t(150), 50, 9, Some(3)), floors).is_empty());
        let v = ledger.expire(&marks(t(161), 50, 9, Some(3)), floors);
        assert_eq!(results(&v), [(key(2), Some(ComparisonResult::Missing))]);
        let Verdict::Record { comparison, .. } = &v[0] else { unreachable!() };
        assert!(comparison.diffs[0].candidate.as_str().unwrap().contains("outbox had not published"), "{comparison:?}");
    }

    #[test]
    fn a_missing_document_on_one_side_is_a_difference() {
        let mut ledger = Ledger::new(Duration::from_secs(60));
        let mut gone = pair(key(1), 2, 40, json!({"label": ""}), Value::Null);
        gone.candidate = None;
        ledger.sight(vec![gone], &marks(t(10), 50, 9, None), Floors { primary: 45, candidate: 50 });
        assert_eq!(ledger.pending(), [(key(1), 2)]);
    }

    #[test]
    fn matched_comparisons_fold_into_one_row_per_kind() {
        let contact = DocKey::Contact { owner: Uuid::from_u128(1), contact: Uuid::from_u128(2) };
        let matched = |k: DocKey| (k, Comparison::of(label(k, 1), &json!(1), &json!(1)));
        let mismatched = (key(9), Comparison::of(label(key(9), 1), &json!(1), &json!(2)));
        let folded = fold(vec![matched(key(1)), matched(key(2)), matched(contact), mismatched]);
        let rows: Vec<(&str, ComparisonResult, i64)> =
            folded.iter().map(|c| (c.key.as_str(), c.result, c.count)).collect();
        assert_eq!(rows[0].1, ComparisonResult::Mismatched);
        assert_eq!(
            rows[1..],
            [
                ("directory: 2 document versions", ComparisonResult::Matched, 2),
                ("contacts: 1 document version", ComparisonResult::Matched, 1)
            ]
        );
    }

    #[test]
    fn a_plan_keeps_each_documents_own_last_sequence() {
        use trellis_domain::events::Envelope;
        let (ada, bob, carol) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let delivery = |seq: u64, event_type: &str, data: Value| Delivery {
            subject: format!("events.{event_type}"),
            envelope: Envelope {
                id: trellis_domain::ids::EventId::new(),
                event_type: event_type.into(),
                version: 1,
                occurred_at: t(seq as i64),
                actor_id: None,
                data,
            },
            stream_sequence: seq,
            deliveries: 1,
            replays: 0,
            span: tracing::Span::none(),
            trace: None,
        };
        let contact = |owner: Uuid, contact: Uuid| json!({"owner_id": owner, "contact_id": contact, "label": "x"});
        let batch = [
            delivery(10, "contacts.contact_added", contact(ada, bob)),
            delivery(
                11,
                "identity.profile_updated",
                json!({"user_id": carol, "display_name": "C", "email_changed": false}),
            ),
            delivery(12, "contacts.contact_updated", contact(bob, ada)),
            delivery(13, "contacts.contact_updated", contact(ada, carol)),
            Delivery { replays: 1, ..delivery(2, "identity.user_verified", json!({"user_id": bob})) },
        ];
        let plan = DocumentPlan::of(&batch);
        assert_eq!(plan.owners, BTreeMap::from([(ada, 13), (bob, 12)]), "per owner, not the batch's 13");
        assert_eq!(plan.users, BTreeMap::from([(carol, 11), (bob, 0)]), "a replay raises no sequence");
        assert_eq!(plan.shown, BTreeMap::from([(carol, 11)]));
        assert_eq!(plan.max_stream_sequence, 13);
        assert_eq!(plan.rejected, vec![None; 5]);
    }
}
