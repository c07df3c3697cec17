//! Dead letters as on-call acts on them: which ones a filter selects, their triage groups, what
//! each one says, and the audited actions on a selection: replay (canaries first, paced),
//! park and unpark (kept in the DLQ, out of the replayable set), purge.
//!
//! Every action writes its `ops.dlq_audit` row before it touches a message, records its
//! progress there as it goes (any process can show it, and ask it to stop), and its outcome
//! when it ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use trellis_domain::events::{Envelope, EventPayload};
use trellis_runtime::dlq::{self, Entry};
use trellis_runtime::nats::Topology;
use trellis_store::dlq_audit::{self, Parked};
use uuid::Uuid;

/// Where the operations act.
#[derive(Clone)]
pub struct Ctx {
    pub js: jetstream::Context,
    pub topology: Topology,
    pub pool: sqlx::PgPool,
}

/// Which dead letters an operation acts on.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct Filter {
    /// Only this consumer's dead letters.
    #[arg(long)]
    pub consumer: Option<String>,
    /// Only this error kind (decode, transient, permanent, max_deliveries).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only dead letters whose error contains this text.
    #[arg(long)]
    pub grep: Option<String>,
    /// Only dead letters whose original subject contains this text.
    #[arg(long)]
    pub subject: Option<String>,
    /// Dead-lettered at or after this time (RFC 3339, or a duration ago such as `2h`).
    #[arg(long, value_parser = parse_time)]
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub since: Option<OffsetDateTime>,
    /// Dead-lettered before this time (RFC 3339, or a duration ago).
    #[arg(long, value_parser = parse_time)]
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub until: Option<OffsetDateTime>,
    /// DLQ sequences from this one on.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// DLQ sequences up to this one.
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Only this error fingerprint (as `stats` prints it).
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// The parked dead letters instead of the others (parked ones are never replayed).
    #[arg(long)]
    #[serde(default)]
    pub parked: bool,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.consumer.is_none() && self.is_consumer_only()
    }

    /// Nothing but (at most) a consumer: the selection has no gaps within a consumer.
    fn is_consumer_only(&self) -> bool {
        self.kind.is_none()
            && self.grep.is_none()
            && self.subject.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.from_seq.is_none()
            && self.to_seq.is_none()
            && self.fingerprint.is_none()
            && !self.parked
    }

    fn matches(&self, e: &Entry, parked: &ParkedSet) -> bool {
        self.kind.as_deref().is_none_or(|k| e.kind() == k)
            && self.grep.as_deref().is_none_or(|g| e.error().contains(g))
            && self.subject.as_deref().is_none_or(|s| e.original_subject().contains(s))
            && self.since.is_none_or(|t| e.time >= t)
            && self.until.is_none_or(|t| e.time < t)
            && self.from_seq.is_none_or(|s| e.sequence >= s)
            && self.to_seq.is_none_or(|s| e.sequence <= s)
            && self.fingerprint.as_deref().is_none_or(|f| e.fingerprint() == f)
            && self.consumer.as_deref().is_none_or(|c| e.consumer() == c)
            && parked.contains(e) == self.parked
    }
}

/// A time given as RFC 3339 or as a duration ago (`2h`).
pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .map(|d| OffsetDateTime::now_utc() - d)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration such as 2h"))
}

/// What an action acts on: given sequences (each still subject to the filter), or everything
/// the filter matches, or (`all`) every dead letter that is not parked.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Selection {
    pub sequences: Vec<u64>,
    pub filter: Filter,
    pub all: bool,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty() && self.filter.is_empty() && !self.all
    }
}

/// The parked dead letters, by DLQ sequence and the dead letter's own id.
#[derive(Debug, Default)]
pub struct ParkedSet(HashMap<u64, String>);

impl ParkedSet {
    pub async fn load(pool: &sqlx::PgPool) -> anyhow::Result<Self> {
        let rows = dlq_audit::parked(pool).await.context("reading the parked dead letters")?;
        Ok(Self(rows.into_iter().map(|p| (p.sequence as u64, p.msg_id)).collect()))
    }

    pub fn contains(&self, e: &Entry) -> bool {
        self.0.get(&e.sequence).is_some_and(|id| *id == letter_id(e))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A dead letter's own id (its message id in the DLQ): the stream and sequence it failed at.
pub fn letter_id(e: &Entry) -> String {
    format!("dlq-{}-{}", e.header(dlq::ORIGINAL_STREAM).unwrap_or(""), e.header(dlq::STREAM_SEQUENCE).unwrap_or(""))
}

/// The dead letters the filter matches, oldest first.
pub async fn read(ctx: &Ctx, filter: &Filter) -> anyhow::Result<Vec<Entry>> {
    let parked = ParkedSet::load(&ctx.pool).await?;
    let entries = dlq::read(&ctx.js, &ctx.topology, filter.consumer.as_deref(), filter.from_seq.unwrap_or(1))
        .await
        .context("reading the DLQ")?;
    Ok(entries.into_iter().filter(|e| filter.matches(e, &parked)).collect())
}

/// The DLQ as last read, for a process that lists it often (the console): each read asks the
/// stream for its state and fetches only the dead letters added since the last; when one left
/// the stream meanwhile (a replay, a purge, the stream's limits), the whole stream is read
/// again. Entries are shared, not copied, between the reads.
#[derive(Default)]
pub struct Snapshot {
    cached: tokio::sync::Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    /// The stream's last sequence when it was read.
    last: u64,
    entries: Arc<Vec<Arc<Entry>>>,
}

impl Snapshot {
    /// Every dead letter now in the DLQ, oldest first.
    pub async fn entries(&self, ctx: &Ctx) -> anyhow::Result<Arc<Vec<Arc<Entry>>>> {
        let stream = ctx.js.get_stream(ctx.topology.dlq_stream()).await.context("reading the DLQ stream's state")?;
        let state = &stream.cached_info().state;
        let mut cached = self.cached.lock().await;
        if state.messages == 0 {
            *cached = Cached { last: state.last_sequence, entries: Arc::default() };
            return Ok(cached.entries.clone());
        }
        let kept = cached.entries.iter().filter(|e| e.sequence >= state.first_sequence).count() as u64;
        let unchanged = state.last_sequence == cached.last && kept == state.messages;
        if unchanged {
            if kept < cached.entries.len() as u64 {
                // Only the oldest left (a whole consumer's replay purges through a sequence).
                let entries = cached.entries.iter().filter(|e| e.sequence >= state.first_sequence).cloned().collect();
                cached.entries = Arc::new(entries);
            }
            return Ok(cached.entries.clone());
        }
        // Only additions since the last read: the kept ones plus the new ones make the count.
        let appended = state.last_sequence > cached.last && cached.last > 0;
        let mut entries: Vec<Arc<Entry>> = if appended {
            cached.entries.iter().filter(|e| e.sequence >= state.first_sequence).cloned().collect()
        } else {
            Vec::new()
        };
        let from = if appended { cached.last + 1 } else { 1 };
        let read = dlq::read(&ctx.js, &ctx.topology, None, from).await.context("reading the DLQ")?;
        entries.extend(read.into_iter().map(Arc::new));
        if entries.len() as u64 != state.messages && appended {
            // Something left as well: read it all.
            entries = dlq::read(&ctx.js, &ctx.topology, None, 1)
                .await
                .context("reading the DLQ")?
                .into_iter()
                .map(Arc::new)
                .collect();
        }
        let last = entries.last().map_or(state.last_sequence, |e| e.sequence.max(state.last_sequence));
        *cached = Cached { last, entries: Arc::new(entries) };
        Ok(cached.entries.clone())
    }
}

/// [`read`] through a [`Snapshot`]: the dead letters the filter matches, oldest first.
pub async fn read_snapshot(ctx: &Ctx, snapshot: &Snapshot, filter: &Filter) -> anyhow::Result<Vec<Arc<Entry>>> {
    let parked = ParkedSet::load(&ctx.pool).await?;
    let entries = snapshot.entries(ctx).await?;
    Ok(entries.iter().filter(|e| filter.matches(e, &parked)).cloned().collect())
}

/// One dead letter by its DLQ sequence.
pub async fn get(ctx: &Ctx, sequence: u64) -> anyhow::Result<Entry> {
    dlq::get(&ctx.js, &ctx.topology, sequence).await.with_context(|| format!("no dead letter {sequence}"))
}

/// Whether this dead letter is parked.
pub async fn is_parked(ctx: &Ctx, e: &Entry) -> anyhow::Result<bool> {
    Ok(ParkedSet::load(&ctx.pool).await?.contains(e))
}

/// The dead letters a selection names. Refuses an empty selection.
pub async fn select(ctx: &Ctx, selection: &Selection) -> anyhow::Result<Vec<Entry>> {
    let Selection { sequences, filter, .. } = selection;
    if selection.is_empty() {
        bail!("nothing selected: give sequences, filters or all");
    }
    if !sequences.is_empty() {
        let parked = ParkedSet::load(&ctx.pool).await?;
        let mut out = Vec::with_capacity(sequences.len());
        for &seq in sequences {
            let entry = get(ctx, seq).await?;
            if filter.matches(&entry, &parked) {
                out.push(entry);
            }
        }
        return Ok(out);
    }
    read(ctx, filter).await
}

/// Dead letters of one consumer that failed for one cause.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub consumer: String,
    pub fingerprint: String,
    pub count: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
}

/// The triage view: dead letters grouped by consumer and fingerprint, largest group first.
pub fn groups<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Vec<Group> {
    let mut groups: BTreeMap<(&str, &str), Group> = BTreeMap::new();
    for e in entries {
        let g = groups.entry((e.consumer(), e.fingerprint())).or_insert_with(|| Group {
            consumer: e.consumer().to_owned(),
            fingerprint: e.fingerprint().to_owned(),
            count: 0,
            first_seen: e.time,
            last_seen: e.time,
        });
        g.count += 1;
        g.first_seen = g.first_seen.min(e.time);
        g.last_seen = g.last_seen.max(e.time);
    }
    let mut rows: Vec<Group> = groups.into_values().collect();
    rows.sort_by_key(|g| std::cmp::Reverse(g.count));
    rows
}

pub fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// A dead letter's headers, sorted by name (several values joined by `, `).
pub fn headers(e: &Entry) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = e
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(", ")))
        .collect();
    out.sort();
    out
}

/// Everything about one dead letter, as JSON.
pub fn entry_json(e: &Entry) -> serde_json::Value {
    let headers: BTreeMap<String, String> = headers(e).into_iter().collect();
    let payload = serde_json::from_slice::<serde_json::Value>(&e.payload)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&e.payload).into_owned()));
    serde_json::json!({
        "sequence": e.sequence,
        "time": time_text(e.time),
        "consumer": e.consumer(),
        "kind": e.kind(),
        "error": e.error(),
        "fingerprint": e.fingerprint(),
        "trace_id": e.trace_id(),
        "original_subject": e.original_subject(),
        "replays": e.replays(),
        "headers": headers,
        "payload": payload,
        "event": match event_of(&e.payload) {
            Ok((event_type, what)) => serde_json::json!({"decodes": true, "type": event_type, "says": what}),
            Err(why) => serde_json::json!({"decodes": false, "error": why}),
        },
    })
}

/// The payload pretty-printed when it is JSON, as text otherwise.
pub fn payload_text(e: &Entry) -> String {
    match serde_json::from_slice::<serde_json::Value>(&e.payload) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(&e.payload).into_owned(),
    }
}

/// What a dead letter's payload is as an event: its type and what it says, or why it does not
/// decode (the reason a consumer could not even look at it).
pub fn event_of(payload: &[u8]) -> Result<(String, String), String> {
    let envelope: Envelope =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not an event envelope: {e}"))?;
    let event = EventPayload::decode(&envelope).map_err(|e| e.to_string())?;
    Ok((format!("{} v{}", envelope.event_type, envelope.version), describe(&event)))
}

/// One line on what an event says happened.
fn describe(event: &EventPayload) -> String {
    match event {
        EventPayload::UserRegistered(e) => format!("user {} registered as {}", e.user_id, e.handle),
        EventPayload::ProfileUpdated(e) => format!("user {} changed their profile", e.user_id),
        EventPayload::RoleGranted(e) => format!("user {} became {}", e.user_id, e.role.as_str()),
        EventPayload::UserVerified(e) => format!("user {} was verified", e.user_id),
        EventPayload::UserUnverified(e) => format!("user {} is no longer verified", e.user_id),
        EventPayload::UserSuspended(e) => format!("user {} was suspended ({})", e.user_id, e.reason),
        EventPayload::UserReinstated(e) => format!("user {} was reinstated", e.user_id),
        EventPayload::ContactAdded(e) => format!("user {} added contact {}", e.owner_id, e.contact_id),
        EventPayload::ContactUpdated(e) => format!("user {} relabelled contact {}", e.owner_id, e.contact_id),
        EventPayload::ContactRemoved(e) => format!("user {} removed contact {}", e.owner_id, e.contact_id),
        EventPayload::CircleCreated(e) => format!("user {} created circle {} ({})", e.owner_id, e.circle_id, e.name),
        EventPayload::CircleRenamed(e) => format!("user {} renamed circle {} to {}", e.owner_id, e.circle_id, e.name),
        EventPayload::CircleDeleted(e) => format!("user {} deleted circle {}", e.owner_id, e.circle_id),
        EventPayload::CircleMemberAdded(e) => {
            format!("user {} added {} to circle {}", e.owner_id, e.user_id, e.circle_id)
        }
        EventPayload::CircleMemberRemoved(e) => {
            format!("user {} removed {} from circle {}", e.owner_id, e.user_id, e.circle_id)
        }
        EventPayload::DisputeFiled(e) => format!(
            "user {} filed {} dispute {} ({}) against {}",
            e.reporter_id,
            e.kind.as_str(),
            e.dispute_id,
            e.priority.as_str(),
            e.target_id
        ),
        EventPayload::DisputeDecided(e) => {
            format!("dispute {} against {} was {} (rule {})", e.dispute_id, e.target_id, e.status.as_str(), e.rule)
        }
        EventPayload::ScoreRunRequested(e) => format!("a score run was requested ({})", e.reason),
        EventPayload::ScoresUpdated(e) => format!("score run {} changed {} scores", e.run_id, e.scores.len()),
    }
}

/// The action an audit row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Replay,
    Purge,
    Park,
    Unpark,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Replay => "replay",
            Action::Purge => "purge",
            Action::Park => "park",
            Action::Unpark => "unpark",
        }
    }

    pub fn past(self) -> &'static str {
        match self {
            Action::Replay => "replayed",
            Action::Purge => "purged",
            Action::Park => "parked",
            Action::Unpark => "unparked",
        }
    }
}

/// Who acts and why: the audit's actor (a signed-in account in the console, the operator's name
/// in `trellisctl`) and the reason, which must say something.
pub struct Actor<'a> {
    pub name: &'a str,
    pub reason: &'a str,
}

/// An action whose audit row is written, on the dead letters it will act on.
pub struct Audited {
    pub id: Uuid,
    pub action: Action,
    entries: Vec<Entry>,
    /// The selection is every unparked dead letter of its consumers and none of theirs is
    /// parked (no gaps), so a replayed window can leave the DLQ with one purge per consumer.
    whole_consumers: bool,
}

impl Audited {
    /// Writes the audit row of `action` on `entries` (what `selection` selected).
    pub async fn start(
        ctx: &Ctx,
        action: Action,
        entries: Vec<Entry>,
        selection: &Selection,
        actor: &Actor<'_>,
        settings: serde_json::Value,
    ) -> anyhow::Result<Self> {
        if actor.reason.trim().is_empty() {
            bail!("a reason is required: say why these dead letters are {}", action.past());
        }
        let id = Uuid::now_v7();
        let sequences: Vec<i64> = entries.iter().map(|e| e.sequence as i64).collect();
        dlq_audit::start(
            &ctx.pool,
            &dlq_audit::NewAudit {
                id,
                action: action.as_str(),
                actor: actor.name,
                reason: actor.reason.trim(),
                selection: serde_json::json!({
                    "sequences": selection.sequences, "filter": selection.filter, "all": selection.all,
                    "settings": settings,
                }),
                sequences: &sequences,
                dry_run: false,
            },
        )
        .await
        .context("writing the audit row")?;
        let whole_consumers = selection.sequences.is_empty()
            && selection.filter.is_consumer_only()
            && ParkedSet::load(&ctx.pool).await?.is_empty();
        Ok(Self { id, action, entries, whole_consumers })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    async fn finish(&self, ctx: &Ctx, status: &str, outcome: serde_json::Value) -> anyhow::Result<()> {
        dlq_audit::finish(&ctx.pool, self.id, status, outcome).await.context("finishing the audit row")
    }

    /// Replays the dead letters (see [`ReplayPlan`]) and records the outcome.
    pub async fn replay(
        self,
        ctx: &Ctx,
        plan: &ReplayPlan,
        progress: &(dyn Fn(usize) + Sync),
    ) -> anyhow::Result<Replayed> {
        let result = self.replay_inner(ctx, plan, progress).await;
        let (status, outcome) = match &result {
            Ok(r) => (r.status(), r.json()),
            Err(e) => ("failed", serde_json::json!({"error": format!("{e:#}")})),
        };
        self.finish(ctx, status, outcome).await?;
        result
    }

    async fn replay_inner(
        &self,
        ctx: &Ctx,
        plan: &ReplayPlan,
        progress: &(dyn Fn(usize) + Sync),
    ) -> anyhow::Result<Replayed> {
        let mut result = Replayed { audit_id: self.id, ..Replayed::default() };
        let audit_id = self.id.to_string();
        let (canaries, rest) = self.entries.split_at(plan.canary.unwrap_or(0).min(self.entries.len()));
        if !canaries.is_empty() {
            let replay_seqs = self.send(ctx, canaries, plan, &audit_id, &mut result, progress).await?;
            let died = wait_for_canaries(ctx, canaries, &replay_seqs, &audit_id, plan.canary_timeout).await?;
            if died > 0 {
                result.canary_died = Some(died);
                return Ok(result);
            }
            result.canaries_passed = Some(canaries.len());
            dlq_audit::finish_canary(&ctx.pool, self.id, canaries.len()).await?;
        }
        if !result.cancelled {
            self.send(ctx, rest, plan, &audit_id, &mut result, progress).await?;
        }
        Ok(result)
    }

    /// Replays `entries` in windows (paced by the rate); returns the REPLAY sequences it got.
    /// A dead letter leaves the DLQ only after its replay was acknowledged. Between windows it
    /// records its progress and stops if someone asked it to.
    async fn send(
        &self,
        ctx: &Ctx,
        entries: &[Entry],
        plan: &ReplayPlan,
        audit_id: &str,
        result: &mut Replayed,
        progress: &(dyn Fn(usize) + Sync),
    ) -> anyhow::Result<Vec<u64>> {
        let rate = plan.rate.filter(|r| *r > 0.0);
        let window = match rate {
            Some(r) => (r.ceil() as usize).clamp(1, 256),
            None => 1024,
        };
        let started = std::time::Instant::now();
        let mut sent = 0usize;
        let mut replay_seqs = Vec::new();
        // Stays true while every dead letter so far was replayed: no gaps, so purging through a
        // window's last sequence removes exactly what was replayed.
        let mut no_gaps = self.whole_consumers;
        for chunk in entries.chunks(window) {
            if let Some(r) = rate {
                // Pace: the n-th message may not leave before n / rate seconds.
                let due = Duration::from_secs_f64(sent as f64 / r);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            let outcomes = dlq::publish_replays(&ctx.js, &ctx.topology, chunk, audit_id).await;
            let mut acked = Vec::with_capacity(chunk.len());
            for (entry, outcome) in chunk.iter().zip(outcomes) {
                match outcome {
                    Ok(seq) => {
                        acked.push(entry);
                        replay_seqs.push(seq);
                    }
                    Err(e) => result.failed.push((entry.sequence, format!("{e:#}"))),
                }
            }
            no_gaps &= acked.len() == chunk.len();
            if no_gaps {
                let mut last: BTreeMap<&str, u64> = BTreeMap::new();
                for e in &acked {
                    let seq = last.entry(e.consumer()).or_default();
                    *seq = (*seq).max(e.sequence);
                }
                for (consumer, through) in last {
                    if let Err(e) = dlq::remove_through(&ctx.js, &ctx.topology, consumer, through).await {
                        // Still replayed: a later replay of these would only run them again.
                        result.warnings.push(format!(
                            "replayed dead letters of {consumer} through {through} could not be removed: {e:#}"
                        ));
                    }
                }
            } else {
                let seqs: Vec<u64> = acked.iter().map(|e| e.sequence).collect();
                for (seq, removed) in seqs.iter().zip(dlq::remove(&ctx.js, &ctx.topology, &seqs).await) {
                    if let Err(e) = removed {
                        result
                            .warnings
                            .push(format!("replayed dead letter {seq} could not be removed from the DLQ: {e:#}"));
                    }
                }
            }
            result.replayed += acked.len();
            sent += chunk.len();
            progress(chunk.len());
            if let Some(by) = dlq_audit::progress(&ctx.pool, self.id, (result.replayed + result.failed.len()) as i32)
                .await
                .context("recording the replay's progress")?
            {
                result.cancelled_by = Some(by);
                result.cancelled = true;
                break;
            }
        }
        Ok(replay_seqs)
    }

    /// Deletes the dead letters for good (and forgets those that were parked).
    pub async fn purge(self, ctx: &Ctx, progress: &(dyn Fn(usize) + Sync)) -> anyhow::Result<Purged> {
        let mut purged = Vec::new();
        let mut failed = Vec::new();
        let mut cancelled_by = None;
        for chunk in self.entries.chunks(256) {
            let seqs: Vec<u64> = chunk.iter().map(|e| e.sequence).collect();
            for (seq, removed) in seqs.iter().zip(dlq::remove(&ctx.js, &ctx.topology, &seqs).await) {
                match removed {
                    Ok(()) => purged.push(*seq as i64),
                    Err(err) => failed.push(serde_json::json!({"sequence": seq, "error": format!("{err:#}")})),
                }
            }
            progress(chunk.len());
            if let Some(by) = dlq_audit::progress(&ctx.pool, self.id, (purged.len() + failed.len()) as i32).await? {
                cancelled_by = Some(by);
                break;
            }
        }
        dlq_audit::unpark(&ctx.pool, &purged).await?;
        let status = match (&cancelled_by, failed.is_empty()) {
            (Some(_), _) => "cancelled",
            (None, true) => "completed",
            (None, false) => "failed",
        };
        self.finish(
            ctx,
            status,
            serde_json::json!({"purged": purged.len(), "failed": failed, "cancelled_by": cancelled_by}),
        )
        .await?;
        Ok(Purged { audit_id: self.id, purged: purged.len(), failed: failed.len(), cancelled_by })
    }

    /// Parks the dead letters: they stay in the DLQ and no replay or purge by filter takes them
    /// until they are unparked.
    pub async fn park(self, ctx: &Ctx) -> anyhow::Result<u64> {
        let letters: Vec<Parked> = self
            .entries
            .iter()
            .map(|e| Parked { sequence: e.sequence as i64, msg_id: letter_id(e), consumer: e.consumer().to_owned() })
            .collect();
        let parked = dlq_audit::park(&ctx.pool, &letters, self.id).await?;
        dlq_audit::progress(&ctx.pool, self.id, letters.len() as i32).await?;
        self.finish(ctx, "completed", serde_json::json!({"parked": parked})).await?;
        Ok(parked)
    }

    /// Unparks the dead letters: they are replayable again.
    pub async fn unpark(self, ctx: &Ctx) -> anyhow::Result<u64> {
        let seqs: Vec<i64> = self.entries.iter().map(|e| e.sequence as i64).collect();
        let unparked = dlq_audit::unpark(&ctx.pool, &seqs).await?;
        dlq_audit::progress(&ctx.pool, self.id, seqs.len() as i32).await?;
        self.finish(ctx, "completed", serde_json::json!({"unparked": unparked})).await?;
        Ok(unparked)
    }
}

/// How a replay goes.
#[derive(Debug, Clone)]
pub struct ReplayPlan {
    /// At most this many messages per second.
    pub rate: Option<f64>,
    /// Send this many first, wait for their outcome, and go on only if none died again.
    pub canary: Option<usize>,
    /// How long to wait for the canaries' outcome.
    pub canary_timeout: Duration,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replayed {
    pub audit_id: Uuid,
    pub replayed: usize,
    pub failed: Vec<(u64, String)>,
    /// How many canaries came back to the DLQ (the replay stopped before the rest).
    pub canary_died: Option<usize>,
    /// How many canaries were processed without dying again (the rest then went).
    pub canaries_passed: Option<usize>,
    pub cancelled: bool,
    pub cancelled_by: Option<String>,
    pub warnings: Vec<String>,
}

impl Replayed {
    pub fn status(&self) -> &'static str {
        if self.canary_died.is_some() {
            "stopped"
        } else if self.cancelled {
            "cancelled"
        } else if self.failed.is_empty() {
            "completed"
        } else {
            "failed"
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "replayed": self.replayed,
            "failed": self.failed.iter().map(|(s, e)| serde_json::json!({"sequence": s, "error": e})).collect::<Vec<_>>(),
            "canary_died": self.canary_died,
            "canaries_passed": self.canaries_passed,
            "cancelled_by": self.cancelled_by,
            "warnings": self.warnings,
        })
    }
}

/// What a purge did.
#[derive(Debug)]
pub struct Purged {
    pub audit_id: Uuid,
    pub purged: usize,
    pub failed: usize,
    pub cancelled_by: Option<String>,
}

/// Waits until the consumers have settled every canary (acked, or dead-lettered again), then
/// counts those back in the DLQ under this replay's audit id.
async fn wait_for_canaries(
    ctx: &Ctx,
    canaries: &[Entry],
    replay_seqs: &[u64],
    audit_id: &str,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + timeout;
    let last = replay_seqs.iter().copied().max().unwrap_or(0);
    let mut consumers: Vec<&str> = canaries.iter().map(Entry::consumer).collect();
    consumers.sort_unstable();
    consumers.dedup();
    let stream = ctx.js.get_stream(ctx.topology.replay_stream()).await?;
    loop {
        let mut settled = true;
        for c in &consumers {
            let mut consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> = stream
                .get_consumer(&ctx.topology.name(c))
                .await
                .map_err(|e| anyhow::anyhow!("no replay consumer for {c} ({e}): is the worker running?"))?;
            let info = consumer.info().await?;
            // Every canary is settled once the consumer's ack floor has passed the last one.
            if info.ack_floor.stream_sequence < last && info.num_pending + info.num_ack_pending as u64 > 0 {
                settled = false;
            }
        }
        if settled {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the canaries were not processed within {timeout:?}: is the worker running?");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let back = dlq::read(&ctx.js, &ctx.topology, None, 1).await?;
    Ok(back.iter().filter(|e| e.header(dlq::REPLAY_AUDIT_ID) == Some(audit_id)).count())
}
