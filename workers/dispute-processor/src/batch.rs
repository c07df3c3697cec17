//! Judging a batch one dispute after another, each seeing the decisions made before it in the
//! batch: the in-batch overlay. The processor runs it with the database (it locks the disputes
//! a judgement upholds with its own, and applies the effects); its shadow candidate replays a
//! batch of the primary's with the same code, so the two cannot disagree about what a decision
//! earlier in a batch changes for the later ones.

use std::collections::{HashMap, HashSet};

use time::OffsetDateTime;
use trellis_domain::adjudication::{self, Facts, Judgement, RULES_VERSION};
use trellis_domain::disputes::DisputeStatus;
use trellis_store::disputes::AutoDecision;
use uuid::Uuid;

/// A rule set: the function that judges facts and the version recorded with its decisions. The
/// processor decides with [`JudgingRules::PRODUCTION`]; a shadow candidate may be given another.
#[derive(Debug, Clone, Copy)]
pub struct JudgingRules {
    pub version: &'static str,
    pub judge: fn(&Facts) -> Judgement,
}

impl JudgingRules {
    /// R1–R5 (`trellis_domain::adjudication`).
    pub const PRODUCTION: JudgingRules = JudgingRules { version: RULES_VERSION, judge: adjudication::adjudicate };
}

/// What a batch has decided so far.
#[derive(Default)]
pub(crate) struct Batch {
    decided: HashMap<Uuid, (DisputeStatus, OffsetDateTime)>,
    suspended: HashSet<Uuid>,
    pub decisions: Vec<AutoDecision>,
}

impl Batch {
    pub fn has_decided(&self, id: Uuid) -> bool {
        self.decided.contains_key(&id)
    }

    /// Judges facts read before the batch's decisions as if its earlier decisions had been
    /// committed when they were read (exactly as one at a time); returns them overlaid.
    pub fn judge(&self, mut f: Facts, rules: &JudgingRules) -> (Facts, Judgement) {
        self.overlay(&mut f);
        let judgement = (rules.judge)(&f);
        (f, judgement)
    }

    /// The disputes `judgement` upholds with its own that the batch has not decided yet: the
    /// caller locks them (another transaction may hold some) before [`Self::record`].
    pub fn co_upheld(&self, judgement: &Judgement) -> Vec<Uuid> {
        judgement.also_upheld.iter().copied().filter(|id| !self.has_decided(*id)).collect()
    }

    /// Records the judgement of `f`'s dispute, and of the co-upheld disputes the caller
    /// `locked`; returns every dispute it decided, the judged one first.
    pub fn record(&mut self, f: &Facts, judgement: &Judgement, locked: &[Uuid]) -> Vec<Uuid> {
        let reasons = serde_json::json!(judgement.reasons);
        let decided: Vec<Uuid> = std::iter::once(f.dispute_id).chain(locked.iter().copied()).collect();
        for id in &decided {
            self.decided.insert(*id, (judgement.status, f.now));
            self.decisions.push(AutoDecision {
                id: *id,
                status: judgement.status,
                rule: judgement.rule.id(),
                reasons: reasons.clone(),
            });
        }
        if judgement.status == DisputeStatus::Upheld && f.kind.suspends_target() {
            self.suspended.insert(f.target_id);
        }
        decided
    }

    /// Applies the batch's earlier decisions to facts read before them: the status of the
    /// disputes they decided, and the users they suspended (reporter or target).
    fn overlay(&self, f: &mut Facts) {
        let lists = [&mut f.same_reporter, &mut f.reporter_record, &mut f.against_target];
        for list in lists {
            for r in list.iter_mut() {
                if let Some((status, at)) = self.decided.get(&r.id) {
                    r.status = *status;
                    r.decided_at = Some(*at);
                }
            }
        }
        f.reporter_suspended |= self.suspended.contains(&f.reporter_id);
        f.target_suspended |= self.suspended.contains(&f.target_id);
    }
}

/// Replays a batch of the primary's with `rules`: `order` is the order its decisions were made
/// in, `facts` what its facts statement read, `lockable` whether the primary could have locked
/// a dispute a judgement upholds with its own. Returns every decision, in the order made.
pub(crate) fn replay(
    order: &[Uuid],
    mut facts: HashMap<Uuid, Facts>,
    lockable: impl Fn(Uuid) -> bool,
    rules: &JudgingRules,
) -> Vec<AutoDecision> {
    let mut batch = Batch::default();
    for id in order {
        if batch.has_decided(*id) {
            continue; // upheld with an earlier one of the batch (R4)
        }
        let Some(f) = facts.remove(id) else { continue };
        let (f, judgement) = batch.judge(f, rules);
        let locked: Vec<Uuid> = batch.co_upheld(&judgement).into_iter().filter(|o| lockable(*o)).collect();
        batch.record(&f, &judgement, &locked);
    }
    batch.decisions
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;
    use trellis_domain::adjudication::{Related, Rule};
    use trellis_domain::disputes::DisputeKind;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-11-25 12:00 UTC);

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn facts(dispute: u128, reporter: u128, target: u128, kind: DisputeKind) -> Facts {
        Facts {
            dispute_id: id(dispute),
            reporter_id: id(reporter),
            target_id: id(target),
            kind,
            filed_at: NOW - time::Duration::minutes(10) + time::Duration::seconds(dispute as i64),
            now: NOW,
            reporter_suspended: false,
            target_suspended: false,
            target_role: trellis_domain::identity::Role::User,
            target_score: None,
            same_reporter: Vec::new(),
            reporter_record: Vec::new(),
            against_target: Vec::new(),
            reporter_score: Some(500),
        }
    }

    fn pending(dispute: u128, reporter: u128) -> Related {
        Related {
            id: id(dispute),
            reporter_id: id(reporter),
            status: DisputeStatus::Pending,
            filed_at: NOW - time::Duration::minutes(10) + time::Duration::seconds(dispute as i64),
            decided_at: None,
            reporter_score: Some(500),
        }
    }

    /// An upheld impersonation earlier in a batch suspends its target for the later disputes of
    /// the batch: a harassment dispute against the same user, judged after it, is moot (R2), as
    /// it would be one at a time.
    #[test]
    fn an_earlier_suspension_in_the_batch_makes_a_later_dispute_against_the_target_moot() {
        let target = 90;
        let mut first = facts(1, 11, target, DisputeKind::Impersonation);
        first.against_target = vec![pending(2, 12), pending(3, 13)];
        let mut second = facts(2, 12, target, DisputeKind::Impersonation);
        second.against_target = vec![pending(1, 11), pending(3, 13)];
        let third = facts(4, 14, target, DisputeKind::Harassment);
        let order = [id(1), id(2), id(4)];
        let all = HashMap::from([(id(1), first), (id(2), second), (id(4), third)]);

        let decisions = replay(&order, all, |_| true, &JudgingRules::PRODUCTION);
        let got: Vec<(Uuid, DisputeStatus, &str)> = decisions.iter().map(|d| (d.id, d.status, d.rule)).collect();
        assert_eq!(
            got,
            [
                (id(1), DisputeStatus::Upheld, Rule::R4Corroborated.id()),
                (id(2), DisputeStatus::Upheld, Rule::R4Corroborated.id()),
                (id(3), DisputeStatus::Upheld, Rule::R4Corroborated.id()),
                (id(4), DisputeStatus::Dismissed, Rule::R2Invalid.id()),
            ],
            "2 and 3 are upheld with 1 (2 is not judged again); 4 sees the suspension"
        );
        assert_eq!(decisions[3].reasons, serde_json::json!(["moot: the disputed account is already suspended"]));
    }

    /// A dispute the primary could not lock (another transaction held it) is not decided with
    /// the one that upholds it, and stays undecided for the rest of the batch.
    #[test]
    fn a_co_upheld_dispute_another_transaction_held_is_left_out() {
        let mut first = facts(1, 11, 90, DisputeKind::Spam);
        first.against_target = vec![pending(2, 12), pending(3, 13)];
        let decisions = replay(&[id(1)], HashMap::from([(id(1), first)]), |o| o != id(3), &JudgingRules::PRODUCTION);
        let got: Vec<Uuid> = decisions.iter().map(|d| d.id).collect();
        assert_eq!(got, [id(1), id(2)]);
    }
}
