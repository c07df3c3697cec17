//! The event envelope, every event type with its subject, and the payloads.
//!
//! Subjects are `events.<domain>.<event>`; disputes carry their priority in the subject
//! (`events.disputes.filed.p0` … `.p3`) so that consumers can be filtered per priority.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::disputes::{DisputeKind, DisputeStatus, Priority};
use crate::ids::{CircleId, DisputeId, EventId, UserId};

/// Version of the envelope and payload schema that this code writes.
pub const EVENT_VERSION: u16 = 1;

/// What every event on the wire looks like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T = serde_json::Value> {
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
    /// Wraps `payload` in a fresh envelope. `now` is passed in: nothing here reads a clock
    /// except the id generator.
    pub fn new(payload: &EventPayload, actor_id: Option<UserId>, now: OffsetDateTime) -> Self {
        let event_type = payload.event_type();
        Self {
            subject: payload.subject(),
            envelope: Envelope {
                id: EventId::new(),
                event_type: event_type.to_owned(),
                version: EVENT_VERSION,
                occurred_at: now,
                actor_id,
                data: payload.data(),
            },
        }
    }
}

/// Every event Trellis emits, with its payload. It serialises as the bare payload (the
/// envelope's `data`); consumers decode `data` by the envelope's `type`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventPayload {
    UserRegistered(UserRegistered),
    ProfileUpdated(ProfileUpdated),
    RoleGranted(RoleGranted),
    UserVerified(UserRef),
    UserUnverified(UserRef),
    UserSuspended(UserSuspended),
    UserReinstated(UserRef),
    ContactAdded(ContactChanged),
    ContactUpdated(ContactChanged),
    ContactRemoved(ContactRemoved),
    CircleCreated(CircleChanged),
    CircleRenamed(CircleChanged),
    CircleDeleted(CircleDeleted),
    CircleMemberAdded(CircleMember),
    CircleMemberRemoved(CircleMember),
    DisputeFiled(DisputeFiled),
    DisputeDecided(DisputeDecided),
    ScoreRunRequested(ScoreRunRequested),
    ScoresUpdated(ScoresUpdated),
}

impl EventPayload {
    /// The `type` field of the envelope: `<domain>.<event>`.
    pub fn event_type(&self) -> &'static str {
        match self {
            EventPayload::UserRegistered(_) => "identity.user_registered",
            EventPayload::ProfileUpdated(_) => "identity.profile_updated",
            EventPayload::RoleGranted(_) => "identity.role_granted",
            EventPayload::UserVerified(_) => "identity.user_verified",
            EventPayload::UserUnverified(_) => "identity.user_unverified",
            EventPayload::UserSuspended(_) => "identity.user_suspended",
            EventPayload::UserReinstated(_) => "identity.user_reinstated",
            EventPayload::ContactAdded(_) => "contacts.contact_added",
            EventPayload::ContactUpdated(_) => "contacts.contact_updated",
            EventPayload::ContactRemoved(_) => "contacts.contact_removed",
            EventPayload::CircleCreated(_) => "circles.circle_created",
            EventPayload::CircleRenamed(_) => "circles.circle_renamed",
            EventPayload::CircleDeleted(_) => "circles.circle_deleted",
            EventPayload::CircleMemberAdded(_) => "circles.member_added",
            EventPayload::CircleMemberRemoved(_) => "circles.member_removed",
            EventPayload::DisputeFiled(_) => "disputes.filed",
            EventPayload::DisputeDecided(_) => "disputes.decided",
            EventPayload::ScoreRunRequested(_) => "scores.run_requested",
            EventPayload::ScoresUpdated(_) => "scores.updated",
        }
    }

    /// The subject relative to the deployment's NATS prefix: `events.<type>`, plus the
    /// priority for filed disputes.
    pub fn subject(&self) -> String {
        match self {
            EventPayload::DisputeFiled(d) => filed_subject(d.priority),
            other => format!("events.{}", other.event_type()),
        }
    }

    fn data(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("event payloads are plain data and always serialise")
    }
}

/// `events.disputes.filed.p0` … `.p3`.
pub fn filed_subject(priority: Priority) -> String {
    format!("events.disputes.filed.{}", priority.as_str().to_ascii_lowercase())
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
    pub role: String,
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
}
