//! `trellisctl parity`: a shadow period's comparisons of the candidate's outputs with the
//! primary's for the same inputs — counts and the first differences, field by field.

use anyhow::{Context as _, bail};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use trellis_domain::shadow::parse_processor;

use crate::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// score, search or dispute.
    processor: String,
    /// Show at most this many differences (mismatched or missing).
    #[arg(long, default_value_t = 10)]
    limit: u32,
}

pub async fn run(pool: &sqlx::PgPool, args: Args, output: Output) -> anyhow::Result<()> {
    let flag = parse_processor(&args.processor).map_err(|e| anyhow::anyhow!(e.message))?;
    let Some(period) = trellis_store::cutover::latest_period(pool, flag).await.context("reading the flag audit")?
    else {
        bail!(
            "{} has never been in shadow: there is nothing to compare (`trellisctl flags set {} shadow --reason …` starts a \
             shadow period)",
            flag.as_str(),
            flag.as_str()
        );
    };
    let tally = trellis_store::cutover::tally(pool, flag, &period).await.context("reading the comparisons")?;
    let first = trellis_store::cutover::first_differences(pool, flag, &period, i64::from(args.limit))
        .await
        .context("reading the comparisons")?;
    let time = |t: time::OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    match output {
        Output::Json => {
            let first: Vec<_> = first
                .iter()
                .map(|r| {
                    json!({"key": r.comparison.key, "result": r.comparison.result.as_str(), "count": r.comparison.count,
                           "diffs": r.comparison.diffs, "compared_at": time(r.compared_at)})
                })
                .collect();
            let report = json!({
                "processor": args.processor,
                "period": {"started_at": time(period.started_at), "ended_at": period.ended_at.map(time),
                           "primary": period.primary.as_str(), "candidate": period.candidate().as_str()},
                "matched": tally.matched, "mismatched": tally.mismatched, "missing": tally.missing,
                "mismatch_rate": tally.mismatch_rate(),
                "first_differences": first,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Output::Table => {
            let state = match period.ended_at {
                None => "in progress".to_owned(),
                Some(end) => format!("ended {}", time(end)),
            };
            println!(
                "{}: shadow period since {} ({state}): primary {}, candidate {}",
                args.processor,
                time(period.started_at),
                period.primary.as_str(),
                period.candidate().as_str()
            );
            println!("matched     {}", tally.matched);
            println!("mismatched  {} (mismatch rate {:.4}%)", tally.mismatched, tally.mismatch_rate() * 100.0);
            println!("missing     {}", tally.missing);
            if !first.is_empty() {
                println!("first differences:");
            }
            for r in &first {
                println!("  {} {} (at {})", r.comparison.result.as_str(), r.comparison.key, time(r.compared_at));
                for d in &r.comparison.diffs {
                    println!("    {}: primary {}, candidate {}", d.field, d.primary, d.candidate);
                }
            }
        }
    }
    Ok(())
}
