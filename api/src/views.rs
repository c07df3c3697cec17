//! What the API returns: JSON views of the store's rows.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use trellis_store::circles::{CircleRow, MemberRow};
use trellis_store::contacts::ContactRow;
use trellis_store::disputes::DisputeRow;
use trellis_store::identity::{SessionRow, UserRow};
use utoipa::ToSchema;
use uuid::Uuid;

/// One page of a list; `next_cursor` is absent on the last page.
#[derive(Debug, Serialize, ToSchema)]
pub struct List<T: ToSchema> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// `?limit=&cursor=` of every list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// 1–100, default 50.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page of the same list (cursors are sealed: any other
    /// string is a 400).
    pub cursor: Option<String>,
}

/// The caller's own account.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub email: String,
    /// `user`, `moderator` or `admin`.
    pub role: String,
    /// `active` or `suspended`.
    pub status: String,
    pub verified: bool,
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<UserRow> for Me {
    fn from(u: UserRow) -> Self {
        Self {
            id: u.id,
            handle: u.handle,
            display_name: u.display_name,
            email: u.email,
            role: u.role.as_str().to_owned(),
            status: u.status.as_str().to_owned(),
            verified: u.verified,
            version: u.version,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}

/// One of the caller's sessions: a token that still authenticates (never the token itself).
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    /// When the token was issued (registration or sign-in).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it last authenticated a request, to within about two minutes (uses are written down
    /// in batches, at most once a minute per token).
    #[serde(with = "time::serde::rfc3339")]
    pub last_used_at: OffsetDateTime,
    /// When it stops working unless used before (`last_used_at` + `TOKEN_IDLE_TIMEOUT`), or at
    /// `expires_at`, whichever is first.
    #[serde(with = "time::serde::rfc3339")]
    pub idle_expires_at: OffsetDateTime,
    /// When it stops working however much it is used (`TOKEN_TTL` after it was issued).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The address of the client it was issued to, as the API saw it.
    pub client_address: Option<String>,
    /// Whether this is the token of the request that lists them.
    pub current: bool,
}

impl SessionView {
    pub fn new(row: SessionRow, idle_timeout: std::time::Duration) -> Self {
        Self {
            created_at: row.created_at,
            last_used_at: row.last_used_at,
            idle_expires_at: (row.last_used_at + idle_timeout).min(row.expires_at),
            expires_at: row.expires_at,
            client_address: row.client_addr,
            current: row.current,
        }
    }
}

/// What anyone signed in may see of a user.
#[derive(Debug, Serialize, ToSchema)]
pub struct PublicUser {
    pub id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub verified: bool,
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<UserRow> for PublicUser {
    fn from(u: UserRow) -> Self {
        Self {
            id: u.id,
            handle: u.handle,
            display_name: u.display_name,
            verified: u.verified,
            status: u.status.as_str().to_owned(),
            created_at: u.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Contact {
    pub user_id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub label: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<ContactRow> for Contact {
    fn from(c: ContactRow) -> Self {
        Self {
            user_id: c.contact_id,
            handle: c.handle,
            display_name: c.display_name,
            label: c.label,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Circle {
    pub id: Uuid,
    pub name: String,
    pub member_count: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<CircleRow> for Circle {
    fn from(c: CircleRow) -> Self {
        Self {
            id: c.id,
            name: c.name,
            member_count: c.member_count,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CircleMember {
    pub user_id: Uuid,
    pub handle: String,
    pub display_name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub added_at: OffsetDateTime,
}

impl From<MemberRow> for CircleMember {
    fn from(m: MemberRow) -> Self {
        Self { user_id: m.user_id, handle: m.handle, display_name: m.display_name, added_at: m.added_at }
    }
}

/// How a dispute was decided.
#[derive(Debug, Serialize, ToSchema)]
pub struct Decision {
    /// For moderators: the rule id (`R1`…`R5`) or `moderator`. For the reporter: `automatic`
    /// or `moderator` (a rule id would tell how many others reported the same user).
    pub rule: String,
    /// The rules' version (moderators only).
    pub rules_version: Option<String>,
    /// For moderators: human-readable reasons with the counts that decided it. For the
    /// reporter: one generic sentence about the outcome.
    #[schema(value_type = Object)]
    pub reasons: serde_json::Value,
    /// A moderator's note, shown to the reporter with the outcome.
    pub note: Option<String>,
    /// The deciding moderator; shown to moderators only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub decided_at: Option<OffsetDateTime>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Dispute {
    pub id: Uuid,
    pub reporter_id: Uuid,
    pub target_id: Uuid,
    pub kind: String,
    /// `P0` (most urgent) … `P3`.
    pub priority: String,
    /// `pending`, `upheld`, `dismissed` or `needs_review`.
    pub status: String,
    pub description: String,
    pub evidence: Option<String>,
    pub decision: Option<Decision>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// Whom a dispute is shown to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Its reporter: the outcome in generic words, not the counts that decided it.
    Reporter,
    /// A moderator or an admin who may moderate it: everything.
    Moderator,
}

impl Dispute {
    pub fn from_row(d: DisputeRow, audience: Audience) -> Self {
        let decision = d.decision_rule.map(|rule| match audience {
            Audience::Moderator => Decision {
                rule,
                rules_version: d.rules_version,
                reasons: d.decision_reasons.unwrap_or(serde_json::Value::Array(Vec::new())),
                note: d.decision_note,
                decided_by: d.decided_by,
                decided_at: d.decided_at,
            },
            Audience::Reporter => {
                let outcome = trellis_domain::adjudication::reporter_outcome(d.status, &rule);
                Decision {
                    rule: if d.decided_by.is_some() { "moderator" } else { "automatic" }.to_owned(),
                    rules_version: None,
                    reasons: serde_json::json!([outcome]),
                    note: d.decision_note,
                    decided_by: None,
                    decided_at: d.decided_at,
                }
            }
        });
        Self {
            id: d.id,
            reporter_id: d.reporter_id,
            target_id: d.target_id,
            kind: d.kind.as_str().to_owned(),
            priority: d.priority.as_str().to_owned(),
            status: d.status.as_str().to_owned(),
            description: d.description,
            evidence: d.evidence,
            decision,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}
