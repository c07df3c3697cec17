//! The event envelope, every event type with its subject, version and payload, and how an
//! envelope decodes into its payload.
//!
//! Subjects are `events.<domain>.<event>`; disputes carry their priority in the subject
//! (`events.disputes.filed.p0` … `.p3`) so that consumers can be filtered per priority.
//!
//! Producers build an [`Event`] from an [`EventPayload`]; consumers turn what they receive back
//! into one with [`EventPayload::decode`], which checks the type and its version once, and
//! match on it, so the compiler shows every consumer each new type. Who produces and who
//! consumes each type is the [`catalogue`], from which `docs/EVENTS.md` is generated.

pub mod catalogue;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::disputes::{DisputeKind, DisputeStatus, Priority};
use crate::identity::Role;
use crate::ids::{CircleId, DisputeId, EventId, UserId};

pub use catalogue::catalogue_markdown;

/// What every event on the wire looks like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T = Value> {
    pub id: EventId,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u16,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    pub actor_id: Option<UserId>,
    pub data: T,
}

/// A domain event before it is written to the outbox: its subject and its envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub subject: String,
    pub envelope: Envelope,
}

impl Event {
    /// Wraps `payload` in a fresh envelope of its type's version. `now` is passed in: nothing
    /// here reads a clock except the id generator.
    pub fn new(payload: &EventPayload, actor_id: Option<UserId>, now: OffsetDateTime) -> Self {
        let event_type = payload.event_type();
        Self {
            subject: payload.subject(),
            envelope: Envelope {
                id: EventId::new(),
                event_type: event_type.as_str().to_owned(),
                version: event_type.version(),
                occurred_at: now,
                actor_id,
                data: payload.data(),
            },
        }
    }
}

/// Declares the event types: each variant of [`EventPayload`] with its payload type, its
/// `type` name and the version this code writes and reads. [`EventType`], its list and the
/// decoding follow from the one list, so they cannot disagree.
macro_rules! event_types {
    ($($(#[$doc:meta])* $variant:ident($payload:ty) = $name:literal @ $version:literal,)*) => {
        /// Every event Trellis emits, with its payload. It serialises as the bare payload (the
        /// envelope's `data`); [`EventPayload::decode`] reads it back by the envelope's `type`.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(untagged)]
        pub enum EventPayload {
            $($(#[$doc])* $variant($payload),)*
        }

        /// The type of an event: the envelope's `type`, `<domain>.<event>`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType {
            $($(#[$doc])* $variant,)*
        }

        impl EventType {
            /// Every type, in the catalogue's order.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            /// The envelope's `type`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventType::$variant => $name,)*
                }
            }

            /// The version of this type's payload that this code writes, and the only one it
            /// reads.
            pub fn version(self) -> u16 {
                match self {
                    $(EventType::$variant => $version,)*
                }
            }
        }

        impl EventPayload {
            pub fn event_type(&self) -> EventType {
                match self {
                    $(EventPayload::$variant(_) => EventType::$variant,)*
                }
            }

            fn decode_data(event_type: EventType, data: &Value) -> Result<Self, serde_json::Error> {
                match event_type {
                    $(EventType::$variant => <$payload>::deserialize(data).map(EventPayload::$variant),)*
                }
            }
        }
    };
}

event_types! {
    /// An account was created.
    UserRegistered(UserRegistered) = "identity.user_registered" @ 1,
    /// A user changed their display name or e-mail address (or password: nothing shown).
    ProfileUpdated(ProfileUpdated) = "identity.profile_updated" @ 1,
    /// A user's role changed.
    RoleGranted(RoleGranted) = "identity.role_granted" @ 1,
    /// A user was marked verified.
    UserVerified(UserRef) = "identity.user_verified" @ 1,
    /// A user's verification was revoked.
    UserUnverified(UserRef) = "identity.user_unverified" @ 1,
    /// An upheld dispute suspended a user (and revoked their tokens).
    UserSuspended(UserSuspended) = "identity.user_suspended" @ 1,
    /// A suspended user was reinstated.
    UserReinstated(UserRef) = "identity.user_reinstated" @ 1,
    /// A user added a contact.
    ContactAdded(ContactChanged) = "contacts.contact_added" @ 1,
    /// A user changed a contact's label.
    ContactUpdated(ContactChanged) = "contacts.contact_updated" @ 1,
    /// A user removed a contact.
    ContactRemoved(ContactRemoved) = "contacts.contact_removed" @ 1,
    /// A user created a circle.
    CircleCreated(CircleChanged) = "circles.circle_created" @ 1,
    /// A user renamed a circle.
    CircleRenamed(CircleChanged) = "circles.circle_renamed" @ 1,
    /// A user deleted a circle.
    CircleDeleted(CircleDeleted) = "circles.circle_deleted" @ 1,
    /// A contact joined one of their owner's circles.
    CircleMemberAdded(CircleMember) = "circles.member_added" @ 1,
    /// A contact left one of their owner's circles.
    CircleMemberRemoved(CircleMember) = "circles.member_removed" @ 1,
    /// A dispute was filed.
    DisputeFiled(DisputeFiled) = "disputes.filed" @ 1,
    /// A dispute was decided, by a rule or by a moderator.
    DisputeDecided(DisputeDecided) = "disputes.decided" @ 1,
    /// Someone asked for a trust-score run.
    ScoreRunRequested(ScoreRunRequested) = "scores.run_requested" @ 1,
    /// A score run changed these users' scores (one chunk of them).
    ScoresUpdated(ScoresUpdated) = "scores.updated" @ 1,
}

impl EventType {
    /// The type an envelope's `type` names, if any.
    pub fn parse(raw: &str) -> Option<Self> {
        EventType::ALL.iter().copied().find(|t| t.as_str() == raw)
    }

    /// Every subject an event of this type is published on, relative to the deployment's NATS
    /// prefix: `events.<type>`, or one per priority for filed disputes.
    pub fn subjects(self) -> Vec<String> {
        match self {
            EventType::DisputeFiled => Priority::ALL.into_iter().map(filed_subject).collect(),
            other => vec![format!("events.{}", other.as_str())],
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an envelope does not decode into an [`EventPayload`]: whatever it is, the consumer
/// cannot act on it, and a retry would not change that (a permanent failure: dead-letter it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("{event_type} version {version} is not the version this code reads ({supported})")]
    UnsupportedVersion { event_type: EventType, version: u16, supported: u16 },
    #[error("malformed {event_type} data: {reason}")]
    Malformed { event_type: EventType, reason: String },
}

impl EventPayload {
    /// The payload an envelope carries: its `type` names a known type, its `version` is the one
    /// this code reads, and its `data` is that type's payload.
    pub fn decode(envelope: &Envelope) -> Result<Self, DecodeError> {
        let event_type = EventType::parse(&envelope.event_type)
            .ok_or_else(|| DecodeError::UnknownType(envelope.event_type.clone()))?;
        if envelope.version != event_type.version() {
            return Err(DecodeError::UnsupportedVersion {
                event_type,
                version: envelope.version,
                supported: event_type.version(),
            });
        }
        Self::decode_data(event_type, &envelope.data)
            .map_err(|e| DecodeError::Malformed { event_type, reason: e.to_string() })
    }

    /// The subject relative to the deployment's NATS prefix: `events.<type>`, plus the
    /// priority for filed disputes.
    pub fn subject(&self) -> String {
        match self {
            EventPayload::DisputeFiled(d) => filed_subject(d.priority),
            other => format!("events.{}", other.event_type()),
        }
    }

    fn data(&self) -> Value {
        serde_json::to_value(self).expect("event payloads are plain data and always serialise")
    }
}

/// `events.disputes.filed.p0` … `.p3`.
pub fn filed_subject(priority: Priority) -> String {
    format!("events.disputes.filed.{}", priority.as_str().to_ascii_lowercase())
}

/// Whether NATS delivers `subject` to a consumer filtering on `filter`: tokens are separated
/// by dots, `*` matches one token and a final `>` one or more.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in filter.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRef {
    pub user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: UserId,
    pub handle: String,
    pub display_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileUpdated {
    pub user_id: UserId,
    pub display_name: Option<String>,
    pub email_changed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleGranted {
    pub user_id: UserId,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserSuspended {
    pub user_id: UserId,
    pub reason: String,
    pub dispute_id: Option<DisputeId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactChanged {
    pub owner_id: UserId,
    pub contact_id: UserId,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactRemoved {
    pub owner_id: UserId,
    pub contact_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CircleChanged {
    pub circle_id: CircleId,
    pub owner_id: UserId,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CircleDeleted {
    pub circle_id: CircleId,
    pub owner_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CircleMember {
    pub circle_id: CircleId,
    pub owner_id: UserId,
    pub user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisputeFiled {
    pub dispute_id: DisputeId,
    pub reporter_id: UserId,
    pub target_id: UserId,
    pub kind: DisputeKind,
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisputeDecided {
    pub dispute_id: DisputeId,
    pub target_id: UserId,
    pub kind: DisputeKind,
    pub status: DisputeStatus,
    /// The adjudication rule's id (`R1` … `R5`), or `moderator`.
    pub rule: String,
    pub decided_by: Option<UserId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRunRequested {
    pub requested_by: Option<UserId>,
    pub reason: String,
}

/// One chunk of the scores a run changed (a run writes as many chunks as it needs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoresUpdated {
    pub run_id: uuid::Uuid,
    pub scores: Vec<UserScore>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UserScore {
    pub user_id: UserId,
    pub score: i32,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn subjects_follow_the_contract() {
        let uid = UserId::new();
        let added = EventPayload::ContactAdded(ContactChanged { owner_id: uid, contact_id: uid, label: String::new() });
        assert_eq!(added.subject(), "events.contacts.contact_added");
        let filed = EventPayload::DisputeFiled(DisputeFiled {
            dispute_id: DisputeId::new(),
            reporter_id: uid,
            target_id: uid,
            kind: DisputeKind::Spam,
            priority: Priority::P2,
        });
        assert_eq!(filed.subject(), "events.disputes.filed.p2");
        let run = EventPayload::ScoreRunRequested(ScoreRunRequested { requested_by: None, reason: "manual".into() });
        assert_eq!(run.subject(), "events.scores.run_requested");
    }

    #[test]
    fn envelope_serialises_with_a_type_field_and_rfc3339_time() {
        let uid = UserId::new();
        let now = time::macros::datetime!(2026-11-25 12:00 UTC);
        let e = Event::new(&EventPayload::UserVerified(UserRef { user_id: uid }), Some(uid), now);
        let json = serde_json::to_value(&e.envelope).unwrap();
        assert_eq!(json["type"], "identity.user_verified");
        assert_eq!(json["version"], 1);
        assert_eq!(json["occurred_at"], "2026-11-25T12:00:00Z");
        assert_eq!(json["data"]["user_id"], uid.to_string());
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, e.envelope);
    }

    #[test]
    fn every_type_decodes_from_the_envelope_it_is_written_in() {
        let now = time::macros::datetime!(2026-11-25 12:00 UTC);
        for &t in EventType::ALL {
            let payload = t.example();
            assert_eq!(payload.event_type(), t);
            let event = Event::new(&payload, None, now);
            assert_eq!(event.envelope.event_type, t.as_str());
            assert_eq!(event.envelope.version, t.version());
            // Through the wire format, as a consumer receives it.
            let wire: Envelope = serde_json::from_slice(&serde_json::to_vec(&event.envelope).unwrap()).unwrap();
            assert_eq!(EventPayload::decode(&wire), Ok(payload), "{t}");
            assert!(t.subjects().contains(&event.subject), "{t} is published on {}", event.subject);
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
    }

    #[test]
    fn an_unknown_type_an_other_version_or_malformed_data_does_not_decode() {
        let event = Event::new(&EventType::UserReinstated.example(), None, OffsetDateTime::UNIX_EPOCH);
        let mut unknown = event.envelope.clone();
        unknown.event_type = "identity.user_teleported".into();
        assert_eq!(EventPayload::decode(&unknown), Err(DecodeError::UnknownType("identity.user_teleported".into())));
        let mut newer = event.envelope.clone();
        newer.version = 2;
        assert_eq!(
            EventPayload::decode(&newer),
            Err(DecodeError::UnsupportedVersion { event_type: EventType::UserReinstated, version: 2, supported: 1 })
        );
        let mut malformed = event.envelope.clone();
        malformed.data = json!({"user_id": "not a uuid"});
        let err = EventPayload::decode(&malformed).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { event_type: EventType::UserReinstated, .. }), "{err:?}");
        assert!(err.to_string().starts_with("malformed identity.user_reinstated data: "), "{err}");
    }

    #[test]
    fn data_a_newer_producer_added_fields_to_still_decodes() {
        let mut envelope = Event::new(&EventType::UserVerified.example(), None, OffsetDateTime::UNIX_EPOCH).envelope;
        envelope.data["verified_by"] = json!("someone");
        assert_eq!(EventPayload::decode(&envelope), Ok(EventType::UserVerified.example()));
    }

    #[test]
    fn subject_filters_match_like_nats() {
        assert!(subject_matches("events.>", "events.scores.updated"));
        assert!(subject_matches("events.disputes.filed.>", "events.disputes.filed.p0"));
        assert!(subject_matches("events.disputes.filed.*", "events.disputes.filed.p3"));
        assert!(subject_matches("events.scores.run_requested", "events.scores.run_requested"));
        assert!(!subject_matches("events.disputes.filed.>", "events.disputes.filed"));
        assert!(!subject_matches("events.disputes.filed.*", "events.disputes.filed.p0.x"));
        assert!(!subject_matches("events.scores.run_requested", "events.scores.updated"));
        assert!(!subject_matches("events.scores", "events.scores.updated"));
    }
}
