//! Shadow parity (Stage B): while a cutover flag says `shadow`, the candidate side processes a
//! copy of the processor's input into shadow tables, and each of its outputs is compared with
//! the primary's output for the same input. This module holds what every processor shares:
//! the comparison of two outputs field by field, the tally of comparisons and the promotion
//! gate that reads it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::flags::Flag;
use crate::validation::FieldError;

/// The processor a comparison is about: the metric label and `trellisctl parity`'s argument.
pub fn processor(flag: Flag) -> &'static str {
    match flag {
        Flag::ScoreExecutor => "score",
        Flag::SearchExecutor => "search",
        Flag::DisputeExecutor => "dispute",
    }
}

/// The flag of a processor named as [`processor`] names it.
pub fn parse_processor(raw: &str) -> Result<Flag, FieldError> {
    Flag::ALL.into_iter().find(|f| processor(*f) == raw).ok_or_else(|| {
        FieldError::new(
            "processor",
            "unknown_processor",
            format!("unknown processor {raw:?}: one of score, search, dispute"),
        )
    })
}

/// What one comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComparisonResult {
    /// Both sides produced an output for the input, and the outputs are equal.
    Matched,
    /// Both sides produced an output for the input, and they differ.
    Mismatched,
    /// Only one side produced an output for the input within the processor's deadline.
    Missing,
}

impl ComparisonResult {
    pub const ALL: [ComparisonResult; 3] =
        [ComparisonResult::Matched, ComparisonResult::Mismatched, ComparisonResult::Missing];

    pub fn as_str(self) -> &'static str {
        match self {
            ComparisonResult::Matched => "matched",
            ComparisonResult::Mismatched => "mismatched",
            ComparisonResult::Missing => "missing",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        ComparisonResult::ALL.into_iter().find(|v| v.as_str() == raw)
    }
}

/// One field on which the outputs differ (`field` is a dotted path into the output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldDiff {
    pub field: String,
    pub primary: Value,
    pub candidate: Value,
}

/// The comparison of one input's outputs, or a record standing for `count` matched inputs (the
/// score orchestrator compares a whole run's users at once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// What the input was (a dispute id, a document, a run): how an operator finds it.
    pub key: String,
    pub result: ComparisonResult,
    pub count: i64,
    /// The fields that differ (mismatched), or why one output is missing.
    pub diffs: Vec<FieldDiff>,
}

impl Comparison {
    /// Compares two outputs of the same input: matched when equal, otherwise mismatched with
    /// every differing field.
    pub fn of(key: impl Into<String>, primary: &Value, candidate: &Value) -> Self {
        let diffs = field_diffs(primary, candidate);
        let result = if diffs.is_empty() { ComparisonResult::Matched } else { ComparisonResult::Mismatched };
        Comparison { key: key.into(), result, count: 1, diffs }
    }

    /// An input only `side` produced an output for.
    pub fn missing(key: impl Into<String>, why: impl Into<String>) -> Self {
        Comparison {
            key: key.into(),
            result: ComparisonResult::Missing,
            count: 1,
            diffs: vec![FieldDiff {
                field: "output".into(),
                primary: Value::Null,
                candidate: Value::String(why.into()),
            }],
        }
    }
}

/// The fields on which `primary` and `candidate` differ: objects are compared key by key
/// (recursively, with dotted paths), anything else as a whole. Numbers compare by value, so
/// `1` and `1.0` are equal.
pub fn field_diffs(primary: &Value, candidate: &Value) -> Vec<FieldDiff> {
    let mut diffs = Vec::new();
    walk("", primary, candidate, &mut diffs);
    diffs
}

fn walk(path: &str, primary: &Value, candidate: &Value, diffs: &mut Vec<FieldDiff>) {
    match (primary, candidate) {
        (Value::Object(p), Value::Object(c)) => {
            let mut keys: Vec<&String> = p.keys().chain(c.keys().filter(|k| !p.contains_key(*k))).collect();
            keys.sort();
            for key in keys {
                let field = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                walk(&field, p.get(key).unwrap_or(&Value::Null), c.get(key).unwrap_or(&Value::Null), diffs);
            }
        }
        (Value::Number(p), Value::Number(c)) if p.as_f64() == c.as_f64() => {}
        (p, c) if p == c => {}
        (p, c) => diffs.push(FieldDiff {
            field: if path.is_empty() { "output".into() } else { path.to_owned() },
            primary: p.clone(),
            candidate: c.clone(),
        }),
    }
}

/// Comparisons of a shadow period, by verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub matched: i64,
    pub mismatched: i64,
    pub missing: i64,
}

impl Tally {
    /// Inputs both sides produced an output for.
    pub fn compared(&self) -> i64 {
        self.matched + self.mismatched
    }

    /// Mismatched among the compared (0 when nothing was compared).
    pub fn mismatch_rate(&self) -> f64 {
        if self.compared() == 0 { 0.0 } else { self.mismatched as f64 / self.compared() as f64 }
    }
}

/// When a candidate may be promoted to executor without `--force`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromotionPolicy {
    /// Comparisons (matched + mismatched) the shadow period must have made.
    pub min_comparisons: i64,
    /// The highest mismatch rate (0…1) allowed.
    pub max_mismatch_rate: f64,
}

impl PromotionPolicy {
    pub const DEFAULT_MIN_COMPARISONS: i64 = 1000;
    pub const DEFAULT_MAX_MISMATCH_RATE: f64 = 0.001;

    /// Why `tally` is not enough to promote, or `None` when it is.
    pub fn refusal(&self, tally: &Tally) -> Option<String> {
        let mut why = Vec::new();
        if tally.compared() < self.min_comparisons {
            why.push(format!("{} comparisons made, {} required", tally.compared(), self.min_comparisons));
        }
        if tally.mismatch_rate() > self.max_mismatch_rate {
            why.push(format!(
                "mismatch rate {:.4}% ({} of {}) is above {:.4}%",
                tally.mismatch_rate() * 100.0,
                tally.mismatched,
                tally.compared(),
                self.max_mismatch_rate * 100.0
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

impl Default for PromotionPolicy {
    fn default() -> Self {
        Self { min_comparisons: Self::DEFAULT_MIN_COMPARISONS, max_mismatch_rate: Self::DEFAULT_MAX_MISMATCH_RATE }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn outputs_compare_field_by_field_with_dotted_paths() {
        let primary = json!({"status": "upheld", "rule": "R4", "doc": {"score": 70, "handle": "ada"}, "n": 1});
        let same = json!({"n": 1.0, "doc": {"handle": "ada", "score": 70}, "rule": "R4", "status": "upheld"});
        assert_eq!(Comparison::of("d1", &primary, &same).result, ComparisonResult::Matched);

        let other = json!({"status": "dismissed", "rule": "R4", "doc": {"score": 71, "handle": "ada"}, "extra": true});
        let c = Comparison::of("d1", &primary, &other);
        assert_eq!(c.result, ComparisonResult::Mismatched);
        let fields: Vec<&str> = c.diffs.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(fields, ["doc.score", "extra", "n", "status"]);
        assert_eq!(
            c.diffs[3],
            FieldDiff { field: "status".into(), primary: json!("upheld"), candidate: json!("dismissed") }
        );
        assert_eq!(field_diffs(&json!(1), &json!(2))[0].field, "output");
    }

    #[test]
    fn the_gate_refuses_too_few_comparisons_or_too_many_mismatches_and_says_why() {
        let policy = PromotionPolicy { min_comparisons: 100, max_mismatch_rate: 0.01 };
        assert_eq!(policy.refusal(&Tally { matched: 100, mismatched: 1, missing: 5 }), None);
        let few = policy.refusal(&Tally { matched: 99, mismatched: 0, missing: 0 }).unwrap();
        assert!(few.contains("99 comparisons made, 100 required"), "{few}");
        let bad = policy.refusal(&Tally { matched: 98, mismatched: 2, missing: 0 }).unwrap();
        assert!(bad.contains("mismatch rate 2.0000% (2 of 100) is above 1.0000%"), "{bad}");
        assert!(policy.refusal(&Tally::default()).is_some());
    }

    #[test]
    fn processors_are_named_after_their_flags() {
        for flag in Flag::ALL {
            assert_eq!(parse_processor(processor(flag)), Ok(flag));
            assert!(flag.as_str().starts_with(processor(flag)));
        }
        assert_eq!(parse_processor("scores").unwrap_err().code, "unknown_processor");
    }
}
