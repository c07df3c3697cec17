//! Disputes: what can be disputed, how urgent it is, and where it stands.

use serde::{Deserialize, Serialize};

use crate::identity::Role;
use crate::ids::UserId;
use crate::validation::FieldError;

/// Whether `viewer` (of `viewer_role`) may see and decide a dispute against `target` (of
/// `target_role`) as a moderator: moderators and admins may, but never on a dispute against
/// themselves, and on a dispute against a moderator or an admin only an admin may. Anyone else
/// (the reporter included) sees a dispute only as its reporter. The moderation queue's
/// statement (`trellis_store::disputes::list_queue`) applies the same rule.
pub fn may_moderate(viewer: UserId, viewer_role: Role, target: UserId, target_role: Role) -> bool {
    viewer_role.can_moderate() && viewer != target && (viewer_role == Role::Admin || !target_role.can_moderate())
}

/// What a dispute alleges. The kind alone decides the priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisputeKind {
    Impersonation,
    Harassment,
    Spam,
    IncorrectInfo,
}

impl DisputeKind {
    pub const ALL: [DisputeKind; 4] =
        [DisputeKind::Impersonation, DisputeKind::Harassment, DisputeKind::Spam, DisputeKind::IncorrectInfo];

    pub fn as_str(self) -> &'static str {
        match self {
            DisputeKind::Impersonation => "impersonation",
            DisputeKind::Harassment => "harassment",
            DisputeKind::Spam => "spam",
            DisputeKind::IncorrectInfo => "incorrect_info",
        }
    }

    pub fn priority(self) -> Priority {
        match self {
            DisputeKind::Impersonation => Priority::P0,
            DisputeKind::Harassment => Priority::P1,
            DisputeKind::Spam => Priority::P2,
            DisputeKind::IncorrectInfo => Priority::P3,
        }
    }

    /// Whether upholding a dispute of this kind suspends its target (and revokes their tokens):
    /// impersonation and harassment. Spam hides the target; incorrect information changes nothing.
    pub fn suspends_target(self) -> bool {
        match self {
            DisputeKind::Impersonation | DisputeKind::Harassment => true,
            DisputeKind::Spam | DisputeKind::IncorrectInfo => false,
        }
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        DisputeKind::ALL.into_iter().find(|k| k.as_str() == raw).ok_or_else(|| {
            FieldError::new("kind", "unknown", "must be one of impersonation, harassment, spam, incorrect_info")
        })
    }
}

/// A stored kind (the store decodes rows with it).
impl TryFrom<String> for DisputeKind {
    type Error = FieldError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        DisputeKind::parse(&raw)
    }
}

/// Dispute urgency, P0 (most urgent) to P3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Priority {
    P0,
    P1,
    P2,
    P3,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Priority::P0, Priority::P1, Priority::P2, Priority::P3];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::P0 => "P0",
            Priority::P1 => "P1",
            Priority::P2 => "P2",
            Priority::P3 => "P3",
        }
    }

    /// 0 for P0 … 3 for P3; the database stores this.
    pub fn rank(self) -> i16 {
        self as i16
    }

    pub fn from_rank(rank: i16) -> Option<Self> {
        Priority::ALL.get(usize::try_from(rank).ok()?).copied()
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(raw))
            .ok_or_else(|| FieldError::new("priority", "unknown", "must be one of P0, P1, P2, P3"))
    }
}

/// A stored rank (the store decodes rows with it).
impl TryFrom<i16> for Priority {
    type Error = FieldError;
    fn try_from(rank: i16) -> Result<Self, Self::Error> {
        Priority::from_rank(rank)
            .ok_or_else(|| FieldError::new("priority", "unknown", format!("rank {rank} is not one of 0, 1, 2, 3")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisputeStatus {
    Pending,
    Upheld,
    Dismissed,
    NeedsReview,
}

impl DisputeStatus {
    pub const ALL: [DisputeStatus; 4] =
        [DisputeStatus::Pending, DisputeStatus::Upheld, DisputeStatus::Dismissed, DisputeStatus::NeedsReview];

    pub fn as_str(self) -> &'static str {
        match self {
            DisputeStatus::Pending => "pending",
            DisputeStatus::Upheld => "upheld",
            DisputeStatus::Dismissed => "dismissed",
            DisputeStatus::NeedsReview => "needs_review",
        }
    }

    /// Upheld and dismissed are final; pending and needs_review still await a decision.
    pub fn is_final(self) -> bool {
        matches!(self, DisputeStatus::Upheld | DisputeStatus::Dismissed)
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        DisputeStatus::ALL.into_iter().find(|s| s.as_str() == raw).ok_or_else(|| {
            FieldError::new("status", "unknown", "must be one of pending, upheld, dismissed, needs_review")
        })
    }
}

/// A stored status (the store decodes rows with it).
impl TryFrom<String> for DisputeStatus {
    type Error = FieldError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        DisputeStatus::parse(&raw)
    }
}

/// A final decision a moderator can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Upheld,
    Dismissed,
}

impl Verdict {
    pub fn status(self) -> DisputeStatus {
        match self {
            Verdict::Upheld => DisputeStatus::Upheld,
            Verdict::Dismissed => DisputeStatus::Dismissed,
        }
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        match raw {
            "upheld" => Ok(Verdict::Upheld),
            "dismissed" => Ok(Verdict::Dismissed),
            _ => Err(FieldError::new("decision", "unknown", "must be upheld or dismissed")),
        }
    }
}

/// Free text that explains a dispute: 1–2,000 characters after trimming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Description(String);

impl Description {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(FieldError::new("description", "required", "must not be empty"));
        }
        if s.chars().count() > 2000 {
            return Err(FieldError::new("description", "too_long", "must be at most 2000 characters"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_decides_priority() {
        assert_eq!(DisputeKind::Impersonation.priority(), Priority::P0);
        assert_eq!(DisputeKind::Harassment.priority(), Priority::P1);
        assert_eq!(DisputeKind::Spam.priority(), Priority::P2);
        assert_eq!(DisputeKind::IncorrectInfo.priority(), Priority::P3);
    }

    #[test]
    fn only_an_admin_moderates_a_moderator_and_nobody_moderates_themselves() {
        let (me, other) = (UserId(uuid::Uuid::from_u128(1)), UserId(uuid::Uuid::from_u128(2)));
        use Role::*;
        let cases = [
            (User, User, false),
            (Moderator, User, true),
            (Moderator, Moderator, false),
            (Moderator, Admin, false),
            (Admin, User, true),
            (Admin, Moderator, true),
            (Admin, Admin, true),
        ];
        for (viewer, target, may) in cases {
            assert_eq!(may_moderate(me, viewer, other, target), may, "{viewer:?} on {target:?}");
            assert!(!may_moderate(me, viewer, me, target), "{viewer:?} on themselves");
        }
    }

    #[test]
    fn stored_values_convert_back_and_unknown_ones_are_errors() {
        for k in DisputeKind::ALL {
            assert_eq!(DisputeKind::try_from(k.as_str().to_owned()), Ok(k));
        }
        for s in DisputeStatus::ALL {
            assert_eq!(DisputeStatus::try_from(s.as_str().to_owned()), Ok(s));
        }
        for p in Priority::ALL {
            assert_eq!(Priority::try_from(p.rank()), Ok(p));
        }
        assert!(DisputeKind::try_from("slander".to_owned()).is_err());
        assert!(DisputeStatus::try_from("Pending".to_owned()).is_err());
        assert_eq!(Priority::try_from(4).unwrap_err().to_string(), "priority: rank 4 is not one of 0, 1, 2, 3");
    }

    #[test]
    fn priority_round_trips_through_rank() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_rank(p.rank()), Some(p));
        }
        assert_eq!(Priority::from_rank(4), None);
        assert_eq!(Priority::parse("p2").unwrap(), Priority::P2);
    }
}
