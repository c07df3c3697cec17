//! The event catalogue: for every [`EventType`], what it means, which command emits it (and
//! which services call that command), and which services consume it. `docs/EVENTS.md` is
//! generated from it ([`catalogue_markdown`]).
//!
//! The catalogue is checked against the code from both ends: the commands crate runs every
//! command and compares the types each one emitted with the producers named here (and scans
//! the services' sources for the callers named here), and each consumer's test feeds it an
//! example of every type and compares what it handled with the consumers named here.

use std::fmt::Write as _;

use super::*;

/// A process that produces or consumes events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Api,
    Trellisctl,
    SearchProjector,
    ScoreOrchestrator,
    DisputeProcessor,
}

impl Service {
    pub const ALL: [Service; 5] = [
        Service::Api,
        Service::Trellisctl,
        Service::SearchProjector,
        Service::ScoreOrchestrator,
        Service::DisputeProcessor,
    ];

    /// The binary's name (a processor's also names its consumer groups).
    pub fn name(self) -> &'static str {
        match self {
            Service::Api => "trellis-api",
            Service::Trellisctl => "trellisctl",
            Service::SearchProjector => "search-projector",
            Service::ScoreOrchestrator => "score-orchestrator",
            Service::DisputeProcessor => "dispute-processor",
        }
    }
}

/// A command of `trellis_commands` that emits a type, and the services that call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Producer {
    /// `<module>::<function>` in `trellis_commands`.
    pub command: &'static str,
    pub callers: &'static [Service],
}

/// One type's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub event_type: EventType,
    /// What happened, in one sentence.
    pub meaning: &'static str,
    pub producers: &'static [Producer],
    /// The processors whose consumer groups act on it (the others skip or never receive it).
    pub consumers: &'static [Service],
}

const API: &[Service] = &[Service::Api];
const TRELLISCTL: &[Service] = &[Service::Trellisctl];
const API_AND_TRELLISCTL: &[Service] = &[Service::Api, Service::Trellisctl];
const SEARCH: &[Service] = &[Service::SearchProjector];

/// A [`Producer`] as a constant (a `const fn` call would not be promoted to `'static`).
macro_rules! by {
    ($command:literal, $callers:expr) => {
        Producer { command: $command, callers: $callers }
    };
}

/// A dispute's decision: the moderator's command and the processor's automatic decisions share
/// `disputes::apply_decision` for their effects and events.
const DECISIONS: &[Producer] =
    &[by!("disputes::moderate", API), by!("disputes::apply_decision", &[Service::DisputeProcessor])];

/// The catalogue's entry of `t`.
pub fn entry(t: EventType) -> Entry {
    let (meaning, producers, consumers): (&str, &[Producer], &[Service]) = match t {
        EventType::UserRegistered => {
            ("An account was created (it is signed in at once).", &[by!("identity::register", API)], SEARCH)
        }
        EventType::ProfileUpdated => (
            "A user changed their display name, e-mail address or password; `display_name` is the new name \
             when it changed, and the address itself is never in an event.",
            &[by!("identity::update_profile", API)],
            SEARCH,
        ),
        EventType::RoleGranted => (
            "A user's role changed (granted by an operator, audited in `identity.user_admin_audit`).",
            &[by!("users::grant_role", TRELLISCTL)],
            &[],
        ),
        EventType::UserVerified => ("A user was marked verified.", &[by!("users::set_verified", TRELLISCTL)], SEARCH),
        EventType::UserUnverified => {
            ("A user's verification was revoked.", &[by!("users::set_verified", TRELLISCTL)], SEARCH)
        }
        EventType::UserSuspended => (
            "An upheld impersonation or harassment dispute suspended its target and revoked their tokens \
             (audited in `identity.user_admin_audit`).",
            DECISIONS,
            SEARCH,
        ),
        EventType::UserReinstated => (
            "A suspended user was reinstated (audited in `identity.user_admin_audit`); their tokens stay revoked.",
            &[by!("users::reinstate", API_AND_TRELLISCTL)],
            SEARCH,
        ),
        EventType::ContactAdded => ("A user added a contact (vouched for them).", &[by!("contacts::put", API)], SEARCH),
        EventType::ContactUpdated => ("A user changed a contact's label.", &[by!("contacts::put", API)], SEARCH),
        EventType::ContactRemoved => (
            "A user removed a contact; a `circles.member_removed` precedes it for every circle the contact left.",
            &[by!("contacts::remove", API)],
            SEARCH,
        ),
        EventType::CircleCreated => ("A user created a circle.", &[by!("circles::create", API)], SEARCH),
        EventType::CircleRenamed => ("A user renamed a circle.", &[by!("circles::rename", API)], SEARCH),
        EventType::CircleDeleted => {
            ("A user deleted a circle (its members stay contacts).", &[by!("circles::delete", API)], SEARCH)
        }
        EventType::CircleMemberAdded => {
            ("A contact was added to one of their owner's circles.", &[by!("circles::add_member", API)], SEARCH)
        }
        EventType::CircleMemberRemoved => (
            "A contact left one of their owner's circles: removed from it, or no longer a contact.",
            &[by!("circles::remove_member", API), by!("contacts::remove", API)],
            SEARCH,
        ),
        EventType::DisputeFiled => (
            "A dispute was filed; its subject carries its priority, which its kind decides.",
            &[by!("disputes::file", API)],
            &[Service::DisputeProcessor],
        ),
        EventType::DisputeDecided => (
            "A dispute was decided, by an adjudication rule (`rule` is its id) or by a moderator \
             (`rule` is `moderator`); an upheld spam dispute hides its target from search.",
            DECISIONS,
            SEARCH,
        ),
        EventType::ScoreRunRequested => (
            "Someone asked for a trust-score run; requests that arrive during a run are served by one follow-up run.",
            &[by!("scores::request_run", API_AND_TRELLISCTL)],
            &[Service::ScoreOrchestrator],
        ),
        EventType::ScoresUpdated => (
            "A score run changed these users' scores; a run writes one event per 1,000 changed scores.",
            &[by!("scores::record_run", &[Service::ScoreOrchestrator])],
            SEARCH,
        ),
    };
    Entry { event_type: t, meaning, producers, consumers }
}

/// Every entry, in [`EventType::ALL`]'s order.
pub fn entries() -> impl Iterator<Item = Entry> {
    EventType::ALL.iter().map(|&t| entry(t))
}

/// Whether the catalogue says `service` consumes `t`.
pub fn consumes(service: Service, t: EventType) -> bool {
    entry(t).consumers.contains(&service)
}

/// Where `service`'s code and the catalogue disagree: a type its match handles (`handles`, fed
/// each type's [`EventType::example`]) that the catalogue does not list for it, or the reverse,
/// and a subject of a handled type that one of its filters does not receive (`receives`). Each
/// consumer's test asserts that this is empty.
pub fn disagreements(
    service: Service,
    handles: impl Fn(EventPayload) -> bool,
    receives: impl Fn(&str) -> Result<(), String>,
) -> Vec<String> {
    let mut found = Vec::new();
    for &t in EventType::ALL {
        let handled = handles(t.example());
        if handled != consumes(service, t) {
            found.push(format!("{t}: {} handles it: {handled}; the catalogue says {}", service.name(), !handled));
        }
        if handled {
            found.extend(t.subjects().iter().filter_map(|subject| receives(subject).err()));
        }
    }
    found
}

impl EventType {
    /// A payload of this type with fixed ids: the catalogue's example, and what tests feed a
    /// consumer to see whether it handles the type.
    pub fn example(self) -> EventPayload {
        let user = |n: u128| UserId(uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n));
        let circle = CircleId(uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0c01));
        let dispute = DisputeId(uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0d01));
        let contact =
            ContactChanged { owner_id: user(1), contact_id: user(2), label: "met at the climbing gym".into() };
        let circle_named = CircleChanged { circle_id: circle, owner_id: user(1), name: "climbing".into() };
        let member = CircleMember { circle_id: circle, owner_id: user(1), user_id: user(2) };
        match self {
            EventType::UserRegistered => EventPayload::UserRegistered(UserRegistered {
                user_id: user(1),
                handle: "alice".into(),
                display_name: "Alice".into(),
            }),
            EventType::ProfileUpdated => EventPayload::ProfileUpdated(ProfileUpdated {
                user_id: user(1),
                display_name: Some("Alice A.".into()),
                email_changed: false,
            }),
            EventType::RoleGranted => {
                EventPayload::RoleGranted(RoleGranted { user_id: user(3), role: Role::Moderator })
            }
            EventType::UserVerified => EventPayload::UserVerified(UserRef { user_id: user(2) }),
            EventType::UserUnverified => EventPayload::UserUnverified(UserRef { user_id: user(2) }),
            EventType::UserSuspended => EventPayload::UserSuspended(UserSuspended {
                user_id: user(4),
                reason: "upheld impersonation dispute".into(),
                dispute_id: Some(dispute),
            }),
            EventType::UserReinstated => EventPayload::UserReinstated(UserRef { user_id: user(4) }),
            EventType::ContactAdded => EventPayload::ContactAdded(contact),
            EventType::ContactUpdated => EventPayload::ContactUpdated(contact),
            EventType::ContactRemoved => {
                EventPayload::ContactRemoved(ContactRemoved { owner_id: user(1), contact_id: user(2) })
            }
            EventType::CircleCreated => EventPayload::CircleCreated(circle_named),
            EventType::CircleRenamed => EventPayload::CircleRenamed(circle_named),
            EventType::CircleDeleted => {
                EventPayload::CircleDeleted(CircleDeleted { circle_id: circle, owner_id: user(1) })
            }
            EventType::CircleMemberAdded => EventPayload::CircleMemberAdded(member),
            EventType::CircleMemberRemoved => EventPayload::CircleMemberRemoved(member),
            EventType::DisputeFiled => EventPayload::DisputeFiled(DisputeFiled {
                dispute_id: dispute,
                reporter_id: user(1),
                target_id: user(4),
                kind: DisputeKind::Impersonation,
                priority: DisputeKind::Impersonation.priority(),
            }),
            EventType::DisputeDecided => EventPayload::DisputeDecided(DisputeDecided {
                dispute_id: dispute,
                target_id: user(4),
                kind: DisputeKind::Impersonation,
                status: DisputeStatus::Upheld,
                rule: "R4".into(),
                decided_by: None,
            }),
            EventType::ScoreRunRequested => EventPayload::ScoreRunRequested(ScoreRunRequested {
                requested_by: Some(user(3)),
                reason: "POST /v1/admin/score-runs".into(),
            }),
            EventType::ScoresUpdated => EventPayload::ScoresUpdated(ScoresUpdated {
                run_id: uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0a01),
                scores: vec![UserScore { user_id: user(1), score: 731 }, UserScore { user_id: user(2), score: 402 }],
            }),
        }
    }
}

fn names(services: &[Service]) -> String {
    if services.is_empty() {
        return "none".into();
    }
    services.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
}

fn producers_text(producers: &[Producer]) -> String {
    producers.iter().map(|p| format!("`{}` ({})", p.command, names(p.callers))).collect::<Vec<_>>().join("; ")
}

fn subjects_text(t: EventType) -> String {
    t.subjects().iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
}

/// `docs/EVENTS.md`: the catalogue as a document. The file is checked in; a test fails when it
/// differs from this.
pub fn catalogue_markdown() -> String {
    let mut out = String::new();
    out.push_str(
        "# Events\n\n\
         <!-- Generated from `trellis_domain::events::catalogue` by `catalogue_markdown()`; do not edit by hand:\n     \
         TRELLIS_WRITE_DOCS=1 cargo test -p trellis-domain --lib events::catalogue -->\n\n\
         Every event is written to `ops.outbox` in the transaction of the change it describes, by\n\
         `trellis_commands::commit` (the only writer of outbox rows), and relayed to the `EVENTS`\n\
         stream on its subject (under the deployment's `NATS_PREFIX`). On the wire it is an\n\
         envelope:\n\n\
         | field | what |\n\
         |---|---|\n\
         | `id` | the event id (uuid v7), also the JetStream `Nats-Msg-Id` |\n\
         | `type` | one of the types below |\n\
         | `version` | the payload's version; a consumer reads exactly the version listed here |\n\
         | `occurred_at` | RFC 3339 time of the change |\n\
         | `actor_id` | the user who caused it, or null (an operator, a processor) |\n\
         | `data` | the payload, as in the examples below |\n\n\
         A consumer decodes an envelope with `EventPayload::decode` and matches on the payload; an\n\
         unknown type, another version or malformed data is a permanent failure (dead-lettered).\n\
         Producers are the commands of `trellis_commands` (module::function) and the services that\n\
         call them; consumers are the processors whose consumer groups act on the type (the search\n\
         projector reads every subject and skips the types it does not consume).\n\n\
         | type | subject | version | produced by | consumed by |\n\
         |---|---|---|---|---|\n",
    );
    for e in entries() {
        let t = e.event_type;
        let _ = writeln!(
            out,
            "| [`{t}`](#{anchor}) | {} | {} | {} | {} |",
            subjects_text(t),
            t.version(),
            producers_text(e.producers),
            names(e.consumers),
            anchor = t.as_str().replace('.', ""),
        );
    }
    for e in entries() {
        let t = e.event_type;
        let example = serde_json::to_string_pretty(&t.example()).expect("examples serialise");
        let _ = write!(
            out,
            "\n## {t}\n\n{}\n\n- subject: {}\n- version: {}\n- produced by: {}\n- consumed by: {}\n\n\
             ```json\n{example}\n```\n",
            e.meaning,
            subjects_text(t),
            t.version(),
            producers_text(e.producers),
            names(e.consumers),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn a_consumer_that_handles_more_or_less_than_listed_or_misses_a_subject_disagrees() {
        let handles_all = disagreements(Service::SearchProjector, |_| true, |_| Ok(()));
        assert!(!handles_all.is_empty(), "the projector does not consume every type");
        let listed = |p: EventPayload| consumes(Service::SearchProjector, p.event_type());
        assert!(disagreements(Service::SearchProjector, listed, |_| Ok(())).is_empty());
        let deaf = disagreements(Service::SearchProjector, listed, |s| Err(format!("{s} is not received")));
        assert!(!deaf.is_empty() && deaf.iter().all(|d| d.ends_with("is not received")), "{deaf:?}");
    }

    #[test]
    fn every_type_has_one_entry_with_a_producer() {
        let mut seen = HashSet::new();
        for e in entries() {
            assert!(seen.insert(e.event_type), "{} twice", e.event_type);
            assert!(!e.producers.is_empty(), "{} has no producer", e.event_type);
            assert!(e.producers.iter().all(|p| !p.callers.is_empty()), "{}: a command nobody calls", e.event_type);
            assert!(e.meaning.ends_with('.'), "{}: the meaning is a sentence", e.event_type);
        }
        assert_eq!(seen.len(), EventType::ALL.len());
    }

    /// `docs/EVENTS.md` is the catalogue as [`catalogue_markdown`] renders it. With
    /// `TRELLIS_WRITE_DOCS=1` this test writes the file instead.
    #[test]
    fn the_events_document_is_generated_from_the_catalogue() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/EVENTS.md");
        let generated = catalogue_markdown();
        if std::env::var_os("TRELLIS_WRITE_DOCS").is_some_and(|v| v == "1") {
            std::fs::write(path, &generated).expect("writing docs/EVENTS.md");
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/EVENTS.md is not the catalogue: regenerate it with \
             `TRELLIS_WRITE_DOCS=1 cargo test -p trellis-domain --lib events::catalogue`"
        );
    }

    #[test]
    fn the_document_lists_every_type_with_its_example() {
        let doc = catalogue_markdown();
        for &t in EventType::ALL {
            assert!(doc.contains(&format!("\n## {t}\n")), "{t} has a section");
            let example = serde_json::to_string_pretty(&t.example()).unwrap();
            assert!(doc.contains(&example), "{t}'s example is shown");
        }
    }
}
