//! `trellisctl dlq`: see what died and why, and bring it back.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use trellis_domain::events::{Envelope, EventPayload};
use trellis_runtime::dlq::{self, Entry};
use trellis_runtime::nats::Topology;

use crate::Output;

/// Which dead letters a command acts on.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize)]
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
    /// Dead-lettered at or after this time (RFC 3339, or a duration ago such as `2h`).
    #[arg(long, value_parser = parse_time)]
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// Dead-lettered before this time (RFC 3339, or a duration ago).
    #[arg(long, value_parser = parse_time)]
    #[serde(with = "time::serde::rfc3339::option")]
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
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.consumer.is_none() && self.is_consumer_only()
    }

    /// Nothing but (at most) a consumer: the selection has no gaps within a consumer.
    fn is_consumer_only(&self) -> bool {
        self.kind.is_none()
            && self.grep.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.from_seq.is_none()
            && self.to_seq.is_none()
            && self.fingerprint.is_none()
    }

    fn matches(&self, e: &Entry) -> bool {
        self.kind.as_deref().is_none_or(|k| e.kind() == k)
            && self.grep.as_deref().is_none_or(|g| e.error().contains(g))
            && self.since.is_none_or(|t| e.time >= t)
            && self.until.is_none_or(|t| e.time < t)
            && self.to_seq.is_none_or(|s| e.sequence <= s)
            && self.fingerprint.as_deref().is_none_or(|f| e.fingerprint() == f)
            && self.consumer.as_deref().is_none_or(|c| e.consumer() == c)
    }
}

pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .map(|d| OffsetDateTime::now_utc() - d)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration such as 2h"))
}

#[derive(Debug, clap::Subcommand)]
pub enum Dlq {
    /// Lists dead letters.
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many (newest last).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Shows one dead letter: the trace id of the failed delivery, every header, what its
    /// payload says as an event (or why it does not decode), and the payload.
    Show { sequence: u64 },
    /// Groups dead letters by consumer and error fingerprint: the triage view.
    Stats {
        #[command(flatten)]
        filter: Filter,
    },
    /// Sends dead letters back to the one consumer that failed them.
    Replay {
        #[command(flatten)]
        selection: Selection,
        /// Show what would move; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Send this many first, wait for their outcome, and go on only if none died again.
        #[arg(long)]
        canary: Option<usize>,
        /// How long to wait for the canaries' outcome.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        canary_timeout: Duration,
    },
    /// Deletes dead letters for good.
    Purge {
        #[command(flatten)]
        selection: Selection,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

/// What `replay` and `purge` act on, and the audit's who and why.
#[derive(Debug, Clone, clap::Args)]
pub struct Selection {
    /// DLQ sequences (or use filters, or --all).
    pub sequences: Vec<u64>,
    #[command(flatten)]
    pub filter: Filter,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Why (recorded in the audit).
    #[arg(long)]
    pub reason: Option<String>,
    /// Who is acting (default: $USER).
    #[arg(long, env = "TRELLIS_ACTOR")]
    pub actor: Option<String>,
}

impl Selection {
    /// The given reason, if it says something.
    fn reason(&self) -> Option<&str> {
        self.reason.as_deref().filter(|r| !r.trim().is_empty())
    }

    fn actor(&self) -> String {
        crate::actor(self.actor.clone())
    }
}

pub struct Ctx {
    pub js: jetstream::Context,
    pub topology: Topology,
    pub pool: sqlx::PgPool,
    pub output: Output,
}

pub async fn run(ctx: &Ctx, command: Dlq) -> anyhow::Result<()> {
    match command {
        Dlq::List { filter, limit } => list(ctx, &filter, limit).await,
        Dlq::Show { sequence } => show(ctx, sequence).await,
        Dlq::Stats { filter } => stats(ctx, &filter).await,
        Dlq::Replay { selection, dry_run, rate, canary, canary_timeout } => {
            let reason = match (selection.reason(), dry_run) {
                (Some(r), _) => r.to_owned(),
                (None, true) => String::new(),
                (None, false) => bail!("--reason is required: say why these messages are replayed"),
            };
            let entries = select(ctx, &selection).await?;
            // Everything a consumer has, from its first dead letter on: windows can then leave
            // the DLQ with one purge each instead of a request per message.
            let whole_consumers = selection.sequences.is_empty() && selection.filter.is_consumer_only();
            let plan =
                Replay { reason, dry_run, rate, canary, canary_timeout, actor: selection.actor(), whole_consumers };
            replay(ctx, entries, &selection, plan).await
        }
        Dlq::Purge { selection, yes } => {
            if !yes {
                bail!("purging deletes dead letters for good: add --yes to confirm");
            }
            let Some(reason) = selection.reason() else {
                bail!("--reason is required: say why these messages are purged");
            };
            let entries = select(ctx, &selection).await?;
            purge(ctx, entries, &selection, reason).await
        }
    }
}

async fn read(ctx: &Ctx, filter: &Filter) -> anyhow::Result<Vec<Entry>> {
    let entries = dlq::read(&ctx.js, &ctx.topology, filter.consumer.as_deref(), filter.from_seq.unwrap_or(1))
        .await
        .context("reading the DLQ")?;
    Ok(entries.into_iter().filter(|e| filter.matches(e)).collect())
}

async fn select(ctx: &Ctx, selection: &Selection) -> anyhow::Result<Vec<Entry>> {
    let Selection { sequences, filter, all, .. } = selection;
    if sequences.is_empty() && filter.is_empty() && !*all {
        bail!("nothing selected: give sequences, filters (see --help) or --all");
    }
    if !sequences.is_empty() {
        let mut out = Vec::with_capacity(sequences.len());
        for &seq in sequences {
            let entry = dlq::get(&ctx.js, &ctx.topology, seq).await.with_context(|| format!("no dead letter {seq}"))?;
            if filter.matches(&entry) {
                out.push(entry);
            }
        }
        return Ok(out);
    }
    read(ctx, filter).await
}

fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn entry_json(e: &Entry) -> serde_json::Value {
    let headers: BTreeMap<String, String> = e
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(", ")))
        .collect();
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

/// What a dead letter's payload is as an event: its type and what it says, or why it does not
/// decode (the reason a consumer could not even look at it).
fn event_of(payload: &[u8]) -> Result<(String, String), String> {
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

async fn list(ctx: &Ctx, filter: &Filter, limit: usize) -> anyhow::Result<()> {
    let entries = read(ctx, filter).await?;
    let shown = &entries[entries.len().saturating_sub(limit)..];
    match ctx.output {
        Output::Json => {
            println!("{}", serde_json::to_string_pretty(&shown.iter().map(entry_json).collect::<Vec<_>>())?)
        }
        Output::Table => {
            println!(
                "{:<8} {:<20} {:<20} {:<15} {:<7} {:<40} ERROR",
                "SEQ", "TIME", "CONSUMER", "KIND", "REPLAYS", "SUBJECT"
            );
            for e in shown {
                let t = e
                    .time
                    .format(&time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"))?;
                println!(
                    "{:<8} {:<20} {:<20} {:<15} {:<7} {:<40} {}",
                    e.sequence,
                    t,
                    e.consumer(),
                    e.kind(),
                    e.replays(),
                    e.original_subject(),
                    e.error()
                );
            }
            println!("{} of {} dead letters", shown.len(), entries.len());
        }
    }
    Ok(())
}

async fn show(ctx: &Ctx, sequence: u64) -> anyhow::Result<()> {
    let e = dlq::get(&ctx.js, &ctx.topology, sequence).await.with_context(|| format!("no dead letter {sequence}"))?;
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&entry_json(&e))?),
        Output::Table => {
            println!("sequence: {}\nsubject:  {}\ntime:     {}", e.sequence, e.subject, time_text(e.time));
            println!("trace:    {}\n", e.trace_id().as_deref().unwrap_or("(none)"));
            let mut headers: Vec<(String, String)> = e
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(", ")))
                .collect();
            headers.sort();
            for (k, v) in headers {
                println!("{k}: {v}");
            }
            println!();
            match event_of(&e.payload) {
                Ok((event_type, what)) => println!("event: {event_type}: {what}\n"),
                Err(why) => println!("event: does not decode: {why}\n"),
            }
            match serde_json::from_slice::<serde_json::Value>(&e.payload) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
                Err(_) => println!("{}", String::from_utf8_lossy(&e.payload)),
            }
        }
    }
    Ok(())
}

async fn stats(ctx: &Ctx, filter: &Filter) -> anyhow::Result<()> {
    struct Group {
        count: u64,
        first: OffsetDateTime,
        last: OffsetDateTime,
    }
    let entries = read(ctx, filter).await?;
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    for e in &entries {
        let g = groups.entry((e.consumer().to_owned(), e.fingerprint())).or_insert(Group {
            count: 0,
            first: e.time,
            last: e.time,
        });
        g.count += 1;
        g.first = g.first.min(e.time);
        g.last = g.last.max(e.time);
    }
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1.count));
    match ctx.output {
        Output::Json => {
            let json: Vec<_> = rows
                .iter()
                .map(|((consumer, fingerprint), g)| {
                    serde_json::json!({"consumer": consumer, "fingerprint": fingerprint, "count": g.count,
                        "first_seen": time_text(g.first), "last_seen": time_text(g.last)})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Output::Table => {
            println!("{:<20} {:>7} {:<25} {:<25} FINGERPRINT", "CONSUMER", "COUNT", "FIRST SEEN", "LAST SEEN");
            for ((consumer, fingerprint), g) in &rows {
                println!(
                    "{consumer:<20} {:>7} {:<25} {:<25} {fingerprint}",
                    g.count,
                    time_text(g.first),
                    time_text(g.last)
                );
            }
            println!("{} dead letters in {} groups", entries.len(), rows.len());
        }
    }
    Ok(())
}

struct Replay {
    reason: String,
    dry_run: bool,
    rate: Option<f64>,
    canary: Option<usize>,
    canary_timeout: Duration,
    actor: String,
    /// The selection is every dead letter of its consumers (no gaps), so a replayed window can
    /// leave the DLQ with one purge per consumer.
    whole_consumers: bool,
}

async fn replay(ctx: &Ctx, entries: Vec<Entry>, selection: &Selection, plan: Replay) -> anyhow::Result<()> {
    if plan.dry_run {
        println!("dry run: {} dead letters would be replayed", entries.len());
        for e in &entries {
            println!(
                "  {} → replay.{}.{} (replays so far: {})",
                e.sequence,
                e.consumer(),
                e.original_subject(),
                e.replays()
            );
        }
        return Ok(());
    }
    if entries.is_empty() {
        println!("nothing to replay");
        return Ok(());
    }
    let audit_id = uuid::Uuid::now_v7();
    let seqs: Vec<i64> = entries.iter().map(|e| e.sequence as i64).collect();
    trellis_store::dlq_audit::start(
        &ctx.pool,
        &trellis_store::dlq_audit::NewAudit {
            id: audit_id,
            action: "replay",
            actor: &plan.actor,
            reason: &plan.reason,
            selection: serde_json::json!({
                "sequences": selection.sequences, "filter": selection.filter, "all": selection.all,
                "rate": plan.rate, "canary": plan.canary,
            }),
            sequences: &seqs,
            dry_run: false,
        },
    )
    .await
    .context("writing the audit row")?;
    let result = replay_audited(ctx, &entries, &plan, &audit_id.to_string()).await;
    let (status, outcome) = match &result {
        Ok(r) => (r.status(), r.json()),
        Err(e) => ("failed", serde_json::json!({"error": format!("{e:#}")})),
    };
    trellis_store::dlq_audit::finish(&ctx.pool, audit_id, status, outcome).await.context("finishing the audit row")?;
    let r = result?;
    println!("audit {audit_id}: replayed {}, failed {}", r.replayed, r.failed.len());
    for (seq, e) in &r.failed {
        eprintln!("  {seq}: {e}");
    }
    if let Some(died) = r.canary_died {
        bail!(
            "the canary died again ({died} of {} canaries are back in the DLQ); stopped before the rest",
            plan.canary.unwrap_or(0)
        );
    }
    if !r.failed.is_empty() {
        bail!("{} dead letters could not be replayed (they are still in the DLQ)", r.failed.len());
    }
    Ok(())
}

#[derive(Default)]
struct ReplayResult {
    replayed: usize,
    failed: Vec<(u64, String)>,
    canary_died: Option<usize>,
}

impl ReplayResult {
    fn status(&self) -> &'static str {
        if self.canary_died.is_some() {
            "stopped"
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
        })
    }
}

async fn replay_audited(ctx: &Ctx, entries: &[Entry], plan: &Replay, audit_id: &str) -> anyhow::Result<ReplayResult> {
    let mut result = ReplayResult::default();
    let bar = progress(entries.len());
    let (canaries, rest) = entries.split_at(plan.canary.unwrap_or(0).min(entries.len()));
    if !canaries.is_empty() {
        let replay_seqs = send(ctx, canaries, plan, audit_id, &mut result, &bar).await;
        let died = wait_for_canaries(ctx, canaries, &replay_seqs, audit_id, plan.canary_timeout).await?;
        if died > 0 {
            result.canary_died = Some(died);
            bar.abandon();
            return Ok(result);
        }
    }
    send(ctx, rest, plan, audit_id, &mut result, &bar).await;
    bar.finish_and_clear();
    Ok(result)
}

fn progress(len: usize) -> indicatif::ProgressBar {
    // Only long replays get a bar, and only on a terminal.
    if len < 1000 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} replayed ({per_sec}, eta {eta})")
            .expect("a valid template"),
    );
    bar
}

/// Replays `entries` in windows (paced by `--rate`); returns the REPLAY sequences it got. A
/// dead letter leaves the DLQ only after its replay was acknowledged.
async fn send(
    ctx: &Ctx,
    entries: &[Entry],
    plan: &Replay,
    audit_id: &str,
    result: &mut ReplayResult,
    bar: &indicatif::ProgressBar,
) -> Vec<u64> {
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
    let mut no_gaps = plan.whole_consumers;
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
                    eprintln!(
                        "warning: replayed dead letters of {consumer} through {through} could not be removed: {e:#}"
                    );
                }
            }
        } else {
            let seqs: Vec<u64> = acked.iter().map(|e| e.sequence).collect();
            for (seq, removed) in seqs.iter().zip(dlq::remove(&ctx.js, &ctx.topology, &seqs).await) {
                if let Err(e) = removed {
                    eprintln!("warning: replayed dead letter {seq} could not be removed from the DLQ: {e:#}");
                }
            }
        }
        result.replayed += acked.len();
        sent += chunk.len();
        bar.inc(chunk.len() as u64);
    }
    replay_seqs
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

async fn purge(ctx: &Ctx, entries: Vec<Entry>, selection: &Selection, reason: &str) -> anyhow::Result<()> {
    let actor = &selection.actor();
    let audit_id = uuid::Uuid::now_v7();
    let seqs: Vec<i64> = entries.iter().map(|e| e.sequence as i64).collect();
    trellis_store::dlq_audit::start(
        &ctx.pool,
        &trellis_store::dlq_audit::NewAudit {
            id: audit_id,
            action: "purge",
            actor,
            reason,
            selection: serde_json::json!({
                "sequences": selection.sequences, "filter": selection.filter, "all": selection.all,
            }),
            sequences: &seqs,
            dry_run: false,
        },
    )
    .await
    .context("writing the audit row")?;
    let mut purged = 0;
    let mut failed = Vec::new();
    for e in &entries {
        match dlq::purge(&ctx.js, &ctx.topology, e.sequence).await {
            Ok(()) => purged += 1,
            Err(err) => failed.push(serde_json::json!({"sequence": e.sequence, "error": format!("{err:#}")})),
        }
    }
    let status = if failed.is_empty() { "completed" } else { "failed" };
    trellis_store::dlq_audit::finish(
        &ctx.pool,
        audit_id,
        status,
        serde_json::json!({"purged": purged, "failed": failed}),
    )
    .await?;
    println!("audit {audit_id}: purged {purged}, failed {}", failed.len());
    if !failed.is_empty() {
        bail!("{} dead letters could not be purged", failed.len());
    }
    Ok(())
}
