//! `trellisctl flags`: read and change the cutover flags, every change audited.

use anyhow::{Context as _, bail};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use trellis_domain::flags::{Executor, Flag};
use trellis_runtime::config::PromotionArgs;
use trellis_store::cutover::flags::{AuditRow, Change, FlagRow, SetError};

use crate::Output;

#[derive(Debug, clap::Subcommand)]
pub enum Flags {
    /// Every flag with its value, the value before the last change, and who changed it when.
    List,
    /// One flag.
    Get {
        /// score.executor, search.executor or dispute.executor.
        name: String,
    },
    /// Changes a flag (monolith, worker or shadow) and records who, when, from, to and why.
    /// Setting the value a flag already has changes nothing and records nothing.
    Set {
        /// score.executor, search.executor or dispute.executor.
        name: String,
        /// monolith, worker or shadow.
        value: String,
        /// Why (required; recorded in the audit).
        #[arg(long)]
        reason: Option<String>,
        /// Who is acting (default: $USER).
        #[arg(long, env = "TRELLIS_ACTOR")]
        actor: Option<String>,
        /// Promote the worker even though the promotion gate refuses (recorded as forced).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        gate: PromotionArgs,
    },
    /// The audit: the newest changes first.
    History {
        /// Only this flag's changes.
        name: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

pub async fn run(pool: &sqlx::PgPool, output: Output, command: Flags) -> anyhow::Result<()> {
    match command {
        Flags::List => {
            let rows = trellis_store::cutover::flags::list(pool).await.context("reading the flags")?;
            print_rows(output, &rows)
        }
        Flags::Get { name } => {
            let flag = parse_flag(&name)?;
            let row =
                trellis_store::cutover::flags::get(pool, flag).await.with_context(|| format!("reading {name}"))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&row_json(&row))?),
                Output::Table => print_rows(output, std::slice::from_ref(&row))?,
            }
            Ok(())
        }
        Flags::Set { name, value, reason, actor, force, gate } => {
            let flag = parse_flag(&name)?;
            let value = Executor::parse(&value).map_err(|e| anyhow::anyhow!(e.message))?;
            let Some(reason) = reason.as_deref().map(str::trim).filter(|r| !r.is_empty()) else {
                bail!("--reason is required: say why {name} changes");
            };
            let actor = crate::actor(actor);
            let policy = gate.policy().map_err(|e| anyhow::anyhow!(e))?;
            let change = Change { flag, value, actor: &actor, reason, forced: force };
            let changed = match trellis_store::cutover::flags::set_checked(pool, &change, &policy).await {
                Ok(changed) => changed,
                Err(SetError::Refused(why)) => bail!("refused to set {name} to {}: {why}", value.as_str()),
                Err(SetError::Database(e)) => return Err(e).with_context(|| format!("setting {name}")),
            };
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "name": flag.as_str(), "from": changed.from.as_str(), "to": changed.to.as_str(),
                        "changed": changed.from != changed.to, "forced_past": changed.forced_past,
                    }))?
                ),
                Output::Table if changed.from == changed.to => {
                    println!("{name} is already {}: nothing changed, nothing recorded", changed.to.as_str())
                }
                Output::Table => {
                    println!("{name}: {} → {} (by {actor}: {reason})", changed.from.as_str(), changed.to.as_str());
                    if let Some(why) = &changed.forced_past {
                        println!("forced past the promotion gate, recorded as forced: {why}");
                    }
                }
            }
            Ok(())
        }
        Flags::History { name, limit } => {
            let flag = name.as_deref().map(parse_flag).transpose()?;
            if limit == 0 {
                bail!("--limit must be at least 1");
            }
            let rows = trellis_store::cutover::flags::audit(pool, flag, i64::from(limit))
                .await
                .context("reading the flag audit")?;
            print_audit(output, &rows)
        }
    }
}

fn parse_flag(name: &str) -> anyhow::Result<Flag> {
    Flag::parse(name).map_err(|e| anyhow::anyhow!(e.message))
}

fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn row_json(r: &FlagRow) -> serde_json::Value {
    json!({
        "name": r.flag.as_str(),
        "value": r.value.as_str(),
        "previous": r.previous.map(Executor::as_str),
        "updated_at": time_text(r.updated_at),
        "updated_by": r.updated_by,
    })
}

fn print_rows(output: Output, rows: &[FlagRow]) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows.iter().map(row_json).collect::<Vec<_>>())?),
        Output::Table => {
            println!("{:<18} {:<9} {:<9} {:<26} UPDATED BY", "NAME", "VALUE", "PREVIOUS", "UPDATED AT");
            for r in rows {
                println!(
                    "{:<18} {:<9} {:<9} {:<26} {}",
                    r.flag.as_str(),
                    r.value.as_str(),
                    r.previous.map_or("-", Executor::as_str),
                    time_text(r.updated_at),
                    r.updated_by
                );
            }
        }
    }
    Ok(())
}

fn print_audit(output: Output, rows: &[AuditRow]) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let json: Vec<_> = rows
                .iter()
                .map(|a| {
                    json!({"name": a.name, "from": a.from_value, "to": a.to_value, "actor": a.actor,
                        "reason": a.reason, "forced": a.forced, "changed_at": time_text(a.changed_at)})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Output::Table => {
            println!("{:<26} {:<18} {:<20} {:<6} {:<16} REASON", "CHANGED AT", "NAME", "FROM → TO", "FORCED", "ACTOR");
            for a in rows {
                println!(
                    "{:<26} {:<18} {:<20} {:<6} {:<16} {}",
                    time_text(a.changed_at),
                    a.name,
                    format!("{} → {}", a.from_value, a.to_value),
                    if a.forced { "yes" } else { "no" },
                    a.actor,
                    a.reason
                );
            }
            println!("{} changes", rows.len());
        }
    }
    Ok(())
}
