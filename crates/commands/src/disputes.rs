//! Disputes: filing one, a moderator's decision, and what every decision does.
//!
//! A decision is made by the dispute processor (the adjudication rules, a batch at a time) or
//! by a moderator ([`moderate`]); both record it and then call [`apply_decision`], the one path
//! of its effects (an upheld dispute's suspension with its token revocation and audit row, or
//! the hiding of a spammer) and its events.

use std::time::Duration;

use sqlx::PgConnection;
use time::OffsetDateTime;
use trellis_domain::adjudication::{MANUAL_RULES_VERSION, MODERATOR_RULE};
use trellis_domain::disputes::{Description, DisputeKind, DisputeStatus, Priority, Verdict, may_moderate};
use trellis_domain::events::{DisputeDecided, DisputeFiled, EventPayload};
use trellis_domain::identity::Role;
use trellis_domain::{DisputeId, UserId};
use trellis_store::disputes::{Decision, DisputeRow, NewDispute};
use trellis_store::user_admin::{Actor, DISPUTE_PROCESSOR};

use crate::Emitted;

/// A dispute to file: its target resolved and its text validated.
#[derive(Debug, Clone, Copy)]
pub struct Filing<'a> {
    pub id: DisputeId,
    pub reporter: UserId,
    pub target: UserId,
    pub kind: DisputeKind,
    pub description: &'a Description,
    /// Links or text backing the dispute, trimmed, at most 2,000 characters.
    pub evidence: Option<&'a str>,
}

/// How much one reporter may file.
#[derive(Debug, Clone, Copy)]
pub struct FilingLimits {
    /// Open (pending or needs-review) disputes a reporter may have.
    pub open: i64,
    /// Of which at P0.
    pub open_p0: i64,
    /// How old a reporter's account must be to file at P0 (an impersonation dispute jumps
    /// every queue and can suspend its target).
    pub p0_min_account_age: Duration,
}

/// Why a dispute was not filed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("a dispute against oneself")]
    AgainstSelf,
    #[error("the reporter is unknown")]
    UnknownReporter,
    #[error("the reporter's account is younger than {0:?}, the minimum to file at P0")]
    AccountTooNew(Duration),
    /// The reporter has `open` open disputes (at P0 when `p0`), the most they may have.
    #[error("the reporter has {open} open disputes{}", if *.p0 { " at P0" } else { "" })]
    OpenLimit { open: i64, p0: bool },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Files a dispute: `disputes.filed`, on its priority's subject, caused by the reporter.
/// Concurrent filings of one reporter are counted one after another (under a lock on the
/// reporter), so the limits hold exactly.
pub async fn file(
    tx: &mut PgConnection,
    f: &Filing<'_>,
    limits: &FilingLimits,
) -> Result<Emitted<DisputeRow>, FileError> {
    if f.target == f.reporter {
        return Err(FileError::AgainstSelf);
    }
    let p0 = f.kind.priority() == Priority::P0;
    if p0 {
        let reporter =
            trellis_store::identity::find_by_id(&mut *tx, f.reporter).await?.ok_or(FileError::UnknownReporter)?;
        if OffsetDateTime::now_utc() - reporter.created_at < limits.p0_min_account_age {
            return Err(FileError::AccountTooNew(limits.p0_min_account_age));
        }
    }
    let open = trellis_store::disputes::lock_and_count_open(&mut *tx, f.reporter).await?;
    if p0 && open.p0 >= limits.open_p0 {
        return Err(FileError::OpenLimit { open: open.p0, p0: true });
    }
    if open.all >= limits.open {
        return Err(FileError::OpenLimit { open: open.all, p0: false });
    }
    let new = NewDispute {
        id: f.id,
        reporter: f.reporter,
        target: f.target,
        kind: f.kind,
        description: f.description.as_str(),
        evidence: f.evidence,
    };
    let row = trellis_store::disputes::insert(tx, &new).await?;
    let payload = EventPayload::DisputeFiled(DisputeFiled {
        dispute_id: f.id,
        reporter_id: f.reporter,
        target_id: f.target,
        kind: f.kind,
        priority: f.kind.priority(),
    });
    Ok(Emitted::new(row).with(&payload, Some(f.reporter), OffsetDateTime::now_utc()))
}

/// Who decided a dispute.
#[derive(Debug, Clone, Copy)]
pub enum DecidedBy<'a> {
    /// An adjudication rule (its id).
    Rule(&'a str),
    /// A moderator or an admin.
    Moderator { id: UserId, handle: &'a str },
}

impl DecidedBy<'_> {
    /// The decision's `rule`: the rule's id, or [`MODERATOR_RULE`].
    pub fn rule(&self) -> &str {
        match self {
            DecidedBy::Rule(id) => id,
            DecidedBy::Moderator { .. } => MODERATOR_RULE,
        }
    }

    fn user(&self) -> Option<UserId> {
        match self {
            DecidedBy::Rule(_) => None,
            DecidedBy::Moderator { id, .. } => Some(*id),
        }
    }
}

/// A decision its decider has recorded.
#[derive(Debug, Clone, Copy)]
pub struct Decided<'a> {
    pub dispute: DisputeId,
    pub target: UserId,
    pub kind: DisputeKind,
    pub status: DisputeStatus,
    pub by: DecidedBy<'a>,
}

/// What a recorded decision does, the same for a rule's and a moderator's: `disputes.decided`,
/// and for an upheld dispute its effects on the target. Impersonation and harassment suspend
/// the target and revoke their tokens (audited, the decider as the actor; with
/// `identity.user_suspended`), spam hides them from directory search, incorrect information
/// has no effect beyond the decision. The caller holds the target's row lock, under which it
/// checked that this decider may decide against them.
pub async fn apply_decision(tx: &mut PgConnection, d: &Decided<'_>) -> Result<Emitted, sqlx::Error> {
    let decided = EventPayload::DisputeDecided(DisputeDecided {
        dispute_id: d.dispute,
        target_id: d.target,
        kind: d.kind,
        status: d.status,
        rule: d.by.rule().to_owned(),
        decided_by: d.by.user(),
    });
    let mut emitted = Emitted::none().with(&decided, d.by.user(), OffsetDateTime::now_utc());
    if d.status != DisputeStatus::Upheld {
        return Ok(emitted);
    }
    if d.kind.suspends_target() {
        let (actor, why) = match d.by {
            DecidedBy::Rule(rule) => (
                Actor { name: DISPUTE_PROCESSOR, user_id: None },
                format!("upheld {} dispute {} (rule {rule})", d.kind.as_str(), d.dispute),
            ),
            DecidedBy::Moderator { id, handle } => (
                Actor { name: handle, user_id: Some(id) },
                format!("upheld {} dispute {} (by a moderator)", d.kind.as_str(), d.dispute),
            ),
        };
        emitted.absorb(crate::users::suspend(tx, d.target, &actor, &why, d.dispute, d.kind).await?);
    } else if d.kind == DisputeKind::Spam {
        trellis_store::disputes::hide_target(tx, d.target, d.dispute).await?;
    }
    Ok(emitted)
}

/// The moderator or admin deciding.
#[derive(Debug, Clone, Copy)]
pub struct Moderator {
    pub id: UserId,
    pub role: Role,
}

/// Why a moderator's decision was not made.
#[derive(Debug, thiserror::Error)]
pub enum ModerateError {
    /// No such dispute, or one the moderator may not moderate (against themselves, or against
    /// a moderator or an admin unless they are an admin): it does not exist for them.
    #[error("no such dispute")]
    NotFound,
    #[error("moderators cannot decide disputes they filed")]
    OwnFiling,
    #[error("this dispute was already {}", .0.as_str())]
    AlreadyDecided(DisputeStatus),
    #[error("the moderator's account is gone")]
    UnknownModerator,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A moderator's decision on a pending or needs-review dispute, with `note` (shown to the
/// reporter), and what it does ([`apply_decision`]). The dispute's row is locked, then its
/// target's: their role cannot change before the decision commits.
pub async fn moderate(
    tx: &mut PgConnection,
    moderator: Moderator,
    dispute: DisputeId,
    verdict: Verdict,
    note: &str,
) -> Result<Emitted<DisputeRow>, ModerateError> {
    let current = trellis_store::disputes::get_for_update(&mut *tx, dispute).await?.ok_or(ModerateError::NotFound)?;
    if current.reporter_id == moderator.id.0 {
        return Err(ModerateError::OwnFiling);
    }
    let target = UserId(current.target_id);
    let locked = trellis_store::user_admin::lock(&mut *tx, target).await?.ok_or(ModerateError::NotFound)?;
    if !may_moderate(moderator.id, moderator.role, target, locked.role) {
        return Err(ModerateError::NotFound);
    }
    if current.status.is_final() {
        return Err(ModerateError::AlreadyDecided(current.status));
    }
    let decision = Decision {
        status: verdict.status(),
        rule: MODERATOR_RULE,
        reasons: serde_json::json!([format!("decided by a moderator: {note}")]),
        rules_version: MANUAL_RULES_VERSION,
        decided_by: Some(moderator.id),
        note: Some(note),
    };
    let row = trellis_store::disputes::record_decision(&mut *tx, dispute, &decision).await?;
    let handle = trellis_store::identity::find_by_id(&mut *tx, moderator.id)
        .await?
        .ok_or(ModerateError::UnknownModerator)?
        .handle;
    let decided = Decided {
        dispute,
        target,
        kind: current.kind,
        status: verdict.status(),
        by: DecidedBy::Moderator { id: moderator.id, handle: &handle },
    };
    let effects = apply_decision(tx, &decided).await?;
    let mut emitted = Emitted::new(row);
    emitted.absorb(effects);
    Ok(emitted)
}
