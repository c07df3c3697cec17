//! The rules of the command layer, checked in the sources of the processes (`api/src`,
//! `crates/*/src` but the test kit's, `workers/*/src`; test modules excluded, and `xtask`,
//! whose benchmarks write synthetic backlogs straight into the outbox, is no process):
//! - only `trellis_commands::commit` writes outbox rows, and only commands build events;
//! - each command the catalogue names as a producer is called by exactly the services the
//!   catalogue names.

use std::path::{Path, PathBuf};

use trellis_domain::events::catalogue::{self, Service};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `src` directories of the workspace's processes and libraries.
fn source_dirs() -> Vec<PathBuf> {
    let root = root();
    let mut dirs = vec![root.join("api/src")];
    for group in ["crates", "workers"] {
        for entry in std::fs::read_dir(root.join(group)).unwrap().flatten() {
            if entry.file_name() != "testkit" {
                dirs.push(entry.path().join("src"));
            }
        }
    }
    dirs
}

/// A file's code without its test module (by convention the last item, after `#[cfg(test)]`).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// `(file relative to the root, code)` of every source file under `dir`.
fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    let root = root().canonicalize().unwrap();
    files
        .into_iter()
        .map(|f| {
            let name = f.canonicalize().unwrap().strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            let code = code(&f);
            (name, code)
        })
        .collect()
}

fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase()
}

#[test]
fn only_commit_writes_outbox_rows_and_only_commands_build_events() {
    let mut offences = Vec::new();
    let mut writers = Vec::new();
    for dir in source_dirs() {
        for (file, code) in sources(&dir) {
            if squeeze(&code).contains("insert into ops.outbox") {
                writers.push(file.clone());
            }
            let commands = file.starts_with("crates/commands/src/");
            let domain = file.starts_with("crates/domain/src/");
            for built in ["Event::new(", "Emitted::events("] {
                if !commands && !domain && code.contains(built) {
                    offences.push(format!("{file} calls {built}: events are built by the commands"));
                }
            }
        }
    }
    assert_eq!(writers, ["crates/commands/src/outbox.rs"], "the files that write outbox rows");
    assert!(offences.is_empty(), "{offences:#?}");
}

fn service_dir(service: Service) -> &'static str {
    match service {
        Service::Api => "api/src",
        Service::Trellisctl => "crates/trellisctl/src",
        Service::SearchProjector => "workers/search-projector/src",
        Service::ScoreOrchestrator => "workers/score-orchestrator/src",
        Service::DisputeProcessor => "workers/dispute-processor/src",
    }
}

#[test]
fn each_producing_command_is_called_by_the_services_the_catalogue_names() {
    let root = root();
    let code: Vec<(Service, String)> = Service::ALL
        .into_iter()
        .map(|s| (s, sources(&root.join(service_dir(s))).into_iter().map(|(_, c)| c).collect::<String>()))
        .collect();
    let mut wrong = Vec::new();
    for entry in catalogue::entries() {
        for producer in entry.producers {
            let call = format!("trellis_commands::{}(", producer.command);
            for (service, code) in &code {
                let calls = code.contains(&call);
                if calls != producer.callers.contains(service) {
                    wrong.push(format!(
                        "{}: {} {} {}, the catalogue says otherwise",
                        entry.event_type,
                        service.name(),
                        if calls { "calls" } else { "does not call" },
                        producer.command
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
