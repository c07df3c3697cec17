//! `trellisctl`: the Trellis on-call tool.

mod cutover;
mod dlq;
mod triggers;

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use trellis_domain::UserId;
use trellis_domain::identity::{AdminReason, Handle, Role};
use trellis_domain::score::RunStatus;
use trellis_runtime::config::SecretUrl;
use trellis_store::PoolConfig;
use trellis_store::search_model::RebuildScope;
use trellis_store::user_admin;

#[derive(Debug, Parser)]
#[command(name = "trellisctl", version, about = "The Trellis on-call tool")]
struct Cli {
    /// PostgreSQL connection URL. It may carry a password: `--help` does not show the
    /// environment's value, and errors show it redacted.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/trellis",
        global = true
    )]
    database_url: SecretUrl,

    /// How to reach and log in to NATS: `NATS_URL`, credentials, TLS (as the processes take them).
    #[command(flatten)]
    nats: trellis_runtime::nats_options::NatsOptions,

    /// Prefix of stream, subject and consumer names (as the processes were started with).
    #[arg(long, env = "NATS_PREFIX", default_value = "", global = true)]
    nats_prefix: String,

    /// Output format.
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Database migrations.
    Migrate {
        #[command(subcommand)]
        action: Migrate,
    },
    /// The database roles (cluster-wide; needs a role with CREATEROLE).
    Db {
        #[command(subcommand)]
        action: Db,
    },
    /// Roles, verification and reinstatement: the only way to make moderators, admins and
    /// verified users; role grants and reinstatements are audited.
    Users {
        #[command(subcommand)]
        action: Users,
    },
    /// Trust-score runs.
    Score {
        #[command(subcommand)]
        action: Score,
    },
    /// The transactional outbox.
    Outbox {
        #[command(subcommand)]
        action: Outbox,
    },
    /// The search read model.
    Search {
        #[command(subcommand)]
        action: Search,
    },
    /// Dead letters: list, show, stats, replay, purge.
    Dlq {
        #[command(subcommand)]
        action: Box<dlq::Dlq>,
    },
    /// Cutover flags (which side executes each processor): list, get, set, history.
    Flags {
        #[command(subcommand)]
        action: cutover::flags::Flags,
    },
    /// Shadow parity: how a candidate's outputs compare with the primary's (matched, mismatched,
    /// missing, and the first differences field by field).
    Parity(cutover::parity::Args),
    /// The migration guide's stage triggers: metric, threshold, current value, met or not.
    Triggers(triggers::Args),
}

#[derive(Debug, Subcommand)]
enum Db {
    /// Creates the roles that are missing: `trellis_owner` (runs the migrations, owns the
    /// schema) and one runtime role per binary (`trellis_api`, `trellis_score_orchestrator`,
    /// `trellis_search_projector`, `trellis_dispute_processor`, `trellisctl`), all NOLOGIN.
    /// Idempotent. Run it once per PostgreSQL cluster, before the first migration, as a role
    /// with CREATEROLE; the migrations grant each role its privileges (docs/SECURITY.md).
    Roles,
}

#[derive(Debug, Subcommand)]
enum Migrate {
    /// Applies every pending migration (as the migration owner). The database roles must
    /// exist; when some are missing and this login may create roles, they are created first.
    Up,
    /// Reverts the newest applied migration, or every migration newer than `--to VERSION`.
    /// Reverting drops what those migrations created, data included: it needs `--yes`, and
    /// reverting every migration (`--to 0`, or the only one applied) needs
    /// `--drop-everything` as well.
    Down {
        /// An applied version to revert to (0: revert every migration).
        #[arg(long)]
        to: Option<i64>,
        /// Confirms that the reverted migrations' tables and data are dropped.
        #[arg(long)]
        yes: bool,
        /// Confirms reverting every migration: every Trellis table and all its data.
        #[arg(long)]
        drop_everything: bool,
    },
    /// Lists migrations and whether each is applied.
    Status,
}

#[derive(Debug, Subcommand)]
enum Score {
    /// Requests a run (`events.scores.run_requested` through the outbox); the score
    /// orchestrator, wherever it runs, picks it up.
    Run {
        /// Wait for the run and print its record; fail if it fails.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
        timeout: std::time::Duration,
    },
    /// Shows a run's record (the latest when no id is given).
    Show { run_id: Option<uuid::Uuid> },
}

#[derive(Debug, Subcommand)]
enum Search {
    /// Rebuilds the whole read model (`search.directory` with its name postings,
    /// `search.contacts`) from the base tables, in batches of users, while search keeps
    /// answering; prints progress per batch.
    Rebuild {
        /// Rebuild only these documents.
        #[arg(long, value_enum)]
        only: Option<RebuildOnly>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RebuildOnly {
    /// Directory documents and their name postings.
    Directory,
    /// Contact documents.
    Contacts,
}

#[derive(Debug, Subcommand)]
enum Outbox {
    /// Events written but not yet acknowledged by JetStream.
    Status,
    /// Marks every event created since a time as unpublished again, so the relay re-sends it
    /// (after a lost stream, or events lost to NATS's fsync gap). Consumers are idempotent;
    /// JetStream drops copies still inside its duplicate window.
    Republish {
        /// RFC 3339 time, or a duration ago such as `30m`.
        #[arg(long)]
        since: String,
    },
}

#[derive(Debug, Subcommand)]
enum Users {
    /// Sets a user's role (user, moderator, admin, operator, read_only_operator) and records who, when, from, to
    /// and why.
    /// Granting the role a user already has changes nothing and records nothing.
    GrantRole {
        /// User id or handle.
        user: String,
        role: Role,
        /// Why (required; recorded in the audit).
        #[arg(long)]
        reason: Option<String>,
        /// Who is acting (default: $USER).
        #[arg(long, env = "TRELLIS_ACTOR")]
        actor: Option<String>,
    },
    /// Reinstates a suspended user (undoes a wrongful suspension) and records who, when and
    /// why; `identity.user_reinstated` goes out through the outbox. Their tokens stay revoked.
    Reinstate {
        /// User id or handle.
        user: String,
        /// Why (required; recorded in the audit).
        #[arg(long)]
        reason: Option<String>,
        /// Who is acting (default: $USER).
        #[arg(long, env = "TRELLIS_ACTOR")]
        actor: Option<String>,
    },
    /// The audit of role grants, suspensions and reinstatements: the newest first.
    History {
        /// Only this user's (id or handle).
        user: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Marks a user as verified (or, with --revoke, as not verified).
    Verify {
        /// User id or handle.
        user: String,
        #[arg(long)]
        revoke: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellisctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = PoolConfig::new("trellisctl");
    config.max_connections = 2;
    config.statement_timeout = std::time::Duration::from_secs(300);
    let pool = trellis_store::connect_lazy(cli.database_url.expose(), &config).context("invalid DATABASE_URL")?;
    match cli.command {
        Command::Migrate { action } => migrate(&pool, action).await,
        Command::Db { action: Db::Roles } => {
            trellis_store::roles::ensure(&pool).await.context("creating the database roles (needs CREATEROLE)")?;
            println!("database roles present: {}", trellis_store::roles::ALL.join(", "));
            Ok(())
        }
        Command::Users { action } => users(&pool, action, cli.output).await,
        Command::Outbox { action } => outbox(&pool, action).await,
        Command::Score { action } => score(&pool, action, cli.output).await,
        Command::Search { action: Search::Rebuild { only } } => {
            let scope = match only {
                None => RebuildScope::All,
                Some(RebuildOnly::Directory) => RebuildScope::Directory,
                Some(RebuildOnly::Contacts) => RebuildScope::Contacts,
            };
            search_rebuild(&pool, scope).await
        }
        Command::Flags { action } => cutover::flags::run(&pool, cli.output, action).await,
        Command::Triggers(args) => triggers::run(&pool, args, cli.output).await,
        Command::Parity(args) => cutover::parity::run(&pool, args, cli.output).await,
        Command::Dlq { action } => {
            let topology = trellis_runtime::nats::Topology::new(&cli.nats_prefix)?;
            let client =
                trellis_runtime::nats::connect_once(&cli.nats, "trellisctl", std::time::Duration::from_secs(10))
                    .await?;
            let js = trellis_runtime::nats::jetstream(client, std::time::Duration::from_secs(10));
            dlq::run(&dlq::Ctx { ops: trellis_ops::dlq::Ctx { js, topology, pool }, output: cli.output }, *action).await
        }
    }
}

async fn migrate(pool: &sqlx::PgPool, action: Migrate) -> anyhow::Result<()> {
    use trellis_store::migrate;
    match action {
        Migrate::Up => {
            let missing = trellis_store::roles::missing(pool).await?;
            if !missing.is_empty() {
                trellis_store::roles::ensure(pool).await.with_context(|| {
                    format!(
                        "the database roles {} are missing and this login cannot create them: \
                         run `trellisctl db roles` as a role with CREATEROLE first",
                        missing.join(", ")
                    )
                })?;
                println!("created the database roles {}", missing.join(", "));
            }
            migrate::up(pool).await.context("applying migrations")?;
            println!("migrations applied");
        }
        Migrate::Down { to, yes, drop_everything } => {
            let target = match to {
                Some(t) => t,
                None => match migrate::previous_version(pool).await? {
                    Some(t) => t,
                    None => bail!("no migration is applied"),
                },
            };
            check_down(pool, target, yes, drop_everything).await?;
            migrate::down_to(pool, target).await.context("reverting migrations")?;
            println!("reverted to version {target}");
        }
        Migrate::Status => {
            println!("{:<16} {:<8} DESCRIPTION", "VERSION", "APPLIED");
            for m in migrate::status(pool).await? {
                println!("{:<16} {:<8} {}", m.version, if m.applied { "yes" } else { "no" }, m.description);
            }
        }
    }
    Ok(())
}

/// Refuses a `migrate down` to `target` that is not confirmed, or that names no version: any
/// target below the oldest applied one reverts every migration.
async fn check_down(pool: &sqlx::PgPool, target: i64, yes: bool, drop_everything: bool) -> anyhow::Result<()> {
    use trellis_store::migrate;
    let applied: Vec<i64> = migrate::status(pool).await?.into_iter().filter(|m| m.applied).map(|m| m.version).collect();
    if target != 0 && !applied.contains(&target) {
        bail!(
            "--to {target} is not an applied migration version (see `trellisctl migrate status`; 0 reverts every one)"
        );
    }
    let reverted: Vec<i64> = applied.iter().copied().filter(|v| *v > target).collect();
    if reverted.is_empty() {
        bail!("nothing to revert: no applied migration is newer than {target}");
    }
    if !yes {
        bail!(
            "reverting {} migration(s) ({}) drops what they created, data included: repeat with --yes",
            reverted.len(),
            reverted.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        );
    }
    if target == 0 && !drop_everything {
        bail!("reverting every migration drops every Trellis table and all its data: repeat with --drop-everything");
    }
    Ok(())
}

async fn search_rebuild(pool: &sqlx::PgPool, scope: RebuildScope) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let done = trellis_store::search_model::rebuild(pool, scope, |p| {
        println!("search rebuild: {}/{} users, {} rows changed", p.users_done, p.users_total, p.rows_changed);
    })
    .await
    .context("rebuilding the search read model")?;
    println!(
        "search rebuild: done: {} users, {} rows changed in {:.1}s",
        done.users_done,
        done.rows_changed,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn score(pool: &sqlx::PgPool, action: Score, output: Output) -> anyhow::Result<()> {
    let print = |run: &trellis_store::scores::RunRow| -> anyhow::Result<()> {
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(run)?),
            Output::Table => {
                println!(
                    "run {} ({}), trigger {}, host {}",
                    run.id,
                    run.status,
                    run.trigger,
                    run.host.as_deref().unwrap_or("-")
                );
                println!(
                    "users {}, edges {}, iterations {}, residual {:e}, scores changed {}",
                    run.users.unwrap_or(0),
                    run.edges.unwrap_or(0),
                    run.iterations.unwrap_or(0),
                    run.residual.unwrap_or(0.0),
                    run.scores_changed.unwrap_or(0)
                );
                println!(
                    "load {} ms, compute {} ms, write {} ms",
                    run.load_ms.unwrap_or(0),
                    run.compute_ms.unwrap_or(0),
                    run.write_ms.unwrap_or(0)
                );
                if let Some(digest) = run.input_digest {
                    println!("input digest {}", trellis_store::scores::digest_text(digest));
                }
                if let Some(trace) = &run.trace_id {
                    println!("trace {trace}");
                }
                if let Some(linked) = run.linked_trace_ids.as_ref().filter(|l| !l.is_empty()) {
                    println!("linked traces {}", linked.join(", "));
                }
                if let Some(e) = &run.error {
                    println!("error: {e}");
                }
            }
        }
        Ok(())
    };
    match action {
        Score::Run { wait, timeout } => {
            let requested_at = time::OffsetDateTime::now_utc();
            let requested = trellis_commands::scores::request_run(None, "trellisctl score run", requested_at);
            trellis_commands::commit(pool.begin().await?, requested).await?;
            println!("score run requested");
            if !wait {
                return Ok(());
            }
            // The run that serves this request starts after it (an earlier one may still be
            // running, and then a follow-up serves it).
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                if let Some(run) = trellis_store::scores::first_run_since(pool, requested_at).await?
                    && run.status != RunStatus::Running
                {
                    print(&run)?;
                    if run.status != RunStatus::Succeeded {
                        bail!("the score run {}", run.status);
                    }
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "no score run finished within {timeout:?}: is the score orchestrator (or trellis-api with score.executor=monolith) running?"
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        Score::Show { run_id } => {
            let run = match run_id {
                Some(id) => trellis_store::scores::get_run(pool, id).await?,
                None => trellis_store::scores::latest_run(pool).await?,
            };
            let run = run.context("no such run")?;
            print(&run)
        }
    }
}

async fn outbox(pool: &sqlx::PgPool, action: Outbox) -> anyhow::Result<()> {
    match action {
        Outbox::Status => {
            let pending = trellis_store::outbox::pending_count(pool).await?;
            let age = trellis_store::outbox::oldest_pending_age_seconds(pool).await?;
            println!(
                "pending: {pending}
oldest pending age: {age:.1}s"
            );
        }
        Outbox::Republish { since } => {
            let since = dlq::parse_time(&since).map_err(|e| anyhow::anyhow!(e))?;
            let n = trellis_store::outbox::reset_published_since(pool, since).await?;
            println!("{n} events marked for republishing; the relay of trellis-api sends them now");
        }
    }
    Ok(())
}

/// Who is acting, for an audit: `--actor` (or `TRELLIS_ACTOR`), else `$USER`, else "unknown".
pub fn actor(given: Option<String>) -> String {
    given.or_else(|| std::env::var("USER").ok()).filter(|a| !a.trim().is_empty()).unwrap_or_else(|| "unknown".into())
}

async fn find_user(pool: &sqlx::PgPool, user: &str) -> anyhow::Result<trellis_store::identity::UserRow> {
    let found = if let Ok(id) = user.parse::<UserId>() {
        trellis_store::identity::find_by_id(pool, id).await?
    } else {
        let handle =
            Handle::parse(user).map_err(|e| anyhow::anyhow!("{user:?} is neither a user id nor a handle: {e}"))?;
        trellis_store::identity::find_by_handle(pool, handle.as_str()).await?
    };
    found.with_context(|| format!("no user {user:?}"))
}

/// The `--reason` of a user-administration command: required, 1–2,000 characters.
fn admin_reason(reason: Option<String>) -> anyhow::Result<AdminReason> {
    let reason =
        reason.ok_or_else(|| anyhow::anyhow!("--reason is required: say why (it is recorded in the audit)"))?;
    AdminReason::parse(&reason).map_err(|e| anyhow::anyhow!("--reason {}", e.message))
}

async fn users(pool: &sqlx::PgPool, action: Users, output: Output) -> anyhow::Result<()> {
    match action {
        Users::GrantRole { user, role, reason, actor } => {
            let reason = admin_reason(reason)?;
            let found = find_user(pool, &user).await?;
            let actor = crate::actor(actor);
            let by = user_admin::Actor { name: &actor, user_id: None };
            let mut tx = pool.begin().await?;
            let granted = trellis_commands::users::grant_role(&mut tx, UserId(found.id), role, &by, &reason)
                .await
                .with_context(|| format!("granting {} the role {}", found.handle, role.as_str()))?;
            match trellis_commands::commit(tx, granted).await {
                Ok(Some(_)) => println!("{} ({}) is now {}", found.handle, found.id, role.as_str()),
                Ok(None) => {
                    println!(
                        "{} ({}) is already {}: nothing changed, nothing recorded",
                        found.handle,
                        found.id,
                        role.as_str()
                    )
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("granting {} the role {}", found.handle, role.as_str()));
                }
            }
        }
        Users::Reinstate { user, reason, actor } => {
            let reason = admin_reason(reason)?;
            let found = find_user(pool, &user).await?;
            let actor = crate::actor(actor);
            let by = user_admin::Actor { name: &actor, user_id: None };
            let mut tx = pool.begin().await?;
            let reinstated = trellis_commands::users::reinstate(&mut tx, UserId(found.id), &by, &reason)
                .await
                .with_context(|| format!("reinstating {}", found.handle))?;
            trellis_commands::commit(tx, reinstated).await.with_context(|| format!("reinstating {}", found.handle))?;
            println!("{} ({}) is reinstated (active); they sign in again", found.handle, found.id);
        }
        Users::History { user, limit } => {
            let user = match user {
                Some(u) => Some(UserId(find_user(pool, &u).await?.id)),
                None => None,
            };
            let rows = user_admin::history(pool, user, i64::from(limit)).await.context("reading the audit")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => {
                    println!(
                        "{:<25} {:<36} {:<10} {:<10} {:<10} {:<16} REASON",
                        "WHEN", "USER", "ACTION", "FROM", "TO", "ACTOR"
                    );
                    for r in rows {
                        let when = r.acted_at.format(&time::format_description::well_known::Rfc3339)?;
                        println!(
                            "{when:<25} {:<36} {:<10} {:<10} {:<10} {:<16} {}",
                            r.user_id,
                            r.action.as_str(),
                            r.from_value,
                            r.to_value,
                            r.actor,
                            r.reason
                        );
                    }
                }
            }
        }
        Users::Verify { user, revoke } => {
            let found = find_user(pool, &user).await?;
            let mut tx = pool.begin().await?;
            let verified = trellis_commands::users::set_verified(&mut tx, UserId(found.id), !revoke).await?;
            trellis_commands::commit(tx, verified).await?;
            println!("{} ({}) is {}", found.handle, found.id, if revoke { "no longer verified" } else { "verified" });
        }
    }
    Ok(())
}
