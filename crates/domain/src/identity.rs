//! Identity: handles, e-mail addresses, display names, passwords, roles and statuses.

use serde::{Deserialize, Serialize};

use crate::validation::FieldError;

/// A user's public handle: 3–30 characters of `[a-z0-9_]`, stored lower-case.
///
/// Input is accepted in any case and folded, so handles are unique case-insensitively. A
/// handle can never parse as a UUID (a UUID has hyphens), so `{user}` path segments are
/// unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Handle(String);

impl Handle {
    pub const MIN_LEN: usize = 3;
    pub const MAX_LEN: usize = 30;

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let folded = raw.trim().to_ascii_lowercase();
        let len = folded.chars().count();
        if len < Self::MIN_LEN {
            return Err(FieldError::new("handle", "too_short", "must be at least 3 characters"));
        }
        if len > Self::MAX_LEN {
            return Err(FieldError::new("handle", "too_long", "must be at most 30 characters"));
        }
        if !folded.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(FieldError::new(
                "handle",
                "invalid_characters",
                "may contain only letters a-z, digits and underscores",
            ));
        }
        Ok(Self(folded))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Handle {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An e-mail address, trimmed and lower-cased. Deliberately shallow: one `@`, a non-empty
/// local part, a domain with a dot, no whitespace, at most 254 characters. Deliverability is
/// the mail system's business, not a regex's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim().to_lowercase();
        let invalid = || FieldError::new("email", "invalid", "must be an e-mail address");
        if s.len() > 254 || s.chars().any(char::is_whitespace) {
            return Err(invalid());
        }
        let (local, domain) = s.split_once('@').ok_or_else(invalid)?;
        if local.is_empty()
            || domain.contains('@')
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
        {
            return Err(invalid());
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name: 1–100 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_LEN: usize = 100;

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(FieldError::new("display_name", "required", "must not be empty"));
        }
        if s.chars().count() > Self::MAX_LEN {
            return Err(FieldError::new("display_name", "too_long", "must be at most 100 characters"));
        }
        if s.chars().any(char::is_control) {
            return Err(FieldError::new("display_name", "invalid_characters", "must not contain control characters"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A plaintext password on its way to the hasher: 10–128 characters. Its `Debug` is redacted.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub const MIN_LEN: usize = 10;
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let len = raw.chars().count();
        if len < Self::MIN_LEN {
            return Err(FieldError::new("password", "too_short", "must be at least 10 characters"));
        }
        if len > Self::MAX_LEN {
            return Err(FieldError::new("password", "too_long", "must be at most 128 characters"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Why an admin or an operator changes a user's role or status, recorded in the user
/// administration audit: 1–2,000 characters after trimming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AdminReason(String);

impl AdminReason {
    pub const MAX_LEN: usize = 2000;

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(FieldError::new("reason", "required", "say why; it is recorded in the audit"));
        }
        if s.chars().count() > Self::MAX_LEN {
            return Err(FieldError::new("reason", "too_long", "must be at most 2000 characters"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a user may do beyond their own data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Moderator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::User, Role::Moderator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Moderator => "moderator",
            Role::Admin => "admin",
        }
    }

    /// Moderators and admins may moderate.
    pub fn can_moderate(self) -> bool {
        matches!(self, Role::Moderator | Role::Admin)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}; expected one of user, moderator, admin"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    Active,
    Suspended,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Suspended => "suspended",
        }
    }
}

impl std::str::FromStr for UserStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(UserStatus::Active),
            "suspended" => Ok(UserStatus::Suspended),
            _ => Err(format!("unknown user status {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_admin_reason_is_required_and_bounded() {
        assert_eq!(AdminReason::parse("  wrongly suspended  ").unwrap().as_str(), "wrongly suspended");
        assert_eq!(AdminReason::parse(" \t ").unwrap_err().code, "required");
        assert_eq!(AdminReason::parse(&"x".repeat(2001)).unwrap_err().code, "too_long");
        assert!(AdminReason::parse(&"é".repeat(2000)).is_ok());
    }

    #[test]
    fn handle_is_folded_to_lower_case() {
        assert_eq!(Handle::parse("Alice_01").unwrap().as_str(), "alice_01");
    }

    #[test]
    fn handle_rejects_bad_lengths_and_characters() {
        assert_eq!(Handle::parse("ab").unwrap_err().code, "too_short");
        assert_eq!(Handle::parse(&"a".repeat(31)).unwrap_err().code, "too_long");
        assert_eq!(Handle::parse("al-ice").unwrap_err().code, "invalid_characters");
        assert_eq!(Handle::parse("älice").unwrap_err().code, "invalid_characters");
        assert!(Handle::parse("abc").is_ok());
        assert!(Handle::parse(&"a".repeat(30)).is_ok());
    }

    #[test]
    fn email_needs_an_at_and_a_dotted_domain() {
        assert!(Email::parse("A@Example.com").is_ok());
        assert_eq!(Email::parse(" A@Example.COM ").unwrap().as_str(), "a@example.com");
        for bad in ["", "a", "a@b", "@b.c", "a@@b.c", "a b@c.d", "a@.c", "a@c."] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn password_debug_is_redacted() {
        let p = Password::parse("correct horse battery").unwrap();
        assert_eq!(format!("{p:?}"), "Password(<redacted>)");
        assert!(Password::parse("short").is_err());
    }

    proptest! {
        #[test]
        fn valid_handles_never_parse_as_uuids(s in "[a-zA-Z0-9_]{3,30}") {
            let h = Handle::parse(&s).unwrap();
            prop_assert!(uuid::Uuid::parse_str(h.as_str()).is_err());
            prop_assert_eq!(h.as_str(), s.to_ascii_lowercase());
        }

        #[test]
        fn display_names_are_trimmed_and_bounded(s in "\\PC{0,120}") {
            match DisplayName::parse(&s) {
                Ok(d) => {
                    prop_assert_eq!(d.as_str(), s.trim());
                    prop_assert!(!d.as_str().is_empty() && d.as_str().chars().count() <= 100);
                }
                Err(e) => prop_assert!(["required", "too_long", "invalid_characters"].contains(&e.code)),
            }
        }
    }
}
