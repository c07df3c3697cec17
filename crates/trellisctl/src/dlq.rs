//! `trellisctl dlq`: see what died and why, and bring it back (the operations themselves are
//! `trellis_ops::dlq`, which the on-call console uses too).

use std::time::Duration;

use anyhow::bail;
use time::OffsetDateTime;
use trellis_ops::dlq::{self as ops, Action, Actor, Audited, Filter, ReplayPlan};
use trellis_runtime::dlq::Entry;

use crate::Output;

pub use trellis_ops::dlq::parse_time;

#[derive(Debug, clap::Subcommand)]
pub enum Dlq {
    /// Lists dead letters (the parked ones with --parked).
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
    /// Sends dead letters back to the one consumer that failed them (never a parked one).
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
    /// Parks dead letters: they stay in the DLQ, out of every replay, until unparked.
    Park {
        #[command(flatten)]
        selection: Selection,
    },
    /// Unparks dead letters (select them with --parked): they are replayable again.
    Unpark {
        #[command(flatten)]
        selection: Selection,
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

/// What `replay`, `park`, `unpark` and `purge` act on, and the audit's who and why.
#[derive(Debug, Clone, clap::Args)]
pub struct Selection {
    /// DLQ sequences (or use filters, or --all).
    pub sequences: Vec<u64>,
    #[command(flatten)]
    pub filter: Filter,
    /// Every dead letter (that is not parked, unless --parked).
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
    fn ops(&self) -> ops::Selection {
        ops::Selection { sequences: self.sequences.clone(), filter: self.filter.clone(), all: self.all }
    }

    /// The given reason, if it says something.
    fn reason(&self, action: Action) -> anyhow::Result<&str> {
        match self.reason.as_deref().filter(|r| !r.trim().is_empty()) {
            Some(r) => Ok(r),
            None => bail!("--reason is required: say why these messages are {}", action.past()),
        }
    }

    fn actor(&self) -> String {
        crate::actor(self.actor.clone())
    }
}

pub struct Ctx {
    pub ops: ops::Ctx,
    pub output: Output,
}

pub async fn run(ctx: &Ctx, command: Dlq) -> anyhow::Result<()> {
    match command {
        Dlq::List { filter, limit } => list(ctx, &filter, limit).await,
        Dlq::Show { sequence } => show(ctx, sequence).await,
        Dlq::Stats { filter } => stats(ctx, &filter).await,
        Dlq::Replay { selection, dry_run, rate, canary, canary_timeout } => {
            let entries = ops::select(&ctx.ops, &selection.ops()).await?;
            if dry_run {
                return dry_run_replay(&entries);
            }
            let reason = selection.reason(Action::Replay)?;
            if entries.is_empty() {
                println!("nothing to replay");
                return Ok(());
            }
            let actor = selection.actor();
            let plan = ReplayPlan { rate, canary, canary_timeout };
            let settings = serde_json::json!({"rate": rate, "canary": canary});
            let audited = Audited::start(
                &ctx.ops,
                Action::Replay,
                entries,
                &selection.ops(),
                &Actor { name: &actor, reason },
                settings,
            )
            .await?;
            let bar = progress(audited.len());
            let result = audited.replay(&ctx.ops, &plan, &|n| bar.inc(n as u64)).await;
            bar.finish_and_clear();
            let r = result?;
            println!("audit {}: replayed {}, failed {}", r.audit_id, r.replayed, r.failed.len());
            for warning in &r.warnings {
                eprintln!("warning: {warning}");
            }
            for (seq, e) in &r.failed {
                eprintln!("  {seq}: {e}");
            }
            if let Some(died) = r.canary_died {
                bail!(
                    "the canary died again ({died} of {} canaries are back in the DLQ); stopped before the rest",
                    canary.unwrap_or(0)
                );
            }
            if let Some(by) = r.cancelled_by {
                bail!("{by} cancelled the replay after {} dead letters", r.replayed);
            }
            if !r.failed.is_empty() {
                bail!("{} dead letters could not be replayed (they are still in the DLQ)", r.failed.len());
            }
            Ok(())
        }
        Dlq::Park { selection } => park(ctx, &selection, Action::Park).await,
        Dlq::Unpark { mut selection } => {
            selection.filter.parked = true;
            park(ctx, &selection, Action::Unpark).await
        }
        Dlq::Purge { selection, yes } => {
            if !yes {
                bail!("purging deletes dead letters for good: add --yes to confirm");
            }
            let reason = selection.reason(Action::Purge)?;
            let entries = ops::select(&ctx.ops, &selection.ops()).await?;
            let actor = selection.actor();
            let audited = Audited::start(
                &ctx.ops,
                Action::Purge,
                entries,
                &selection.ops(),
                &Actor { name: &actor, reason },
                serde_json::Value::Null,
            )
            .await?;
            let p = audited.purge(&ctx.ops, &|_| {}).await?;
            println!("audit {}: purged {}, failed {}", p.audit_id, p.purged, p.failed);
            if p.failed > 0 {
                bail!("{} dead letters could not be purged", p.failed);
            }
            Ok(())
        }
    }
}

async fn park(ctx: &Ctx, selection: &Selection, action: Action) -> anyhow::Result<()> {
    let reason = selection.reason(action)?;
    let entries = ops::select(&ctx.ops, &selection.ops()).await?;
    let actor = selection.actor();
    let audited = Audited::start(
        &ctx.ops,
        action,
        entries,
        &selection.ops(),
        &Actor { name: &actor, reason },
        serde_json::Value::Null,
    )
    .await?;
    let id = audited.id;
    let n = match action {
        Action::Park => audited.park(&ctx.ops).await?,
        _ => audited.unpark(&ctx.ops).await?,
    };
    println!("audit {id}: {} {n}", action.past());
    Ok(())
}

fn dry_run_replay(entries: &[Entry]) -> anyhow::Result<()> {
    println!("dry run: {} dead letters would be replayed", entries.len());
    for e in entries {
        println!(
            "  {} → replay.{}.{} (replays so far: {})",
            e.sequence,
            e.consumer(),
            e.original_subject(),
            e.replays()
        );
    }
    Ok(())
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

fn time_text(t: OffsetDateTime) -> String {
    ops::time_text(t)
}

async fn list(ctx: &Ctx, filter: &Filter, limit: usize) -> anyhow::Result<()> {
    let entries = ops::read(&ctx.ops, filter).await?;
    let shown = &entries[entries.len().saturating_sub(limit)..];
    match ctx.output {
        Output::Json => {
            println!("{}", serde_json::to_string_pretty(&shown.iter().map(ops::entry_json).collect::<Vec<_>>())?)
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
            let parked = if filter.parked { "parked " } else { "" };
            println!("{} of {} {parked}dead letters", shown.len(), entries.len());
        }
    }
    Ok(())
}

async fn show(ctx: &Ctx, sequence: u64) -> anyhow::Result<()> {
    let e = ops::get(&ctx.ops, sequence).await?;
    let parked = ops::is_parked(&ctx.ops, &e).await?;
    match ctx.output {
        Output::Json => {
            let mut json = ops::entry_json(&e);
            json["parked"] = parked.into();
            println!("{}", serde_json::to_string_pretty(&json)?)
        }
        Output::Table => {
            println!("sequence: {}\nsubject:  {}\ntime:     {}", e.sequence, e.subject, time_text(e.time));
            println!("trace:    {}", e.trace_id().as_deref().unwrap_or("(none)"));
            println!("parked:   {}\n", if parked { "yes" } else { "no" });
            for (k, v) in ops::headers(&e) {
                println!("{k}: {v}");
            }
            println!();
            match ops::event_of(&e.payload) {
                Ok((event_type, what)) => println!("event: {event_type}: {what}\n"),
                Err(why) => println!("event: does not decode: {why}\n"),
            }
            println!("{}", ops::payload_text(&e));
        }
    }
    Ok(())
}

async fn stats(ctx: &Ctx, filter: &Filter) -> anyhow::Result<()> {
    let entries = ops::read(&ctx.ops, filter).await?;
    let rows = ops::groups(&entries);
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Table => {
            println!("{:<20} {:>7} {:<25} {:<25} FINGERPRINT", "CONSUMER", "COUNT", "FIRST SEEN", "LAST SEEN");
            for g in &rows {
                println!(
                    "{:<20} {:>7} {:<25} {:<25} {}",
                    g.consumer,
                    g.count,
                    time_text(g.first_seen),
                    time_text(g.last_seen),
                    g.fingerprint
                );
            }
            println!("{} dead letters in {} groups", entries.len(), rows.len());
        }
    }
    Ok(())
}
