//! Auto-adjudication: the versioned rules that decide a dispute from facts, evaluated in order
//! R1 → R5; the first that applies decides. Pure: the store gathers the [`Facts`], this module
//! judges them, and the caller writes the [`Judgement`] with its effects.
//!
//! - **R1 duplicate**: when the reporter already has an earlier dispute of the same kind against the same target
//!   that is undecided, or was decided in the last 24 h; dismissed.
//! - **R2 invalid**: when the reporter is suspended, or the target already is ("moot"); dismissed.
//! - **R3 low credibility**: when the reporter's disputes filed in the last 90 days: ≥ 5 dismissed and 0 upheld;
//!   dismissed (P0: needs review).
//! - **R4 corroborated**: when ≥ 3 distinct reporters with score ≥ 400 filed (and were not dismissed) this kind
//!   against the target in the last 7 days, the target's score is < 300 or unscored, and the target is neither a
//!   moderator nor an admin; upheld, with the target's other undecided disputes of that kind.
//! - **R5 otherwise**: when none of the above; needs review (by an admin when the target is a moderator or an
//!   admin).
//!
//! Windows are inclusive of their edge: a dispute decided exactly 24 h ago is still "in the
//! last 24 h".
//!
//! **Moderation power.** Nothing upholds a dispute against a moderator or an admin
//! automatically: their power over others' disputes must not make them easier to silence, nor
//! let corroboration among users remove a moderator without an admin looking. Such a dispute
//! is still dismissed by R1–R3 (a dismissal never acts on its target); otherwise it goes to
//! review, where only admins see it. The role that counts is the target's role in the facts,
//! i.e. when the batch read them: a role granted after a dispute was filed protects the
//! target from then on, and a role taken away exposes them again.

use std::collections::BTreeSet;

use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::disputes::{DisputeKind, DisputeStatus, Priority};
use crate::identity::Role;

/// The version of these rules, stored with every automatic decision. Change it with the rules.
pub const RULES_VERSION: &str = "2026-12-04.1";

/// The `rule` of a moderator's decision (in its record, its event and the decision metrics).
pub const MODERATOR_RULE: &str = "moderator";

/// The `rules_version` of a moderator's decision.
pub const MANUAL_RULES_VERSION: &str = "manual";

/// R1: a decided duplicate counts for this long.
pub const DUPLICATE_WINDOW: Duration = Duration::hours(24);
/// R3: the reporter's record is read over this window.
pub const CREDIBILITY_WINDOW: Duration = Duration::days(90);
/// R3: this many dismissed disputes (with none upheld) make a reporter not credible.
pub const LOW_CREDIBILITY_DISMISSED: usize = 5;
/// R4: the window in which corroborating disputes count.
pub const CORROBORATION_WINDOW: Duration = Duration::days(7);
/// R4: distinct credible reporters needed.
pub const CORROBORATING_REPORTERS: usize = 3;
/// R4: a reporter's score must be at least this to corroborate.
pub const CREDIBLE_REPORTER_SCORE: i32 = 400;
/// R4: the target's score must be below this (or absent).
pub const TRUSTED_TARGET_SCORE: i32 = 300;

/// A rule id, as stored in `security.disputes.decision_rule` and used as the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    R1Duplicate,
    R2Invalid,
    R3LowCredibility,
    R4Corroborated,
    R5Otherwise,
}

impl Rule {
    pub const ALL: [Rule; 5] =
        [Rule::R1Duplicate, Rule::R2Invalid, Rule::R3LowCredibility, Rule::R4Corroborated, Rule::R5Otherwise];

    pub fn id(self) -> &'static str {
        match self {
            Rule::R1Duplicate => "R1",
            Rule::R2Invalid => "R2",
            Rule::R3LowCredibility => "R3",
            Rule::R4Corroborated => "R4",
            Rule::R5Otherwise => "R5",
        }
    }

    /// R1–R4 decide on their own; R5 hands the dispute to a moderator.
    pub fn is_automatic(self) -> bool {
        self != Rule::R5Otherwise
    }

    /// The rule of a stored id (`R1` … `R5`); `None` for a moderator's decision.
    pub fn parse(id: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.id() == id)
    }
}

/// One other dispute the rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Related {
    pub id: Uuid,
    pub reporter_id: Uuid,
    pub status: DisputeStatus,
    pub filed_at: OffsetDateTime,
    pub decided_at: Option<OffsetDateTime>,
    /// The reporter's score (only read for R4).
    pub reporter_score: Option<i32>,
}

/// Everything the rules need about one dispute. The lists may hold more than their windows
/// (the rules apply the windows exactly), but must hold at least what is inside them.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub dispute_id: Uuid,
    pub reporter_id: Uuid,
    /// Not read by the rules: a batch's earlier decisions suspend targets (see the processor's
    /// in-batch overlay).
    pub target_id: Uuid,
    pub kind: DisputeKind,
    pub filed_at: OffsetDateTime,
    /// When the rules are applied.
    pub now: OffsetDateTime,
    pub reporter_suspended: bool,
    pub target_suspended: bool,
    /// R4 and R5: a moderator's or an admin's disputes are never upheld automatically.
    pub target_role: Role,
    pub target_score: Option<i32>,
    /// R1: the reporter's other disputes of this kind against this target.
    pub same_reporter: Vec<Related>,
    /// R3: the reporter's other disputes, any kind and target.
    pub reporter_record: Vec<Related>,
    /// R4: the other disputes of this kind against this target, any reporter.
    pub against_target: Vec<Related>,
    /// R4: this dispute's reporter's score.
    pub reporter_score: Option<i32>,
}

/// What the rules decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub rule: Rule,
    pub status: DisputeStatus,
    /// Human-readable, with the counts that decided it.
    pub reasons: Vec<String>,
    /// R4: the other undecided disputes of this kind against the target, upheld with this one.
    pub also_upheld: Vec<Uuid>,
}

fn within(at: OffsetDateTime, now: OffsetDateTime, window: Duration) -> bool {
    at >= now - window
}

fn undecided(status: DisputeStatus) -> bool {
    !status.is_final()
}

/// Applies R1–R5 in order.
pub fn adjudicate(f: &Facts) -> Judgement {
    let judgement = |rule, status, reasons: Vec<String>| Judgement { rule, status, reasons, also_upheld: Vec::new() };
    let kind = f.kind.as_str();

    // R1: only earlier disputes count, so that of two filed together the second is the duplicate.
    let earlier = |r: &&Related| (r.filed_at, r.id) < (f.filed_at, f.dispute_id);
    let open = f.same_reporter.iter().filter(earlier).filter(|r| undecided(r.status)).count();
    let recent = f
        .same_reporter
        .iter()
        .filter(earlier)
        .filter(|r| r.status.is_final() && r.decided_at.is_some_and(|d| within(d, f.now, DUPLICATE_WINDOW)))
        .count();
    if open + recent > 0 {
        return judgement(
            Rule::R1Duplicate,
            DisputeStatus::Dismissed,
            vec![format!(
                "duplicate: you already filed {open} undecided and {recent} recently decided (last 24 h) {kind} \
                 dispute(s) against this user"
            )],
        );
    }

    // R2
    if f.reporter_suspended {
        return judgement(
            Rule::R2Invalid,
            DisputeStatus::Dismissed,
            vec!["invalid: the reporter's account is suspended".to_owned()],
        );
    }
    if f.target_suspended {
        return judgement(
            Rule::R2Invalid,
            DisputeStatus::Dismissed,
            vec!["moot: the disputed account is already suspended".to_owned()],
        );
    }

    // R3
    let record =
        f.reporter_record.iter().filter(|r| r.id != f.dispute_id && within(r.filed_at, f.now, CREDIBILITY_WINDOW));
    let (dismissed, upheld) = record.fold((0, 0), |(d, u), r| match r.status {
        DisputeStatus::Dismissed => (d + 1, u),
        DisputeStatus::Upheld => (d, u + 1),
        _ => (d, u),
    });
    if dismissed >= LOW_CREDIBILITY_DISMISSED && upheld == 0 {
        let record = format!(
            "low credibility: {dismissed} of the reporter's disputes filed in the last 90 days were dismissed and \
             {upheld} upheld"
        );
        return if f.kind.priority() == Priority::P0 {
            judgement(
                Rule::R3LowCredibility,
                DisputeStatus::NeedsReview,
                vec![record, "impersonation (P0) is never dismissed automatically: sent to a moderator".to_owned()],
            )
        } else {
            judgement(Rule::R3LowCredibility, DisputeStatus::Dismissed, vec![record])
        };
    }

    // R4
    let credible = |score: Option<i32>| score.is_some_and(|s| s >= CREDIBLE_REPORTER_SCORE);
    let corroborating = f
        .against_target
        .iter()
        .filter(|r| r.id != f.dispute_id)
        .filter(|r| r.status != DisputeStatus::Dismissed && within(r.filed_at, f.now, CORROBORATION_WINDOW))
        .filter(|r| credible(r.reporter_score))
        .map(|r| r.reporter_id);
    let mut reporters: BTreeSet<Uuid> = corroborating.collect();
    if credible(f.reporter_score) && within(f.filed_at, f.now, CORROBORATION_WINDOW) {
        reporters.insert(f.reporter_id);
    }
    let target_untrusted = f.target_score.is_none_or(|s| s < TRUSTED_TARGET_SCORE);
    let privileged = f.target_role.can_moderate();
    if reporters.len() >= CORROBORATING_REPORTERS && target_untrusted && !privileged {
        let also_upheld: Vec<Uuid> =
            f.against_target.iter().filter(|r| r.id != f.dispute_id && undecided(r.status)).map(|r| r.id).collect();
        let target = match f.target_score {
            Some(s) => format!("the disputed user's trust score is {s} (below {TRUSTED_TARGET_SCORE})"),
            None => "the disputed user has no trust score".to_owned(),
        };
        let mut reasons = vec![
            format!(
                "corroborated: {} distinct reporters with a trust score of at least {CREDIBLE_REPORTER_SCORE} filed \
                 {kind} disputes against this user in the last 7 days",
                reporters.len()
            ),
            target,
        ];
        if !also_upheld.is_empty() {
            reasons.push(format!(
                "{} other undecided {kind} dispute(s) against this user upheld with it",
                also_upheld.len()
            ));
        }
        return Judgement { rule: Rule::R4Corroborated, status: DisputeStatus::Upheld, reasons, also_upheld };
    }

    let target = match f.target_score {
        Some(s) => format!("target score {s}"),
        None => "target unscored".to_owned(),
    };
    let mut reasons = vec![format!(
        "needs review: no rule decided it ({} credible reporter(s) in the last 7 days, {target}; reporter record \
         {dismissed} dismissed / {upheld} upheld in 90 days)",
        reporters.len()
    )];
    if privileged {
        reasons.push(format!(
            "the disputed user is {} {}: no rule upholds it, and only an admin reviews it",
            if f.target_role == Role::Admin { "an" } else { "a" },
            f.target_role.as_str()
        ));
    }
    judgement(Rule::R5Otherwise, DisputeStatus::NeedsReview, reasons)
}

/// What a dispute's reporter is told about its outcome, instead of the decision's reasons: the
/// reasons carry the counts that decided (how many others reported the same user, with which
/// scores), and so does the rule id (R4 means "at least three credible reporters"). `rule` is
/// the stored rule id, or `moderator`.
pub fn reporter_outcome(status: DisputeStatus, rule: &str) -> &'static str {
    match (status, Rule::parse(rule)) {
        (DisputeStatus::Pending, _) => "waiting for a decision",
        (DisputeStatus::NeedsReview, _) => "under review: a person will decide it",
        (DisputeStatus::Dismissed, Some(Rule::R1Duplicate)) => {
            "dismissed: you already filed a dispute of this kind against this user"
        }
        (DisputeStatus::Dismissed, Some(Rule::R2Invalid)) => {
            "dismissed: the dispute could not be acted on (your account or the disputed account is suspended)"
        }
        (DisputeStatus::Dismissed, Some(Rule::R3LowCredibility)) => {
            "dismissed automatically, given how your earlier disputes were decided"
        }
        (DisputeStatus::Dismissed, _) => "dismissed",
        (DisputeStatus::Upheld, None) => "upheld after review",
        (DisputeStatus::Upheld, Some(_)) => "upheld",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(now: OffsetDateTime, ago: Duration) -> OffsetDateTime {
        now - ago
    }

    const NOW: OffsetDateTime = time::macros::datetime!(2026-11-25 12:00 UTC);
    const SEC: Duration = Duration::SECOND;

    fn me() -> Uuid {
        Uuid::from_u128(1)
    }

    fn facts(kind: DisputeKind) -> Facts {
        Facts {
            dispute_id: Uuid::from_u128(1_000),
            reporter_id: me(),
            target_id: Uuid::from_u128(2),
            kind,
            filed_at: NOW - Duration::minutes(1),
            now: NOW,
            reporter_suspended: false,
            target_suspended: false,
            target_role: Role::User,
            target_score: None,
            same_reporter: Vec::new(),
            reporter_record: Vec::new(),
            against_target: Vec::new(),
            reporter_score: None,
        }
    }

    fn related(n: u128, status: DisputeStatus, filed_ago: Duration) -> Related {
        Related {
            id: Uuid::from_u128(n),
            reporter_id: me(),
            status,
            filed_at: at(NOW, filed_ago),
            decided_at: status.is_final().then(|| at(NOW, filed_ago)),
            reporter_score: None,
        }
    }

    fn record(dismissed: usize, upheld: usize, ago: Duration) -> Vec<Related> {
        let d = (0..dismissed).map(|i| related(10 + i as u128, DisputeStatus::Dismissed, ago));
        let u = (0..upheld).map(|i| related(100 + i as u128, DisputeStatus::Upheld, ago));
        d.chain(u).collect()
    }

    /// `n` distinct reporters with `score`, each filing `status` `ago`.
    fn reporters(n: usize, score: Option<i32>, status: DisputeStatus, ago: Duration) -> Vec<Related> {
        (0..n)
            .map(|i| Related {
                id: Uuid::from_u128(200 + i as u128),
                reporter_id: Uuid::from_u128(300 + i as u128),
                reporter_score: score,
                ..related(0, status, ago)
            })
            .collect()
    }

    type Case = (&'static str, Facts, Rule, DisputeStatus);

    fn cases() -> Vec<Case> {
        use DisputeKind::*;
        use DisputeStatus::*;
        let f = facts;
        let with = |kind, change: &dyn Fn(&mut Facts)| {
            let mut x = f(kind);
            change(&mut x);
            x
        };
        let day = Duration::DAY;
        vec![
            ("nothing known", f(Spam), Rule::R5Otherwise, NeedsReview),
            // R1
            (
                "R1 earlier pending",
                with(Spam, &|x| x.same_reporter = vec![related(1, Pending, day * 30)]),
                Rule::R1Duplicate,
                Dismissed,
            ),
            (
                "R1 earlier in review",
                with(Spam, &|x| x.same_reporter = vec![related(1, NeedsReview, day * 30)]),
                Rule::R1Duplicate,
                Dismissed,
            ),
            (
                "R1 decided 24h ago exactly",
                with(Spam, &|x| x.same_reporter = vec![related(1, Upheld, day)]),
                Rule::R1Duplicate,
                Dismissed,
            ),
            (
                "R1 decided 24h+1s ago",
                with(Spam, &|x| x.same_reporter = vec![related(1, Dismissed, day + SEC)]),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R1 later pending does not count",
                with(Spam, &|x| {
                    let mut later = related(5_000, Pending, Duration::ZERO);
                    later.filed_at = x.filed_at + SEC;
                    x.same_reporter = vec![later];
                }),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R1 beats R2",
                with(Spam, &|x| {
                    x.same_reporter = vec![related(1, Pending, day)];
                    x.reporter_suspended = true;
                }),
                Rule::R1Duplicate,
                Dismissed,
            ),
            // R2
            (
                "R2 reporter suspended",
                with(Impersonation, &|x| x.reporter_suspended = true),
                Rule::R2Invalid,
                Dismissed,
            ),
            ("R2 target suspended", with(Harassment, &|x| x.target_suspended = true), Rule::R2Invalid, Dismissed),
            // R3
            ("R3 4 dismissed", with(Spam, &|x| x.reporter_record = record(4, 0, day)), Rule::R5Otherwise, NeedsReview),
            (
                "R3 5 dismissed",
                with(Spam, &|x| x.reporter_record = record(5, 0, day)),
                Rule::R3LowCredibility,
                Dismissed,
            ),
            (
                "R3 5 dismissed 1 upheld",
                with(Spam, &|x| x.reporter_record = record(5, 1, day)),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R3 5 dismissed, P0 goes to review",
                with(Impersonation, &|x| x.reporter_record = record(5, 0, day)),
                Rule::R3LowCredibility,
                NeedsReview,
            ),
            (
                "R3 90 d edge inside",
                with(IncorrectInfo, &|x| x.reporter_record = record(5, 0, day * 90)),
                Rule::R3LowCredibility,
                Dismissed,
            ),
            (
                "R3 90 d edge outside",
                with(IncorrectInfo, &|x| x.reporter_record = record(5, 0, day * 90 + SEC)),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R3 upheld outside the window",
                with(Spam, &|x| {
                    x.reporter_record = record(5, 0, day);
                    x.reporter_record.extend(record(0, 1, day * 91));
                }),
                Rule::R3LowCredibility,
                Dismissed,
            ),
            (
                "R3 pending ones do not count",
                with(Spam, &|x| {
                    x.reporter_record = record(4, 0, day);
                    x.reporter_record.push(related(50, Pending, day));
                }),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            // R4: this reporter plus others
            (
                "R4 2 others + me at 400, target unscored",
                with(Harassment, &|x| {
                    x.reporter_score = Some(400);
                    x.against_target = reporters(2, Some(400), Pending, day);
                }),
                Rule::R4Corroborated,
                Upheld,
            ),
            (
                "R4 1 other + me: 2 reporters",
                with(Harassment, &|x| {
                    x.reporter_score = Some(900);
                    x.against_target = reporters(1, Some(900), Pending, day);
                }),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R4 3 others at 399",
                with(Spam, &|x| x.against_target = reporters(3, Some(399), Pending, day)),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R4 3 others at 400, I am unscored",
                with(Spam, &|x| x.against_target = reporters(3, Some(400), Pending, day)),
                Rule::R4Corroborated,
                Upheld,
            ),
            (
                "R4 same reporter twice counts once",
                with(Spam, &|x| {
                    let mut two = reporters(2, Some(500), Pending, day);
                    two[1].reporter_id = two[0].reporter_id;
                    x.against_target = two;
                    x.reporter_score = Some(500);
                }),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R4 target 299",
                with(Spam, &|x| {
                    x.against_target = reporters(3, Some(500), Pending, day);
                    x.target_score = Some(299);
                }),
                Rule::R4Corroborated,
                Upheld,
            ),
            (
                "R4 target 300",
                with(Spam, &|x| {
                    x.against_target = reporters(3, Some(500), Pending, day);
                    x.target_score = Some(300);
                }),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R4 7 d edge inside",
                with(Spam, &|x| x.against_target = reporters(3, Some(500), Upheld, day * 7)),
                Rule::R4Corroborated,
                Upheld,
            ),
            (
                "R4 7 d edge outside",
                with(Spam, &|x| x.against_target = reporters(3, Some(500), Upheld, day * 7 + SEC)),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R4 dismissed ones do not corroborate",
                with(Spam, &|x| x.against_target = reporters(3, Some(500), Dismissed, day)),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R4 unscored reporters do not count",
                with(Spam, &|x| x.against_target = reporters(3, None, Pending, day)),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R3 beats R4",
                with(Spam, &|x| {
                    x.reporter_record = record(5, 0, day);
                    x.against_target = reporters(3, Some(500), Pending, day);
                }),
                Rule::R3LowCredibility,
                Dismissed,
            ),
            (
                "R2 moot beats R4",
                with(Impersonation, &|x| {
                    x.target_suspended = true;
                    x.against_target = reporters(3, Some(500), Pending, day);
                }),
                Rule::R2Invalid,
                Dismissed,
            ),
            // A moderator's or an admin's disputes: never upheld by the rules, still dismissed
            (
                "R4 does not uphold against a moderator",
                with(Harassment, &|x| {
                    x.target_role = Role::Moderator;
                    x.against_target = reporters(3, Some(500), Pending, day);
                }),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R4 does not uphold against an admin",
                with(Impersonation, &|x| {
                    x.target_role = Role::Admin;
                    x.reporter_score = Some(900);
                    x.against_target = reporters(5, Some(900), Upheld, day);
                }),
                Rule::R5Otherwise,
                NeedsReview,
            ),
            (
                "R1 still dismisses against a moderator",
                with(Spam, &|x| {
                    x.target_role = Role::Moderator;
                    x.same_reporter = vec![related(1, Pending, day)];
                }),
                Rule::R1Duplicate,
                Dismissed,
            ),
            (
                "R3 still dismisses against an admin",
                with(Spam, &|x| {
                    x.target_role = Role::Admin;
                    x.reporter_record = record(5, 0, day);
                }),
                Rule::R3LowCredibility,
                Dismissed,
            ),
        ]
    }

    #[test]
    fn every_rule_and_its_boundaries() {
        for (name, facts, rule, status) in cases() {
            let j = adjudicate(&facts);
            assert_eq!((j.rule, j.status), (rule, status), "{name}: {:?}", j.reasons);
            assert!(!j.reasons.is_empty(), "{name}: a decision always has reasons");
        }
    }

    #[test]
    fn reasons_carry_the_counts() {
        let mut f = facts(DisputeKind::Spam);
        f.reporter_record = record(6, 0, Duration::DAY);
        let j = adjudicate(&f);
        assert!(j.reasons[0].contains("6 of the reporter's disputes") && j.reasons[0].contains("0 upheld"), "{j:?}");
        let mut f = facts(DisputeKind::Impersonation);
        f.target_suspended = true;
        assert!(adjudicate(&f).reasons[0].starts_with("moot"));
    }

    #[test]
    fn r4_upholds_the_other_undecided_disputes_of_the_kind() {
        let mut f = facts(DisputeKind::Harassment);
        f.against_target = reporters(4, Some(600), DisputeStatus::Pending, Duration::HOUR);
        f.against_target[1].status = DisputeStatus::NeedsReview;
        f.against_target[2].status = DisputeStatus::Upheld;
        f.against_target[3].filed_at = NOW - Duration::days(30); // too old to corroborate, still undecided
        let j = adjudicate(&f);
        assert_eq!(j.rule, Rule::R4Corroborated);
        let ids = |ns: &[u128]| ns.iter().map(|n| Uuid::from_u128(*n)).collect::<Vec<_>>();
        assert_eq!(j.also_upheld, ids(&[200, 201, 203]));
        assert!(j.reasons[0].contains("3 distinct reporters"), "{j:?}");
    }

    #[test]
    fn a_review_of_a_privileged_target_says_why_no_rule_upheld_it() {
        let mut f = facts(DisputeKind::Harassment);
        f.target_role = Role::Moderator;
        f.against_target = reporters(3, Some(500), DisputeStatus::Pending, Duration::HOUR);
        let j = adjudicate(&f);
        assert_eq!(j.also_upheld, Vec::<Uuid>::new());
        assert!(j.reasons[1].contains("a moderator") && j.reasons[1].contains("only an admin"), "{j:?}");
        f.target_role = Role::User;
        assert_eq!(adjudicate(&f).rule, Rule::R4Corroborated, "the same facts against a user uphold it");
    }

    #[test]
    fn the_reporter_outcome_never_carries_a_count() {
        for status in DisputeStatus::ALL {
            for rule in Rule::ALL.iter().map(|r| r.id()).chain(["moderator"]) {
                let outcome = reporter_outcome(status, rule);
                assert!(!outcome.chars().any(|c| c.is_ascii_digit()), "{status:?} {rule}: {outcome}");
            }
        }
        assert_eq!(reporter_outcome(DisputeStatus::Upheld, "R4"), "upheld");
        assert_eq!(reporter_outcome(DisputeStatus::Upheld, "moderator"), "upheld after review");
    }

    #[test]
    fn only_r5_is_not_automatic() {
        let automatic: Vec<_> = Rule::ALL.into_iter().filter(|r| r.is_automatic()).map(Rule::id).collect();
        assert_eq!(automatic, ["R1", "R2", "R3", "R4"]);
    }
}
