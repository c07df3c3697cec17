//! Cutover flags (Stage B of the migration guide): which side executes each processor.

use serde::{Deserialize, Serialize};

use crate::validation::FieldError;

/// A processor whose executor a flag chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Flag {
    #[serde(rename = "score.executor")]
    ScoreExecutor,
    #[serde(rename = "search.executor")]
    SearchExecutor,
    #[serde(rename = "dispute.executor")]
    DisputeExecutor,
}

impl Flag {
    pub const ALL: [Flag; 3] = [Flag::ScoreExecutor, Flag::SearchExecutor, Flag::DisputeExecutor];

    pub fn as_str(self) -> &'static str {
        match self {
            Flag::ScoreExecutor => "score.executor",
            Flag::SearchExecutor => "search.executor",
            Flag::DisputeExecutor => "dispute.executor",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        Flag::ALL.into_iter().find(|f| f.as_str() == raw).ok_or_else(|| {
            FieldError::new("name", "unknown_flag", format!("unknown flag {raw:?}: one of {}", names(&Flag::ALL)))
        })
    }
}

/// Who executes a processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    /// `trellis-api` runs it in-process (Stage A, and the rollback).
    Monolith,
    /// The worker binary runs it.
    Worker,
    /// The primary keeps executing; the other side runs a candidate copy into shadow tables.
    Shadow,
}

impl Executor {
    pub const ALL: [Executor; 3] = [Executor::Monolith, Executor::Worker, Executor::Shadow];

    pub fn as_str(self) -> &'static str {
        match self {
            Executor::Monolith => "monolith",
            Executor::Worker => "worker",
            Executor::Shadow => "shadow",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        Executor::ALL.into_iter().find(|e| e.as_str() == raw).ok_or_else(|| {
            FieldError::new(
                "value",
                "unknown_value",
                format!("unknown value {raw:?}: one of {}", names(&Executor::ALL)),
            )
        })
    }
}

trait Named {
    fn name(&self) -> &'static str;
}
impl Named for Flag {
    fn name(&self) -> &'static str {
        self.as_str()
    }
}
impl Named for Executor {
    fn name(&self) -> &'static str {
        self.as_str()
    }
}

fn names<T: Named>(all: &[T]) -> String {
    all.iter().map(Named::name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_valid_ones() {
        for f in Flag::ALL {
            assert_eq!(Flag::parse(f.as_str()), Ok(f));
            assert_eq!(serde_json::to_value(f).unwrap(), f.as_str());
        }
        for e in Executor::ALL {
            assert_eq!(Executor::parse(e.as_str()), Ok(e));
            assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
        }
        let e = Flag::parse("score.exec").unwrap_err();
        assert_eq!((e.field, e.code), ("name", "unknown_flag"));
        assert!(e.message.contains("score.executor, search.executor, dispute.executor"), "{}", e.message);
        let e = Executor::parse("Worker").unwrap_err();
        assert_eq!((e.field, e.code), ("value", "unknown_value"));
        assert!(e.message.contains("monolith, worker, shadow"), "{}", e.message);
    }
}
