//! `cargo xtask lint`: squawk over `migrations/`, with the settings in `.squawk.toml`.
//!
//! sqlx runs each migration file in a transaction unless its first line is
//! `-- no-transaction`, so files are linted in groups: with `--assume-in-transaction` (where
//! `CREATE INDEX CONCURRENTLY` is an error) or without it (where it is required).
//!
//! Down files are linted too, because the guide's rollback *is* running them against the live
//! database (§6.2 step 6): they must take no long locks and set `lock_timeout` like any other
//! migration. What they may do is remove what their up file added — that is their purpose —
//! so the backward-compatibility rules that ban dropping objects ([`DOWN_ALLOWED`]) are off
//! for them, and only for them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{flags, util};

/// The squawk installed when none is on the machine. Pinned: new squawk versions add default
/// rules, and the lint must not start failing on its own.
const SQUAWK_REQUIREMENT: &str = "squawk-cli==2.70.0";
const CONFIG: &str = ".squawk.toml";

/// Rules a down migration breaks by design: it drops what its up migration created.
const DOWN_ALLOWED: &[&str] = &[
    "ban-drop-column",
    "ban-drop-table",
    "ban-drop-schema",
    "ban-drop-type",
    "ban-drop-view",
    "ban-drop-function",
    "ban-drop-sequence",
    "ban-drop-domain",
    "ban-drop-constraint",
    "ban-drop-not-null",
    "ban-drop-extension",
    "ban-drop-generated-expression",
];

pub fn run(flags: &flags::Lint) -> anyhow::Result<()> {
    let root = util::project_root();
    let dir = flags.dir.clone().unwrap_or_else(|| root.join("migrations"));
    let migrations = Migration::list(&dir)?;
    if migrations.is_empty() {
        eprintln!("lint: no migrations in {}; nothing to lint", dir.display());
        return Ok(());
    }
    check_pairs(&migrations)?;

    let squawk = util::find_or_pip_install("squawk", SQUAWK_REQUIREMENT)?;
    let config = root.join(CONFIG);
    let down_excluded = {
        let mut rules = excluded_rules(&fs::read_to_string(&config)?);
        rules.extend(DOWN_ALLOWED.iter().map(|r| r.to_string()));
        rules.join(",")
    };

    let mut failed = Vec::new();
    for direction in [Direction::Up, Direction::Down] {
        for in_transaction in [true, false] {
            let files: Vec<&Path> = migrations
                .iter()
                .filter(|m| m.direction == direction && m.in_transaction == in_transaction)
                .map(|m| m.path.as_path())
                .collect();
            if files.is_empty() {
                continue;
            }
            let mut cmd = Command::new(&squawk);
            cmd.arg("--config").arg(&config);
            cmd.arg(if in_transaction { "--assume-in-transaction" } else { "--no-assume-in-transaction" });
            if direction == Direction::Down {
                // --exclude replaces the config file's list rather than adding to it.
                cmd.arg(format!("--exclude={down_excluded}"));
            }
            cmd.args(files.iter().map(|f| f.strip_prefix(&root).unwrap_or(f)));
            eprintln!(
                "lint: {} {} file(s), {}",
                files.len(),
                direction.name(),
                if in_transaction { "in a transaction" } else { "-- no-transaction" }
            );
            let status = cmd.status().with_context(|| format!("cannot run {}", squawk.display()))?;
            if !status.success() {
                failed.push(format!(
                    "{} {}",
                    direction.name(),
                    if in_transaction { "(in transaction)" } else { "(no-transaction)" }
                ));
            }
        }
    }
    if !failed.is_empty() {
        bail!("squawk found problems in the migrations: {}", failed.join(", "));
    }
    eprintln!("lint: {} migration file(s) clean", migrations.len());
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Up,
    Down,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

struct Migration {
    path: PathBuf,
    /// `<version>_<description>`, shared by an up file and its down file.
    stem: String,
    direction: Direction,
    in_transaction: bool,
}

impl Migration {
    /// The `.sql` files of `dir`, as sqlx reads them (a non-reversible `<v>_<d>.sql` is an up).
    fn list(dir: &Path) -> anyhow::Result<Vec<Migration>> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err).context(format!("cannot read {}", dir.display())),
        };
        let mut migrations = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(base) = name.strip_suffix(".sql") else {
                continue;
            };
            let (stem, direction) = match (base.strip_suffix(".up"), base.strip_suffix(".down")) {
                (Some(stem), _) => (stem, Direction::Up),
                (_, Some(stem)) => (stem, Direction::Down),
                _ => (base, Direction::Up),
            };
            let sql = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            migrations.push(Migration {
                stem: stem.to_owned(),
                direction,
                // The same test as sqlx's (sqlx-core migrate/source.rs).
                in_transaction: !sql.starts_with("-- no-transaction"),
                path,
            });
        }
        migrations.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(migrations)
    }
}

/// Every migration comes as an up and a down file (docs/design/contracts.md §2).
fn check_pairs(migrations: &[Migration]) -> anyhow::Result<()> {
    let has = |stem: &str, direction| migrations.iter().any(|m| m.stem == stem && m.direction == direction);
    let unpaired: Vec<String> = migrations
        .iter()
        .filter(|m| {
            let other = match m.direction {
                Direction::Up => Direction::Down,
                Direction::Down => Direction::Up,
            };
            !has(&m.stem, other)
        })
        .map(|m| m.path.display().to_string())
        .collect();
    if !unpaired.is_empty() {
        bail!("every migration needs both <name>.up.sql and <name>.down.sql; unpaired:\n  {}", unpaired.join("\n  "));
    }
    Ok(())
}

/// The `excluded_rules = [...]` list of a squawk config (the file is small and ours; this
/// reads only the quoted names between the brackets, skipping comments).
fn excluded_rules(config: &str) -> Vec<String> {
    let Some(start) = config.lines().position(|line| line.trim_start().starts_with("excluded_rules")) else {
        return Vec::new();
    };
    let mut rules = Vec::new();
    for line in config.lines().skip(start) {
        let code = line.split('#').next().unwrap_or_default();
        let list = code.split_once('[').map_or(code, |(_, rest)| rest);
        let (list, done) = match list.split_once(']') {
            Some((list, _)) => (list, true),
            None => (list, false),
        };
        rules.extend(
            list.split(',')
                .map(|item| item.trim().trim_matches('"').trim())
                .filter(|item| !item.is_empty())
                .map(str::to_owned),
        );
        if done {
            break;
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::excluded_rules;

    #[test]
    fn excluded_rules_are_read_from_a_commented_multiline_list() {
        let config = "included_rules = [\"a\"]\n\
                      excluded_rules = [\n  # why\n  \"x-rule\", # because\n  \"y-rule\",\n]\n\
                      other = [\"z\"]\n";
        assert_eq!(excluded_rules(config), ["x-rule", "y-rule"]);
        assert_eq!(excluded_rules("excluded_rules = [\"one\"]"), ["one"]);
        assert!(excluded_rules("pg_version = \"15\"").is_empty());
    }
}
