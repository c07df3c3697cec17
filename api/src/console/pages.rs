//! The console's pages and actions.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use maud::{Markup, html};
use time::OffsetDateTime;
use trellis_commands::disputes::{ModerateError, Moderator};
use trellis_domain::DisputeId;
use trellis_domain::disputes::{DisputeStatus, Priority, Verdict};
use trellis_domain::flags::{Executor, Flag};
use trellis_domain::identity::Role;
use trellis_ops::dlq::{self as ops, Action, Actor, Audited, Filter, ReplayPlan, Selection};
use trellis_runtime::dlq::{self as runtime_dlq, Entry};
use trellis_store::cutover::flags::{Change, SetError};
use trellis_store::disputes::QueueViewer;
use uuid::Uuid;

use super::session::FormPost;
use super::{ConsoleState, Fields, PageError, PageResult, Section, Session, layout, page, see_other};

/// Most rows a list shows (the counts and groups cover everything).
pub const LIST_LIMIT: usize = 200;

fn when(t: OffsetDateTime) -> String {
    t.format(&time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z")).unwrap_or_default()
}

fn ago(t: OffsetDateTime) -> String {
    let secs = (OffsetDateTime::now_utc() - t).whole_seconds().max(0) as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The consumers of each processor, by the flag that says where it runs.
fn processors() -> Vec<(Flag, Vec<String>)> {
    vec![
        (Flag::SearchExecutor, vec![search_projector::CONSUMER.to_owned()]),
        (Flag::ScoreExecutor, vec![score_orchestrator::CONSUMER.to_owned()]),
        (Flag::DisputeExecutor, Priority::ALL.iter().map(|p| dispute_processor::consumer_name(*p)).collect()),
    ]
}

fn consumers() -> Vec<String> {
    processors().into_iter().flat_map(|(_, c)| c).collect()
}

fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

// ----- overview -----

struct ConsumerRow {
    name: String,
    pending: Option<u64>,
    ack_pending: Option<usize>,
    waiting: Option<usize>,
    oldest: Option<OffsetDateTime>,
    dead_letters: Option<u64>,
    error: Option<String>,
}

/// Dead letters per consumer, from one look at the DLQ stream's subjects.
async fn dead_letters_per_consumer(ctx: &ops::Ctx) -> anyhow::Result<BTreeMap<String, u64>> {
    use futures::TryStreamExt as _;
    let stream = ctx.js.get_stream(ctx.topology.dlq_stream()).await?;
    let prefix = ctx.topology.subject("dlq.");
    let subjects: Vec<(String, usize)> =
        stream.info_with_subjects(ctx.topology.subject("dlq.>")).await?.try_collect().await?;
    Ok(subjects
        .into_iter()
        .filter_map(|(subject, n)| Some((subject.strip_prefix(&prefix)?.to_owned(), n as u64)))
        .collect())
}

async fn consumer_row(
    events: Option<&async_nats::jetstream::stream::Stream>,
    topology: &trellis_runtime::nats::Topology,
    dead_letters: Option<&BTreeMap<String, u64>>,
    name: &str,
) -> ConsumerRow {
    let mut row = ConsumerRow {
        name: name.to_owned(),
        pending: None,
        ack_pending: None,
        waiting: None,
        oldest: None,
        dead_letters: dead_letters.map(|d| d.get(name).copied().unwrap_or(0)),
        error: None,
    };
    let info = async {
        let stream = events.ok_or_else(|| anyhow::anyhow!("the events stream is unavailable"))?;
        let mut consumer: async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config> =
            stream.get_consumer(&topology.name(name)).await.map_err(|e| anyhow::anyhow!(e))?;
        let info = consumer.info().await?.clone();
        // The first message after the ack floor: the oldest this consumer may still owe.
        let oldest = if info.num_pending + info.num_ack_pending as u64 > 0 {
            stream.get_raw_message(info.ack_floor.stream_sequence + 1).await.ok().map(|m| m.time)
        } else {
            None
        };
        anyhow::Ok((info, oldest))
    };
    match info.await {
        Ok((info, oldest)) => {
            row.pending = Some(info.num_pending);
            row.ack_pending = Some(info.num_ack_pending);
            row.waiting = Some(info.num_waiting);
            row.oldest = oldest;
        }
        Err(e) => row.error = Some(format!("{e:#}")),
    }
    row
}

pub async fn overview(State(state): State<ConsoleState>, session: Session) -> PageResult {
    if !session.role.can_view_operations() && session.role.can_moderate() {
        return see_other("/console/moderation");
    }
    session.require_view()?;
    let flags: BTreeMap<&str, Executor> = trellis_store::cutover::flags::list(&state.app.pool)
        .await?
        .into_iter()
        .map(|f| (f.flag.as_str(), f.value))
        .collect();
    // One look at each stream for every consumer's row.
    let ctx = &state.ops;
    let events = ctx.js.get_stream(ctx.topology.events_stream()).await.ok();
    let dead_letters = dead_letters_per_consumer(ctx).await.ok();
    let mut rows = Vec::new();
    for (flag, names) in processors() {
        let mut consumers = Vec::new();
        for name in &names {
            consumers.push(consumer_row(events.as_ref(), &ctx.topology, dead_letters.as_ref(), name).await);
        }
        rows.push((flag, flags.get(flag.as_str()).copied(), consumers));
    }
    let outbox_pending = trellis_store::outbox::pending_count(&state.app.pool).await?;
    let outbox_age = trellis_store::outbox::oldest_pending_age_seconds(&state.app.pool).await?;
    let latest_run = trellis_store::scores::latest_run(&state.app.pool).await?;
    let mut charts = Vec::new();
    for (_, names) in processors() {
        let points = match &state.app.config.prometheus_url {
            Some(url) => super::rates::from_prometheus(url, &names).await.map_err(|e| format!("{e:#}")),
            None => Ok(state.sampler.series(&names)),
        };
        charts.push(points);
    }
    let triggers = state.triggers().await;
    let replicas: BTreeMap<String, u32> = match &state.app.config.prometheus_url {
        Some(url) => super::rates::replicas_from_prometheus(url).await.unwrap_or_default().into_iter().collect(),
        None => consumers().into_iter().filter_map(|c| state.sampler.replicas(&c).map(|n| (c, n))).collect(),
    };
    let body = html! {
        div id="overview" data-refresh="5" {
            h1 { "Overview" }
            p.muted { "As of " (when(OffsetDateTime::now_utc())) "; refreshes every 5 s." }
            h2 { "Processors" }
            table {
                caption.muted { "Each processor's executor and consumer groups on the events stream" }
                thead { tr {
                    th scope="col" { "Processor (flag), last hour" } th scope="col" { "Executor" } th scope="col" { "Consumer" }
                    th.num scope="col" { "Pending" } th.num scope="col" { "Ack pending" }
                    th.num scope="col" { "Replicas pulling" } th.num scope="col" { "Waiting pull requests" } th scope="col" { "Oldest owed message" }
                    th.num scope="col" { "Dead letters" }
                } }
                tbody {
                    @for ((flag, executor, consumers), chart) in rows.iter().zip(&charts) {
                        @for (i, c) in consumers.iter().enumerate() {
                            tr {
                                @if i == 0 {
                                    td rowspan=(consumers.len()) {
                                        code { (flag.as_str()) } br;
                                        @match chart {
                                            Ok(points) => (super::rates::chart(points)),
                                            Err(e) => span.muted { "no throughput: " (e) },
                                        }
                                    }
                                    td rowspan=(consumers.len()) { (executor.map(Executor::as_str).unwrap_or("unknown")) }
                                }
                                td { code { (c.name) } }
                                @if let Some(e) = &c.error {
                                    td colspan="5" { span.status-bad { "unavailable: " } (e) " (see docs/runbooks/scale-worker.md)" }
                                } @else {
                                    td.num { (c.pending.unwrap_or(0)) }
                                    td.num { (c.ack_pending.unwrap_or(0)) }
                                    td.num { @match replicas.get(&c.name) { Some(n) => (n), None => span.muted { "?" } } }
                                    td.num { (c.waiting.unwrap_or(0)) }
                                    td { @match c.oldest { Some(t) => { (ago(t)) " ago" }, None => { "none" } } }
                                }
                                td.num {
                                    @match c.dead_letters {
                                        Some(0) => span.status-ok { "0" },
                                        Some(n) => a.status-bad href={"/console/dead-letters?consumer=" (c.name)} { (n) },
                                        None => "?",
                                    }
                                }
                            }
                        }
                    }
                }
            }
            p.muted { "Dead letters above zero: docs/runbooks/replay-dlq.md. A backlog that grows: docs/runbooks/scale-worker.md." }
            h2 { "Stage triggers" }
            @match &triggers {
                Err(e) => p.notice.bad { "The stage triggers could not be read: " (e) },
                Ok(readings) => table {
                    caption.muted { "The migration guide's triggers for the next stage (docs/runbooks/stage-trigger-review.md)" }
                    thead { tr { th scope="col" { "Stage" } th scope="col" { "Metric" } th scope="col" { "Threshold" }
                        th scope="col" { "Now" } th scope="col" { "Met" } th scope="col" { "Note" } } }
                    tbody { @for r in readings {
                        @let unit = trellis_domain::stage::TRIGGERS.iter().find(|t| t.alert == r.alert).map(|t| t.unit);
                        tr {
                            td { (r.transition) } td { code { (r.metric) } }
                            td { "> " (unit.map(|u| trellis_ops::triggers::show(u, r.threshold)).unwrap_or_default()) }
                            td { (r.value.zip(unit).map(|(v, u)| trellis_ops::triggers::show(u, v)).unwrap_or_else(|| "–".into())) }
                            td { @if r.met { span.status-bad { "met" } } @else { span.status-ok { "not met" } } }
                            td { (r.note.clone().unwrap_or_default()) }
                        }
                    } }
                },
            }
            h2 { "Outbox" }
            p {
                @if outbox_pending == 0 { span.status-ok { "Every event is relayed." } }
                @else {
                    span.status-warn { (outbox_pending) " events wait for the relay" }
                    ", the oldest for " (humantime::format_duration(Duration::from_secs(outbox_age.max(0.0) as u64)))
                    " (docs/runbooks/nats-node-lost.md when it grows)."
                }
            }
            h2 { "Latest score run" }
            @match &latest_run {
                Some(run) => p { (run.status.as_str()) ", created " (ago(run.created_at)) " ago. " a href="/console/score-runs" { "All runs" } },
                None => p { "No run yet. " a href="/console/score-runs" { "Score runs" } },
            }
        }
    };
    page(layout(Some(&session), Some(Section::Overview), "Overview", true, body))
}

// ----- dead letters -----

/// The filter of a query string or form (the names of the filter form's fields).
fn filter_of(fields: &Fields) -> Result<Filter, PageError> {
    let time = |name: &str| {
        fields.get(name).map(ops::parse_time).transpose().map_err(|e| PageError::BadRequest(format!("{name}: {e}")))
    };
    Ok(Filter {
        consumer: fields.get("consumer").map(str::to_owned),
        kind: fields.get("kind").map(str::to_owned),
        grep: fields.get("grep").map(str::to_owned),
        subject: fields.get("subject").map(str::to_owned),
        since: time("since")?,
        until: time("until")?,
        from_seq: None,
        to_seq: None,
        fingerprint: fields.get("fingerprint").map(str::to_owned),
        parked: fields.get("parked").is_some(),
    })
}

/// The filter as hidden fields, so that a form acts on the same selection.
fn filter_fields(fields: &Fields) -> Markup {
    html! {
        @for name in ["consumer", "kind", "grep", "subject", "since", "until", "fingerprint", "parked"] {
            @if let Some(v) = fields.get(name) { input type="hidden" name=(name) value=(v); }
        }
    }
}

fn filter_query(pairs: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    q.finish()
}

fn filter_form(fields: &Fields) -> Markup {
    let value = |name: &str| fields.get(name).unwrap_or("").to_owned();
    html! {
        form method="get" action="/console/dead-letters" {
            fieldset {
                legend { "Filter" }
                label { "Consumer " select name="consumer" {
                    option value="" { "any" }
                    @for c in consumers() { option value=(c) selected[fields.get("consumer") == Some(c.as_str())] { (c) } }
                } }
                label { "Kind " select name="kind" {
                    option value="" { "any" }
                    @for k in ["decode", "transient", "permanent", "max_deliveries"] {
                        option value=(k) selected[fields.get("kind") == Some(k)] { (k) }
                    }
                } }
                label { "Fingerprint " input type="text" name="fingerprint" size="40" value=(value("fingerprint")); }
                label { "Subject contains " input type="text" name="subject" value=(value("subject")); }
                label { "Error contains " input type="text" name="grep" value=(value("grep")); }
                label { "Since " input type="text" name="since" placeholder="2h or RFC 3339" value=(value("since")); }
                label { "Until " input type="text" name="until" placeholder="RFC 3339" value=(value("until")); }
                label { input type="checkbox" name="parked" value="1" checked[fields.get("parked").is_some()]; " Parked ones" }
                button type="submit" { "Apply" }
                " " a href="/console/dead-letters" { "Clear" }
            }
        }
    }
}

pub async fn dead_letters(
    State(state): State<ConsoleState>,
    session: Session,
    RawQuery(query): RawQuery,
) -> PageResult {
    session.require_view()?;
    let fields = Fields::parse(query.unwrap_or_default().as_bytes());
    let filter = filter_of(&fields)?;
    let entries = ops::read_snapshot(&state.ops, &state.dead_letters, &filter).await?;
    let groups = ops::groups(entries.iter().map(|e| e.as_ref()));
    let shown: Vec<&Entry> = entries.iter().rev().take(LIST_LIMIT).map(|e| e.as_ref()).collect();
    let may_act = session.role.can_operate();
    let parked = filter.parked;
    let body = html! {
        h1 { "Dead letters" }
        (filter_form(&fields))
        p { strong { (entries.len()) } @if parked { " parked" } " dead letters match." }
        h2 { "By fingerprint" }
        table {
            thead { tr { th scope="col" { "Consumer" } th.num scope="col" { "Count" } th scope="col" { "Fingerprint" }
                th scope="col" { "First seen" } th scope="col" { "Last seen" } } }
            tbody {
                @for g in &groups {
                    tr {
                        td { code { (g.consumer) } }
                        td.num { (g.count) }
                        td { a href={"/console/dead-letters?" (filter_query(&[("consumer", &g.consumer), ("fingerprint", &g.fingerprint)]))} { (g.fingerprint) } }
                        td { (when(g.first_seen)) }
                        td { (when(g.last_seen)) }
                    }
                }
            }
        }
        h2 { "Newest " (shown.len()) }
        form method="post" action="/console/dead-letters/confirm" {
            (csrf(&session))
            (filter_fields(&fields))
            table {
                thead { tr {
                    @if may_act { th scope="col" { input type="checkbox" id="select-all" data-select-all="seq" aria-label="Select every dead letter shown"; } }
                    th.num scope="col" { "Sequence" } th scope="col" { "Time" } th scope="col" { "Consumer" } th scope="col" { "Kind" }
                    th.num scope="col" { "Replays" } th scope="col" { "Subject" } th scope="col" { "Error" }
                } }
                tbody {
                    @for e in &shown {
                        tr {
                            @if may_act { td { input type="checkbox" name="seq" value=(e.sequence) aria-label={"Select dead letter " (e.sequence)}; } }
                            td.num { a href={"/console/dead-letters/" (e.sequence)} { (e.sequence) } }
                            td { (when(e.time)) }
                            td { code { (e.consumer()) } }
                            td { (e.kind()) }
                            td.num { (e.replays()) }
                            td { code { (e.original_subject()) } }
                            td { (e.error()) }
                        }
                    }
                }
            }
            @if may_act && !entries.is_empty() {
                fieldset {
                    legend { "Act on the selected ones, or on all " (entries.len()) " matching the filter" }
                    @if parked {
                        button type="submit" name="intent" value="unpark:selected" { "Unpark selected" } " "
                        button type="submit" name="intent" value="unpark:matching" { "Unpark all " (entries.len()) " matching" } " "
                    } @else {
                        button.primary type="submit" name="intent" value="replay:selected" { "Replay selected" } " "
                        button.primary type="submit" name="intent" value="replay:matching" { "Replay all " (entries.len()) " matching" } " "
                        button type="submit" name="intent" value="park:selected" { "Park selected" } " "
                        button type="submit" name="intent" value="park:matching" { "Park all " (entries.len()) " matching" } " "
                    }
                    button.danger type="submit" name="intent" value="purge:selected" { "Purge selected" } " "
                    button.danger type="submit" name="intent" value="purge:matching" { "Purge all " (entries.len()) " matching" }
                }
            }
        }
        h2 { "Recent actions" }
        (recent_actions(&state).await?)
    };
    page(layout(Some(&session), Some(Section::DeadLetters), "Dead letters", false, body))
}

async fn recent_actions(state: &ConsoleState) -> Result<Markup, PageError> {
    let rows = trellis_store::dlq_audit::recent(&state.app.pool, 10).await?;
    Ok(html! {
        table {
            thead { tr { th scope="col" { "Started" } th scope="col" { "Action" } th scope="col" { "By" } th scope="col" { "Reason" }
                th.num scope="col" { "Dead letters" } th scope="col" { "Status" } } }
            tbody {
                @for a in &rows {
                    tr {
                        td { a href={"/console/dead-letters/actions/" (a.id)} { (when(a.started_at)) } }
                        td { (a.action) } td { (a.actor) } td { (a.reason) }
                        td.num { (a.sequences.len()) } td { (a.status) }
                    }
                }
            }
        }
    })
}

pub async fn dead_letter(State(state): State<ConsoleState>, session: Session, Path(sequence): Path<u64>) -> PageResult {
    session.require_view()?;
    let e = ops::get(&state.ops, sequence).await.map_err(|_| PageError::NotFound("no such dead letter"))?;
    let parked = ops::is_parked(&state.ops, &e).await?;
    let history = runtime_dlq::history(Some(&e.headers));
    let actions = trellis_store::dlq_audit::of_sequence(&state.app.pool, sequence as i64).await?;
    let event = ops::event_of(&e.payload);
    let body = html! {
        h1 { "Dead letter " (e.sequence) }
        dl {
            dt { "Consumer" } dd { code { (e.consumer()) } }
            dt { "Original subject" } dd { code { (e.original_subject()) } }
            dt { "Dead-lettered" } dd { (when(e.time)) }
            dt { "Error" } dd { (e.kind()) ": " (e.error()) }
            dt { "Fingerprint" } dd { a href={"/console/dead-letters?" (filter_query(&[("fingerprint", e.fingerprint())]))} { (e.fingerprint()) } }
            dt { "Trace" } dd { code { (e.trace_id().unwrap_or_else(|| "none".into())) } }
            dt { "Parked" } dd { (if parked { "yes: out of every replay until unparked" } else { "no" }) }
            dt { "As an event" } dd { @match &event { Ok((t, says)) => { code { (t) } ": " (says) }, Err(why) => { "does not decode: " (why) } } }
        }
        @if session.role.can_operate() {
            form method="post" action="/console/dead-letters/confirm" {
                (csrf(&session))
                input type="hidden" name="seq" value=(e.sequence);
                @if parked {
                    input type="hidden" name="parked" value="1";
                    button type="submit" name="intent" value="unpark:selected" { "Unpark" } " "
                } @else {
                    button.primary type="submit" name="intent" value="replay:selected" { "Replay" } " "
                    button type="submit" name="intent" value="park:selected" { "Park" } " "
                }
                button.danger type="submit" name="intent" value="purge:selected" { "Purge" }
            }
        }
        h2 { "Failure history" }
        table {
            thead { tr { th scope="col" { "At" } th scope="col" { "Consumer" } th scope="col" { "Kind" } th.num scope="col" { "Deliveries" }
                th.num scope="col" { "Replays before" } th scope="col" { "Error" } } }
            tbody { @for f in &history { tr {
                td { (when(f.at)) } td { code { (f.consumer) } } td { (f.kind.as_str()) } td.num { (f.deliveries) } td.num { (f.replays) } td { (f.error) }
            } } }
        }
        h2 { "Actions on it" }
        table {
            thead { tr { th scope="col" { "Started" } th scope="col" { "Action" } th scope="col" { "By" } th scope="col" { "Reason" } th scope="col" { "Status" } } }
            tbody { @for a in &actions { tr {
                td { a href={"/console/dead-letters/actions/" (a.id)} { (when(a.started_at)) } } td { (a.action) } td { (a.actor) } td { (a.reason) } td { (a.status) }
            } } }
        }
        h2 { "Headers" }
        table {
            thead { tr { th scope="col" { "Header" } th scope="col" { "Value" } } }
            tbody { @for (k, v) in ops::headers(&e) { tr { td { code { (k) } } td { code { (v) } } } } }
        }
        h2 { "Payload" }
        pre { (ops::payload_text(&e)) }
    };
    page(layout(Some(&session), Some(Section::DeadLetters), &format!("Dead letter {sequence}"), false, body))
}

/// What a dead-letter form asks for: an action on the checked sequences or on everything the
/// filter matches.
struct Intent {
    action: Action,
    matching: bool,
}

fn intent_of(fields: &Fields) -> Result<Intent, PageError> {
    let raw = fields.get("intent").ok_or_else(|| PageError::BadRequest("no action was chosen".into()))?;
    let (action, scope) = raw.split_once(':').ok_or_else(|| PageError::BadRequest("unknown action".into()))?;
    let action = match action {
        "replay" => Action::Replay,
        "park" => Action::Park,
        "unpark" => Action::Unpark,
        "purge" => Action::Purge,
        _ => return Err(PageError::BadRequest("unknown action".into())),
    };
    let matching = match scope {
        "matching" => true,
        "selected" => false,
        _ => return Err(PageError::BadRequest("unknown scope".into())),
    };
    Ok(Intent { action, matching })
}

fn selection_of(fields: &Fields, intent: &Intent) -> Result<Selection, PageError> {
    let mut filter = filter_of(fields)?;
    if intent.action == Action::Unpark {
        filter.parked = true;
    }
    if intent.matching {
        return Ok(Selection { sequences: Vec::new(), all: true, filter });
    }
    let sequences = fields
        .all("seq")
        .map(|s| s.parse::<u64>().map_err(|_| PageError::BadRequest(format!("{s:?} is not a DLQ sequence"))))
        .collect::<Result<Vec<_>, _>>()?;
    if sequences.is_empty() {
        return Err(PageError::BadRequest("select at least one dead letter, or act on all matching".into()));
    }
    if sequences.len() > 10_000 {
        return Err(PageError::BadRequest("select at most 10,000 dead letters at once; use a filter".into()));
    }
    // Explicit sequences are subject to the parked state only, not to the list's filter.
    let filter = Filter { parked: filter.parked, ..Filter::default() };
    Ok(Selection { sequences, filter, all: false })
}

pub async fn confirm_action(State(state): State<ConsoleState>, form: FormPost) -> PageResult {
    let FormPost { session, fields } = form;
    session.require_operate()?;
    let intent = intent_of(&fields)?;
    let selection = selection_of(&fields, &intent)?;
    let entries = ops::select(&state.ops, &selection).await.map_err(|e| PageError::BadRequest(format!("{e:#}")))?;
    let n = entries.len();
    let verb = intent.action.as_str();
    let body = html! {
        h1 { "Confirm: " (verb) " " (n) " dead letters" }
        @if n == 0 {
            p.notice.bad role="alert" { "Nothing matches any more: there is nothing to " (verb) "." }
            p { a href="/console/dead-letters" { "Back to the dead letters" } }
        } @else {
            p.notice {
                "This will " (verb) " " strong { (n) " dead letters" }
                @if intent.matching { " (everything matching the filter now; if more match when you confirm, nothing is done and you are asked again)" }
                "."
                @if intent.action == Action::Purge { " Purging deletes them for good." }
                @if intent.action == Action::Park { " Parked dead letters stay in the DLQ and no replay takes them until they are unparked." }
            }
            p.muted { "Sequences: " @for e in entries.iter().take(20) { (e.sequence) " " } @if n > 20 { "and " (n - 20) " more" } }
            form method="post" action="/console/dead-letters/act" {
                (csrf(&session))
                (filter_fields(&fields))
                input type="hidden" name="intent" value=(fields.get("intent").unwrap_or(""));
                input type="hidden" name="expected" value=(n);
                @if !intent.matching { @for e in &entries { input type="hidden" name="seq" value=(e.sequence); } }
                p { label for="reason" { "Reason (recorded in the audit)" } br; input id="reason" type="text" name="reason" size="60" required; }
                @if intent.action == Action::Replay {
                    p {
                        label for="canary" { "Canaries first" } " " input id="canary" type="number" name="canary" min="0" value=(if n > 1 { 1 } else { 0 });
                        " " span.muted { "sent first; the rest goes only if none of them dies again" }
                    }
                    p { label for="rate" { "Rate (messages per second, empty for no limit)" } " " input id="rate" type="number" name="rate" min="1" step="any"; }
                }
                @if intent.action == Action::Purge {
                    p { label for="confirm" { "Type " code { "purge " (n) } " to confirm" } br; input id="confirm" type="text" name="confirm" autocomplete="off" required; }
                }
                p {
                    @if intent.action == Action::Purge { button.danger type="submit" { "Purge " (n) " dead letters" } }
                    @else { button.primary type="submit" { (verb) " " (n) " dead letters" } }
                    " " a href="/console/dead-letters" { "Cancel" }
                }
            }
        }
    };
    page(layout(Some(&session), Some(Section::DeadLetters), "Confirm", false, body))
}

pub async fn act(State(state): State<ConsoleState>, form: FormPost) -> PageResult {
    let FormPost { session, fields } = form;
    session.require_operate()?;
    let intent = intent_of(&fields)?;
    let selection = selection_of(&fields, &intent)?;
    let expected: usize = fields
        .get("expected")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| PageError::BadRequest("the confirmed count is missing".into()))?;
    let reason =
        fields.get("reason").ok_or_else(|| PageError::BadRequest("say why (the reason is recorded)".into()))?;
    if reason.chars().count() > 500 {
        return Err(PageError::BadRequest("a reason is at most 500 characters".into()));
    }
    if intent.action == Action::Purge && fields.get("confirm") != Some(format!("purge {expected}").as_str()) {
        return Err(PageError::BadRequest(format!("type \"purge {expected}\" to confirm the purge")));
    }
    let entries = ops::select(&state.ops, &selection).await.map_err(|e| PageError::BadRequest(format!("{e:#}")))?;
    if entries.is_empty() {
        return Err(PageError::Conflict("nothing is left to act on".into()));
    }
    if entries.len() > expected {
        return Err(PageError::Conflict(format!(
            "{} dead letters match now, more than the {expected} you confirmed: go back and confirm again",
            entries.len()
        )));
    }
    let plan = if intent.action == Action::Replay {
        let canary = match fields.get("canary") {
            None => None,
            Some(c) => Some(c.parse::<usize>().map_err(|_| PageError::BadRequest("canaries: a whole number".into()))?),
        }
        .filter(|c| *c > 0);
        let rate = match fields.get("rate") {
            None => None,
            Some(r) => Some(
                r.parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| PageError::BadRequest("rate: a positive number of messages per second".into()))?,
            ),
        };
        Some(ReplayPlan { rate, canary, canary_timeout: Duration::from_secs(60) })
    } else {
        None
    };
    let settings = match &plan {
        Some(p) => serde_json::json!({"rate": p.rate, "canary": p.canary}),
        None => serde_json::Value::Null,
    };
    let actor = session.actor();
    let audited =
        Audited::start(&state.ops, intent.action, entries, &selection, &Actor { name: &actor, reason }, settings)
            .await?;
    let id = audited.id;
    tracing::info!(audit = %id, action = intent.action.as_str(), actor, dead_letters = audited.len(), "console: dead-letter action");
    match intent.action {
        Action::Park => {
            audited.park(&state.ops).await?;
        }
        Action::Unpark => {
            audited.unpark(&state.ops).await?;
        }
        Action::Replay | Action::Purge => {
            // Long: it runs on, recording its progress in the audit row, which the action's
            // page shows; its outcome is recorded there too, so nothing is lost if the browser
            // goes away.
            let ctx = state.ops.clone();
            let action = intent.action;
            state.tasks.spawn(async move {
                let outcome = match (action, plan) {
                    (Action::Replay, Some(plan)) => audited.replay(&ctx, &plan, &|_| {}).await.map(|_| ()),
                    _ => audited.purge(&ctx, &|_| {}).await.map(|_| ()),
                };
                if let Err(e) = outcome {
                    tracing::error!(audit = %id, error = format!("{e:#}"), "console: dead-letter action failed");
                }
            });
        }
    }
    see_other(&format!("/console/dead-letters/actions/{id}"))
}

pub async fn action_page(State(state): State<ConsoleState>, session: Session, Path(id): Path<Uuid>) -> PageResult {
    session.require_view()?;
    let a = trellis_store::dlq_audit::get(&state.app.pool, id).await?.ok_or(PageError::NotFound("no such action"))?;
    let total = a.sequences.len();
    let running = a.status == "running";
    let outcome = a.outcome.clone().unwrap_or(serde_json::Value::Null);
    let status_class = match a.status.as_str() {
        "completed" => "status-ok",
        "running" | "cancelled" => "status-warn",
        _ => "status-bad",
    };
    let body = html! {
        div id="action" data-refresh=[running.then_some("2")] {
            h1 { (a.action) " of " (total) " dead letters" }
            dl {
                dt { "Status" } dd { span class=(status_class) id="action-status" { (a.status) } }
                dt { "Progress" } dd { progress max=(total.max(1)) value=(a.done) aria-label="Progress" { (a.done) " of " (total) } " " (a.done) " of " (total) }
                dt { "By" } dd { (a.actor) }
                dt { "Reason" } dd { (a.reason) }
                dt { "Started" } dd { (when(a.started_at)) }
                @if let Some(f) = a.finished_at { dt { "Finished" } dd { (when(f)) } }
                @if let Some(by) = &a.cancel_requested_by { dt { "Cancel requested by" } dd { (by) } }
            }
            @if let Some(passed) = outcome.get("canaries_passed").and_then(|v| v.as_u64()) {
                p.notice { "The " (passed) " canaries were processed without dying again; the rest followed." }
            }
            @if let Some(died) = outcome.get("canary_died").and_then(|v| v.as_u64()) {
                p.notice.bad role="alert" { (died) " canaries died again: the replay stopped before the rest (they are back in the DLQ)." }
            }
            @if let Some(error) = outcome.get("error").and_then(|v| v.as_str()) {
                p.notice.bad role="alert" { (error) }
            }
            @if !outcome.is_null() { h2 { "Outcome" } pre { (serde_json::to_string_pretty(&outcome).unwrap_or_default()) } }
            @if running && session.role.can_operate() && a.cancel_requested_by.is_none() {
                form method="post" action={"/console/dead-letters/actions/" (a.id) "/cancel"} {
                    (csrf(&session))
                    button.danger type="submit" { "Cancel after the current window" }
                }
            }
            p { a href="/console/dead-letters" { "Back to the dead letters" } }
        }
    };
    page(layout(Some(&session), Some(Section::DeadLetters), "Action", running, body))
}

pub async fn cancel_action(State(state): State<ConsoleState>, Path(id): Path<Uuid>, form: FormPost) -> PageResult {
    form.session.require_operate()?;
    if !trellis_store::dlq_audit::request_cancel(&state.app.pool, id, &form.session.actor()).await? {
        return Err(PageError::Conflict("this action is no longer running".into()));
    }
    see_other(&format!("/console/dead-letters/actions/{id}"))
}

// ----- cutover -----

pub async fn cutover(State(state): State<ConsoleState>, session: Session) -> PageResult {
    session.require_view()?;
    let flags = trellis_store::cutover::flags::list(&state.app.pool).await?;
    let mut history = Vec::new();
    for f in &flags {
        history.push(trellis_store::cutover::flags::audit(&state.app.pool, Some(f.flag), 10).await?);
    }
    let mut parity = Vec::new();
    for f in &flags {
        let report = match trellis_store::cutover::latest_period(&state.app.pool, f.flag).await? {
            None => None,
            Some(period) => {
                let tally = trellis_store::cutover::tally(&state.app.pool, f.flag, &period).await?;
                let first = trellis_store::cutover::first_differences(&state.app.pool, f.flag, &period, 5).await?;
                Some((period, tally, first))
            }
        };
        parity.push(report);
    }
    let reported = reported_flags(&state).await;
    let may_act = session.role.can_operate();
    let body = html! {
        h1 { "Cutover flags" }
        div id="propagation" data-refresh="3" {
            h2 { "What each process acts on" }
            @match &reported {
                Err(e) => p.notice.bad { "The processes' flags could not be read: " (e) },
                Ok(rows) => table {
                    caption.muted { "As each process reports it (trellis_cutover_flag_state), refreshed every 3 s" }
                    thead { tr { th scope="col" { "Process" } @for f in &flags { th scope="col" { code { (f.flag.as_str()) } } } } }
                    tbody { @for (process, values) in rows { tr {
                        td { code { (process) } }
                        @for f in &flags {
                            @let value = values.get(f.flag.as_str()).map(String::as_str);
                            td { @match value {
                                Some(v) if v == f.value.as_str() => span.status-ok { (v) },
                                Some(v) => span.status-warn { (v) " (not yet " (f.value.as_str()) ")" },
                                None => span.muted { "–" },
                            } }
                        }
                    } } }
                },
            }
        }
        p.muted { "Each processor runs where its flag says: in trellis-api (monolith), in its worker (worker), or in its worker with the monolith's candidate beside it (shadow). Processes pick a change up within their flag poll. Runbook: docs/runbooks/cutover.md." }
        @for ((f, past), report) in flags.iter().zip(&history).zip(&parity) {
            section aria-labelledby={"flag-" (f.flag.as_str())} {
                h2 id={"flag-" (f.flag.as_str())} { code { (f.flag.as_str()) } " = " span.flag-value { (f.value.as_str()) } }
                p.muted { "Set by " (f.updated_by) " at " (when(f.updated_at))
                    @if let Some(p) = f.previous { "; before: " (p.as_str()) } }
                @if may_act {
                    form method="post" action={"/console/cutover/" (f.flag.as_str())} {
                        (csrf(&session))
                        fieldset {
                            legend { "Change " (f.flag.as_str()) }
                            label { "Value " select name="value" {
                                @for e in Executor::ALL { option value=(e.as_str()) selected[e == f.value] { (e.as_str()) } }
                            } }
                            label { "Reason " input type="text" name="reason" size="40" required; }
                            label { input type="checkbox" name="force" value="1"; " Force past the promotion gate" }
                            button.primary type="submit" { "Change" }
                        }
                    }
                    @if let Some(p) = f.previous {
                        form method="post" action={"/console/cutover/" (f.flag.as_str())} {
                            (csrf(&session))
                            input type="hidden" name="value" value=(p.as_str());
                            input type="hidden" name="rollback" value="1";
                            label { "Roll back to " (p.as_str()) ", because " input type="text" name="reason" size="30" required value="rolled back from the console"; }
                            " " button type="submit" { "Roll back" }
                        }
                    }
                }
                @if let Some((period, tally, first)) = report {
                    h3 { "Shadow period since " (when(period.started_at))
                        @match period.ended_at { Some(end) => { ", ended " (when(end)) }, None => { ", in progress" } } }
                    p {
                        "Primary " (period.primary.as_str()) ", candidate " (period.candidate().as_str()) ": "
                        strong { (tally.matched) } " matched, " strong { (tally.mismatched) } " mismatched, "
                        strong { (tally.missing) } " missing (mismatch rate " (format!("{:.4}", tally.mismatch_rate() * 100.0)) " %)."
                    }
                    @if !first.is_empty() {
                        table {
                            caption.muted { "First differences, field by field" }
                            thead { tr { th scope="col" { "Input" } th scope="col" { "Result" } th scope="col" { "Field" } th scope="col" { "Primary" } th scope="col" { "Candidate" } } }
                            tbody { @for r in first {
                                @if r.comparison.diffs.is_empty() {
                                    tr { td { code { (r.comparison.key) } } td { (r.comparison.result.as_str()) } td {} td {} td {} }
                                }
                                @for d in &r.comparison.diffs { tr {
                                    td { code { (r.comparison.key) } } td { (r.comparison.result.as_str()) } td { code { (d.field) } }
                                    td { code { (d.primary.to_string()) } } td { code { (d.candidate.to_string()) } }
                                } }
                            } }
                        }
                    }
                }
                table {
                    caption.muted { "Last changes" }
                    thead { tr { th scope="col" { "When" } th scope="col" { "From" } th scope="col" { "To" } th scope="col" { "By" } th scope="col" { "Reason" } th scope="col" { "Forced" } } }
                    tbody { @for a in past { tr {
                        td { (when(a.changed_at)) } td { (a.from_value) } td { (a.to_value) } td { (a.actor) } td { (a.reason) } td { (if a.forced { "yes" } else { "" }) }
                    } } }
                }
            }
        }
    };
    page(layout(Some(&session), Some(Section::Cutover), "Cutover", false, body))
}

/// Each process's flags as it reports them: from Prometheus (`PROMETHEUS_URL`), or from the
/// processes' `/metrics`. Process → flag → value.
async fn reported_flags(state: &ConsoleState) -> Result<Vec<(String, BTreeMap<String, String>)>, String> {
    let config = &state.app.config;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().map_err(|e| e.to_string())?;
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    if let Some(url) = &config.prometheus_url {
        let response: serde_json::Value = http
            .get(format!("{}/api/v1/query", url.trim_end_matches('/')))
            .query(&[("query", "trellis_cutover_flag_state == 1")])
            .send()
            .await
            .map_err(|e| format!("querying Prometheus: {e}"))?
            .json()
            .await
            .map_err(|e| format!("reading Prometheus's answer: {e}"))?;
        for series in response["data"]["result"].as_array().into_iter().flatten() {
            let m = &series["metric"];
            let process = format!("{} {}", m["job"].as_str().unwrap_or(""), m["instance"].as_str().unwrap_or(""));
            if let (Some(flag), Some(value)) = (m["flag"].as_str(), m["value"].as_str()) {
                out.entry(process).or_default().insert(flag.to_owned(), value.to_owned());
            }
        }
        return Ok(out.into_iter().collect());
    }
    for url in &config.metrics_urls {
        let values = out.entry(url.clone()).or_default();
        let Ok(samples) = trellis_ops::triggers::scrape(&http, url).await else { continue };
        for s in samples.iter().filter(|s| s.metric == "trellis_cutover_flag_state") {
            let on =
                matches!(s.value, prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) if v == 1.0);
            if let (true, Some(flag), Some(value)) = (on, s.labels.get("flag"), s.labels.get("value")) {
                values.insert(flag.to_owned(), value.to_owned());
            }
        }
    }
    Ok(out.into_iter().collect())
}

pub async fn set_flag(State(state): State<ConsoleState>, Path(name): Path<String>, form: FormPost) -> PageResult {
    let FormPost { session, fields } = form;
    session.require_operate()?;
    let flag = Flag::parse(&name).map_err(|_| PageError::NotFound("no such flag"))?;
    let value = Executor::parse(fields.get("value").unwrap_or(""))
        .map_err(|_| PageError::BadRequest("value: monolith, shadow or worker".into()))?;
    let reason = fields.get("reason").ok_or_else(|| PageError::BadRequest("say why the flag changes".into()))?;
    let policy = state.app.config.promotion.policy().map_err(PageError::BadRequest)?;
    let actor = session.actor();
    let change = Change { flag, value, actor: &actor, reason, forced: fields.get("force").is_some() };
    match trellis_store::cutover::flags::set_checked(&state.app.pool, &change, &policy).await {
        Ok(changed) => {
            tracing::info!(
                flag = flag.as_str(),
                from = changed.from.as_str(),
                to = changed.to.as_str(),
                actor,
                "console: flag changed"
            );
            see_other("/console/cutover")
        }
        Err(SetError::Refused(why)) => Err(PageError::Conflict(format!(
            "The promotion gate refused: {why}. To go ahead anyway, tick \"force\" and give the reason."
        ))),
        Err(SetError::Database(e)) => Err(e.into()),
    }
}

// ----- score runs -----

pub async fn score_runs(State(state): State<ConsoleState>, session: Session) -> PageResult {
    session.require_view()?;
    let mut runs = trellis_store::scores::runs(&state.app.pool).await?;
    runs.reverse();
    runs.truncate(50);
    let pending = trellis_store::scores::is_run_pending(&state.app.pool).await?;
    let active = pending || runs.iter().any(|r| r.finished_at.is_none());
    let ms = |v: Option<i64>| v.map(|v| format!("{v} ms")).unwrap_or_default();
    let body = html! {
        div id="runs" data-refresh=(if active { "2" } else { "5" }) {
            h1 { "Score runs" }
            @if pending { p.notice { "A run is requested and waits for the score orchestrator." } }
            @if session.role.can_operate() {
                form method="post" action="/console/score-runs" {
                    (csrf(&session))
                    button.primary type="submit" { "Trigger a run" }
                }
            }
            table {
                thead { tr { th scope="col" { "Created" } th scope="col" { "Trigger" } th scope="col" { "Status" } th.num scope="col" { "Users" }
                    th.num scope="col" { "Edges" } th.num scope="col" { "Iterations" } th.num scope="col" { "Scores changed" }
                    th.num scope="col" { "Load" } th.num scope="col" { "Compute" } th.num scope="col" { "Write" } th scope="col" { "Error" } } }
                tbody { @for r in &runs { tr class="run" {
                    td { (when(r.created_at)) } td { (r.trigger) } td.run-status { (r.status.as_str()) }
                    td.num { (r.users.map(|v| v.to_string()).unwrap_or_default()) }
                    td.num { (r.edges.map(|v| v.to_string()).unwrap_or_default()) }
                    td.num { (r.iterations.map(|v| v.to_string()).unwrap_or_default()) }
                    td.num { (r.scores_changed.map(|v| v.to_string()).unwrap_or_default()) }
                    td.num { (ms(r.load_ms)) } td.num { (ms(r.compute_ms)) } td.num { (ms(r.write_ms)) }
                    td { (r.error.clone().unwrap_or_default()) }
                } } }
            }
        }
    };
    page(layout(Some(&session), Some(Section::ScoreRuns), "Score runs", true, body))
}

pub async fn trigger_run(State(state): State<ConsoleState>, form: FormPost) -> PageResult {
    form.session.require_operate()?;
    let requested = trellis_commands::scores::request_run(
        Some(form.session.user_id),
        &format!("console: {}", form.session.handle),
        OffsetDateTime::now_utc(),
    );
    let tx = trellis_store::begin(&state.app.pool).await?;
    trellis_commands::commit(tx, requested).await?;
    see_other("/console/score-runs")
}

// ----- moderation -----

pub async fn moderation(State(state): State<ConsoleState>, session: Session) -> PageResult {
    session.require_moderator()?;
    let viewer = QueueViewer { user: session.user_id, admin: session.role == Role::Admin };
    let queue = trellis_store::disputes::list_queue(
        &state.app.pool,
        viewer,
        Some(DisputeStatus::NeedsReview),
        None,
        None,
        LIST_LIMIT,
    )
    .await?;
    let body = html! {
        h1 { "Moderation queue" }
        p.muted { "Disputes the rules left to a moderator, most urgent priority first, oldest first within one." }
        @if queue.items.is_empty() { p { "Nothing needs review." } }
        @for d in &queue.items {
            section.dispute aria-labelledby={"d-" (d.id)} {
                h2 id={"d-" (d.id)} { (d.priority.as_str()) " · " (d.kind.as_str()) " against " code { (d.target_id) } }
                dl {
                    dt { "Filed" } dd { (when(d.created_at)) " by " code { (d.reporter_id) } }
                    dt { "Description" } dd { (d.description) }
                    @if let Some(ev) = &d.evidence { dt { "Evidence" } dd { (ev) } }
                    @if let Some(reasons) = &d.decision_reasons { dt { "Why the rules did not decide" } dd { code { (reasons.to_string()) } } }
                }
                form method="post" action={"/console/moderation/" (d.id)} {
                    (csrf(&session))
                    fieldset {
                        legend { "Decision" }
                        label { input type="radio" name="decision" value="upheld" required; " Uphold" }
                        label { input type="radio" name="decision" value="dismissed"; " Dismiss" }
                        label { "Note " input type="text" name="note" size="50" required maxlength="2000"; }
                        button.primary type="submit" { "Decide" }
                    }
                }
            }
        }
    };
    page(layout(Some(&session), Some(Section::Moderation), "Moderation", false, body))
}

pub async fn decide(State(state): State<ConsoleState>, Path(id): Path<Uuid>, form: FormPost) -> PageResult {
    let FormPost { session, fields } = form;
    session.require_moderator()?;
    let verdict = Verdict::parse(fields.get("decision").unwrap_or(""))
        .map_err(|_| PageError::BadRequest("choose uphold or dismiss".into()))?;
    let note = fields.get("note").unwrap_or("");
    if note.is_empty() || note.chars().count() > 2000 {
        return Err(PageError::BadRequest("the note is 1-2000 characters".into()));
    }
    let mut tx = trellis_store::begin(&state.app.pool).await?;
    let moderator = Moderator { id: session.user_id, role: session.role };
    let decided = trellis_commands::disputes::moderate(&mut tx, moderator, DisputeId(id), verdict, note)
        .await
        .map_err(|e| match e {
            ModerateError::NotFound => PageError::NotFound("no such dispute"),
            ModerateError::OwnFiling => PageError::Forbidden("moderators cannot decide disputes they filed"),
            ModerateError::AlreadyDecided(status) => {
                PageError::Conflict(format!("this dispute was already {}", status.as_str()))
            }
            ModerateError::UnknownModerator => PageError::SignIn,
            ModerateError::Database(e) => e.into(),
        })?;
    trellis_commands::commit(tx, decided).await?;
    dispute_processor::instrument::DisputeDecided {
        dispute: id,
        status: verdict.status(),
        rule: trellis_domain::adjudication::MODERATOR_RULE,
    }
    .emit();
    see_other("/console/moderation")
}
