//! `cargo xtask tidy`: checks of the repository that a machine can make, run first by
//! `cargo xtask test`:
//! - no file refers to a tracker's issue numbers or to files outside the repository;
//! - no comment line of Rust code is longer than [`MAX_COMMENT`] characters;
//! - the `trellisctl` commands that `README.md` and `docs/ARCHITECTURE.md` list are exactly the
//!   commands its clap definitions (`crates/trellisctl/src/*.rs`) declare;
//! - every `cargo xtask …` command the README and `docs/ARCHITECTURE.md` name exists, and the
//!   code map's `xtask/` row lists exactly [`crate::flags::COMMANDS`] and every bench suite;
//! - every table the migrations create is in the table catalogue of `docs/ARCHITECTURE.md`
//!   (and nothing else is), and every event type of `crates/domain/src/events.rs` is in
//!   `docs/EVENTS.md` (and nothing else is).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context, bail};

use crate::util;

/// The longest comment line allowed, in characters.
pub const MAX_COMMENT: usize = 120;

pub fn run() -> anyhow::Result<()> {
    let root = util::project_root();
    let files = util::read(Command::new("git").args(["ls-files"]).current_dir(&root))?;
    let mut problems = Vec::new();
    for path in files.lines() {
        let Ok(text) = std::fs::read_to_string(root.join(path)) else {
            continue; // binary, or deleted in the work tree
        };
        if path != "xtask/src/tidy.rs" {
            problems.extend(outside_references(&text).into_iter().map(|p| format!("{path}: {p}")));
        }
        if path.ends_with(".rs") {
            problems.extend(long_comments(&text).into_iter().map(|p| format!("{path}: {p}")));
        }
    }
    let read =
        |relative: &str| std::fs::read_to_string(root.join(relative)).with_context(|| format!("reading {relative}"));
    let mut clap = String::new();
    for entry in std::fs::read_dir(root.join("crates/trellisctl/src"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            clap.push_str(&std::fs::read_to_string(&path)?);
            clap.push('\n');
        }
    }
    let commands = cli_commands(&clap);
    let (readme, architecture) = (read("README.md")?, read("docs/ARCHITECTURE.md")?);
    problems.extend(compare(
        "README.md",
        &readme_commands(&readme, &commands),
        "trellisctl's clap definitions",
        &commands.all(),
    ));
    problems.extend(compare(
        "docs/ARCHITECTURE.md",
        &architecture_commands(&architecture, &commands),
        "trellisctl's clap definitions",
        &commands.all(),
    ));
    problems.extend(unknown_xtask_commands("README.md", &readme));
    problems.extend(unknown_xtask_commands("docs/ARCHITECTURE.md", &architecture));
    problems.extend(compare(
        "the xtask row of docs/ARCHITECTURE.md",
        &architecture_xtask_commands(&architecture),
        "xtask's command list",
        &xtask_commands(),
    ));
    let mut migrations = Vec::new();
    for entry in std::fs::read_dir(root.join("migrations"))? {
        let path = entry?.path();
        if path.to_string_lossy().ends_with(".up.sql") {
            migrations.push(path);
        }
    }
    migrations.sort();
    let sql: Vec<String> = migrations.iter().map(std::fs::read_to_string).collect::<Result<_, _>>()?;
    problems.extend(compare(
        "the table catalogue of docs/ARCHITECTURE.md",
        &catalogued_tables(&architecture),
        "the migrations",
        &migrated_tables(&sql),
    ));
    problems.extend(compare(
        "docs/EVENTS.md",
        &catalogued_events(&read("docs/EVENTS.md")?),
        "crates/domain/src/events.rs",
        &defined_events(&read("crates/domain/src/events.rs")?),
    ));
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("tidy: {problem}");
        }
        bail!("{} tidy problem(s)", problems.len());
    }
    eprintln!("tidy: ok ({} files)", files.lines().count());
    Ok(())
}

/// Lines that refer to an issue number or a file outside the repository.
pub fn outside_references(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let lower = line.to_ascii_lowercase();
        let issue = lower.match_indices("issue ").any(|(i, m)| {
            let before = lower[..i].chars().next_back();
            !before.is_some_and(|c| c.is_ascii_alphanumeric())
                && lower[i + m.len()..].trim_start_matches('#').starts_with(|c: char| c.is_ascii_digit())
        });
        if issue || line.contains(concat!("..", "/shared")) || line.contains(concat!("DESIGN", ".md")) {
            found.push(format!("line {}: refers outside the repository: {}", n + 1, line.trim()));
        }
    }
    found
}

/// Comment lines (`//`, `///`, `//!`) longer than [`MAX_COMMENT`] characters.
pub fn long_comments(text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.trim_start().starts_with("//") && line.chars().count() > MAX_COMMENT)
        .map(|(n, line)| {
            format!("line {}: a comment line of {} characters (at most {MAX_COMMENT})", n + 1, line.chars().count())
        })
        .collect()
}

/// What one side has that the other does not (`left` is the documentation, `right` the source
/// of truth).
fn compare(left: &str, l: &BTreeSet<String>, right: &str, r: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for missing in r.difference(l) {
        problems.push(format!("`{missing}` is in {right} but not in {left}"));
    }
    for extra in l.difference(r) {
        problems.push(format!("`{extra}` is in {left} but not in {right}"));
    }
    problems
}

/// The command tree of a clap CLI: top-level command → its subcommands (empty for a leaf).
#[derive(Debug, Default, PartialEq)]
pub struct Commands(pub BTreeMap<String, BTreeSet<String>>);

impl Commands {
    /// Every command as typed: `migrate up`, `triggers`, …
    pub fn all(&self) -> BTreeSet<String> {
        self.0
            .iter()
            .flat_map(|(top, subs)| {
                if subs.is_empty() { vec![top.clone()] } else { subs.iter().map(|s| format!("{top} {s}")).collect() }
            })
            .collect()
    }

    fn has_subcommands(&self, top: &str) -> bool {
        self.0.get(top).is_some_and(|s| !s.is_empty())
    }
}

/// `GrantRole` → `grant-role`, as clap names a variant.
fn kebab(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The variants of every `#[derive(… Subcommand)]` enum in `source`, with the enum each one's
/// `#[command(subcommand)]` field names: enum name → [(variant, nested enum)].
fn subcommand_enums(source: &str) -> BTreeMap<String, Vec<(String, Option<String>)>> {
    let lines: Vec<&str> = source.lines().collect();
    let mut enums = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) =
            line.trim_start().strip_prefix("pub enum ").or_else(|| line.trim_start().strip_prefix("enum "))
        else {
            continue;
        };
        let derives = lines[i.saturating_sub(3)..i].iter().any(|l| l.contains("derive(") && l.contains("Subcommand"));
        if !derives {
            continue;
        }
        let name = rest.trim_end_matches(['{', ' ']).to_owned();
        let mut variants: Vec<(String, Option<String>)> = Vec::new();
        let mut subcommand_next = false;
        for body in &lines[i + 1..] {
            if body.starts_with('}') {
                break;
            }
            let trimmed = body.trim();
            if body.starts_with("    ")
                && !body.starts_with("     ")
                && trimmed.starts_with(|c: char| c.is_ascii_uppercase())
            {
                let ident: String = trimmed.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
                variants.push((ident, None));
            } else if trimmed.starts_with("#[command(subcommand)]") {
                subcommand_next = true;
            } else if subcommand_next && let Some((_, ty)) = trimmed.split_once(':') {
                let ty = ty.trim().trim_end_matches(',').trim_start_matches("Box<").trim_end_matches('>');
                let ty = ty.rsplit("::").next().unwrap_or(ty).to_owned();
                if let Some(last) = variants.last_mut() {
                    last.1 = Some(ty);
                }
                subcommand_next = false;
            }
        }
        enums.insert(name, variants);
    }
    enums
}

/// The command tree of `trellisctl` from its clap definitions (the root enum is `Command`).
pub fn cli_commands(source: &str) -> Commands {
    let enums = subcommand_enums(source);
    let mut tree = BTreeMap::new();
    for (variant, nested) in enums.get("Command").cloned().unwrap_or_default() {
        let subs =
            nested.and_then(|n| enums.get(&n)).map(|vs| vs.iter().map(|(v, _)| kebab(v)).collect()).unwrap_or_default();
        tree.insert(kebab(&variant), subs);
    }
    Commands(tree)
}

/// The commands of the `trellisctl …` lines of the README's code blocks.
pub fn readme_commands(readme: &str, cli: &Commands) -> BTreeSet<String> {
    readme
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("trellisctl "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace().filter(|w| !w.starts_with('-'));
            let top = words.next()?.to_owned();
            Some(if cli.has_subcommands(&top) { format!("{top} {}", words.next().unwrap_or("")) } else { top })
        })
        .collect()
}

/// The commands of the `crates/trellisctl` row of the code map: each backticked `group a/b/c`
/// (each `/`-separated part starts with the name of a subcommand of `group`) or `command`; other
/// backticked text (paths, code) does not start with a lowercase name.
pub fn architecture_commands(architecture: &str, cli: &Commands) -> BTreeSet<String> {
    let Some(row) = architecture.lines().find(|l| l.starts_with("| `crates/trellisctl` |")) else {
        return BTreeSet::new();
    };
    let mut found = BTreeSet::new();
    for (i, quoted) in row.split('`').enumerate() {
        if i % 2 == 0 || i == 1 {
            continue; // outside backticks, or the row's own name
        }
        // A command starts with its name; a path (`deploy/`) or a code name is not one.
        let named =
            quoted.split_whitespace().next().is_some_and(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'));
        if !named {
            continue;
        }
        let mut parts = quoted.split('/');
        let first = parts.next().unwrap_or("");
        let mut words = first.split_whitespace();
        let Some(top) = words.next() else { continue };
        if !cli.has_subcommands(top) {
            found.insert(top.to_owned());
            continue;
        }
        found.insert(format!("{top} {}", words.next().unwrap_or("")));
        for part in parts {
            if let Some(sub) = part.split_whitespace().next() {
                found.insert(format!("{top} {sub}"));
            }
        }
    }
    found
}

/// Every command of xtask as the docs name it: `up`, …, and `bench <suite>` for each suite
/// (`help` aside).
pub fn xtask_commands() -> BTreeSet<String> {
    let mut all: BTreeSet<String> =
        crate::flags::COMMANDS.iter().filter(|c| !["help", "bench"].contains(c)).map(|c| c.to_string()).collect();
    all.extend(crate::flags::BENCH_SUITES.iter().map(|s| format!("bench {s}")));
    all
}

/// Each `cargo xtask <command>` (and `cargo xtask bench <suite>`) in `text` that xtask does not
/// have.
pub fn unknown_xtask_commands(file: &str, text: &str) -> Vec<String> {
    let known = xtask_commands();
    let mut problems = Vec::new();
    for (_, rest) in text.match_indices("cargo xtask ").map(|(i, m)| ((), &text[i + m.len()..])) {
        let mut words = rest.split(|c: char| !(c.is_ascii_lowercase() || c == '-'));
        let Some(command) = words.next().filter(|w| !w.is_empty()) else { continue };
        let named = if command == "bench" {
            match rest.strip_prefix("bench ").and_then(|r| r.split(|c: char| !c.is_ascii_lowercase()).next()) {
                Some(suite) if !suite.is_empty() => format!("bench {suite}"),
                _ => continue, // `cargo xtask bench …` in general
            }
        } else {
            command.to_owned()
        };
        if !known.contains(&named) && command != "help" {
            problems.push(format!("{file} names `cargo xtask {named}`, which xtask does not have"));
        }
    }
    problems
}

/// The commands of the `xtask/` row of the code map: `cargo xtask a / b / bench x|y`.
pub fn architecture_xtask_commands(architecture: &str) -> BTreeSet<String> {
    let Some(row) = architecture.lines().find(|l| l.starts_with("| `xtask/` |")) else {
        return BTreeSet::new();
    };
    let Some(list) = row.split('`').find_map(|q| q.strip_prefix("cargo xtask ")) else {
        return BTreeSet::new();
    };
    // Options in brackets (`up [--nats-cluster]`) are not commands.
    let mut bare = String::new();
    let mut depth = 0usize;
    for c in list.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            c if depth == 0 => bare.push(c),
            _ => {}
        }
    }
    let mut found = BTreeSet::new();
    for part in bare.split('/').map(str::trim) {
        match part.strip_prefix("bench ") {
            Some(suites) => found.extend(suites.split('|').map(|s| format!("bench {}", s.trim_end_matches('\\')))),
            None => {
                if let Some(command) = part.split_whitespace().next() {
                    found.insert(command.to_owned());
                }
            }
        }
    }
    found
}

/// The tables of the catalogue: the rows of the markdown table under `## Tables` whose first
/// cell is a backticked `schema.table`.
pub fn catalogued_tables(architecture: &str) -> BTreeSet<String> {
    let section = architecture.split("\n## Tables").nth(1).unwrap_or("");
    let section = section.split("\n## ").next().unwrap_or("");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .filter(|name| name.contains('.'))
        .map(str::to_owned)
        .collect()
}

/// The tables the migrations (`up` files, in order) leave: created, less those dropped.
pub fn migrated_tables(migrations: &[String]) -> BTreeSet<String> {
    let mut tables = BTreeSet::new();
    for sql in migrations {
        for line in sql.lines().map(str::trim).filter(|l| !l.starts_with("--")) {
            let upper = line.to_ascii_uppercase();
            let name_after = |keyword: &str| {
                let at = upper.find(keyword)? + keyword.len();
                let rest = line[at..].trim_start();
                let rest = if rest.to_ascii_uppercase().starts_with("IF NOT EXISTS ") {
                    &rest[14..]
                } else if rest.to_ascii_uppercase().starts_with("IF EXISTS ") {
                    &rest[10..]
                } else {
                    rest
                };
                let name: String =
                    rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.').collect();
                (!name.is_empty()).then_some(name)
            };
            if let Some(name) = name_after("CREATE TABLE ") {
                tables.insert(name);
            } else if let Some(name) = name_after("DROP TABLE ") {
                tables.remove(&name);
            }
        }
    }
    tables
}

/// The event types of `docs/EVENTS.md`'s catalogue table.
pub fn catalogued_events(events_md: &str) -> BTreeSet<String> {
    events_md.lines().filter_map(|l| l.strip_prefix("| [`")?.split('`').next()).map(str::to_owned).collect()
}

/// The event types the domain defines (`Variant(Payload) = "type" @ version`).
pub fn defined_events(events_rs: &str) -> BTreeSet<String> {
    events_rs
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(") = \"")?;
            let (name, after) = rest.split_once('"')?;
            after.trim_start().starts_with('@').then(|| name.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_outside_the_repository_are_found() {
        // Spelled in pieces, so that this file passes the same check.
        assert_eq!(
            outside_references(concat!("see is", "sue 14 for why\nissue #3\nsee ..", "/shared/notes\n")).len(),
            3
        );
        assert_eq!(outside_references(concat!("as DESIGN", ".md says")).len(), 1);
        assert!(outside_references(concat!("no tis", "sue 3 here; an issue of taste; issued 4")).is_empty());
    }

    #[test]
    fn long_comment_lines_are_found_and_long_code_is_not() {
        let long = format!("    // {}", "x".repeat(MAX_COMMENT));
        let code = format!("    let x = \"{}\";", "x".repeat(MAX_COMMENT));
        let text = format!("{long}\n// short\n{code}\n");
        assert_eq!(
            long_comments(&text),
            [format!("line 1: a comment line of {} characters (at most 120)", long.len())]
        );
    }

    const CLAP: &str = r#"
#[derive(Debug, Subcommand)]
enum Command {
    /// Migrations.
    Migrate {
        #[command(subcommand)]
        action: Migrate,
    },
    Users {
        #[command(subcommand)]
        action: Box<users::Users>,
    },
    Triggers(triggers::Args),
}

#[derive(Debug, Subcommand)]
enum Migrate {
    Up,
    Down {
        #[arg(long)]
        to: Option<i64>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum Users {
    GrantRole { user: String },
}
"#;

    #[test]
    fn the_command_tree_comes_from_the_clap_enums() {
        let all: Vec<String> = cli_commands(CLAP).all().into_iter().collect();
        assert_eq!(all, ["migrate down", "migrate up", "triggers", "users grant-role"]);
    }

    #[test]
    fn a_readme_or_architecture_list_that_differs_from_the_cli_is_a_problem() {
        let cli = cli_commands(CLAP);
        let readme =
            "```sh\ntrellisctl migrate up\ntrellisctl migrate sideways --yes\ntrellisctl triggers --json\n```\n";
        let problems =
            compare("README.md", &readme_commands(readme, &cli), "trellisctl's clap definitions", &cli.all());
        assert_eq!(problems.len(), 3, "{problems:?}"); // down and grant-role missing, sideways extra
        let row = "| `crates/trellisctl` | the tool: `migrate up/down [--to V]`, `users grant-role USER`, `triggers`; `deploy/` |";
        assert_eq!(architecture_commands(row, &cli), cli.all());
        let stale = "| `crates/trellisctl` | the tool: `migrate up`, `users grant-role USER`, `triggers`, `db roles` |";
        let problems =
            compare("ARCHITECTURE", &architecture_commands(stale, &cli), "trellisctl's clap definitions", &cli.all());
        assert_eq!(problems.len(), 2, "{problems:?}"); // migrate down missing, db roles extra
    }

    #[test]
    fn a_table_the_catalogue_lacks_or_a_dropped_table_it_keeps_is_a_problem() {
        let migrations = [
            "CREATE TABLE IF NOT EXISTS a.one (id int);\ncreate table a.two (id int);".to_owned(),
            "-- CREATE TABLE a.commented (id int);\nDROP TABLE IF EXISTS a.two;\nCREATE TABLE b.three (id int);"
                .to_owned(),
        ];
        let tables = migrated_tables(&migrations);
        assert_eq!(tables.iter().map(String::as_str).collect::<Vec<_>>(), ["a.one", "b.three"]);
        let doc = "# A\n\n## Tables\n\n| table | owner |\n|---|---|\n| `a.one` | x |\n| `a.two` | y |\n\n## Next\n| `c.four` | z |\n";
        let problems = compare("the catalogue", &catalogued_tables(doc), "the migrations", &tables);
        assert_eq!(problems.len(), 2, "{problems:?}"); // b.three missing, a.two extra
    }

    #[test]
    fn an_event_type_missing_from_events_md_is_a_problem() {
        let rs = "    A(X) = \"a.one\" @ 1,\n    B(Y) = \"a.two\" @ 1,\n    let s = \"a.three\";";
        let md = "| [`a.one`](#aone) | `events.a.one` | 1 |\n";
        let problems = compare("EVENTS.md", &catalogued_events(md), "events.rs", &defined_events(rs));
        assert_eq!(problems, ["`a.two` is in events.rs but not in EVENTS.md"]);
    }

    #[test]
    fn the_xtask_commands_the_docs_name_are_the_ones_it_has() {
        let row = "| `xtask/` | `cargo xtask up [--x] / services / tidy / lint / deploy / test [--y Z / --w] / chaos / seed / bench \
                   api\\|runtime\\|score\\|search\\|dispute\\|cutover\\|abuse\\|cluster\\|console` (…) |";
        assert_eq!(architecture_xtask_commands(row), xtask_commands());
        let stale = "| `xtask/` | `cargo xtask up / services / tidy / lint / deploy / test / seed / bench api` |";
        assert!(!compare("ARCHITECTURE", &architecture_xtask_commands(stale), "xtask", &xtask_commands()).is_empty());
        let readme = "run `cargo xtask up`, then `cargo xtask bench api` or `cargo xtask bench …`";
        assert!(unknown_xtask_commands("README.md", readme).is_empty());
        let wrong = "`cargo xtask start` and `cargo xtask bench graph`";
        assert_eq!(unknown_xtask_commands("README.md", wrong).len(), 2);
    }
}
