//! Contacts and circles: the owner's label for a contact and a circle's name.

use serde::{Deserialize, Serialize};

use crate::validation::FieldError;

/// The owner's label for a contact: 0–100 characters after trimming (empty means no label).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ContactLabel(String);

impl ContactLabel {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim();
        if s.chars().count() > 100 {
            return Err(FieldError::new("label", "too_long", "must be at most 100 characters"));
        }
        if s.chars().any(char::is_control) {
            return Err(FieldError::new("label", "invalid_characters", "must not contain control characters"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A circle's name: 1–60 characters after trimming, unique per owner (case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CircleName(String);

impl CircleName {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(FieldError::new("name", "required", "must not be empty"));
        }
        if s.chars().count() > 60 {
            return Err(FieldError::new("name", "too_long", "must be at most 60 characters"));
        }
        if s.chars().any(char::is_control) {
            return Err(FieldError::new("name", "invalid_characters", "must not contain control characters"));
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
    fn labels_may_be_empty_but_not_long() {
        assert_eq!(ContactLabel::parse("  ").unwrap().as_str(), "");
        assert!(ContactLabel::parse(&"x".repeat(101)).is_err());
    }

    #[test]
    fn circle_names_are_required() {
        assert_eq!(CircleName::parse(" ").unwrap_err().code, "required");
        assert_eq!(CircleName::parse(" Friends ").unwrap().as_str(), "Friends");
    }
}
