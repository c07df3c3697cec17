//! Identity: handles, e-mail addresses, display names, passwords, roles and statuses.

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization as _;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
use unicode_security::{RestrictionLevel, RestrictionLevelDetection as _};

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

/// An e-mail address in its canonical form: NFKC, lower case, the domain in its ASCII
/// (IDNA / punycode) form, so that one mailbox has one spelling and one account. Deliberately
/// shallow otherwise: one `@`, a non-empty local part, a domain with a dot, no whitespace, at
/// most 254 characters. Deliverability is the mail system's business, not a regex's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let invalid = || FieldError::new("email", "invalid", "must be an e-mail address");
        let s: String = raw.trim().nfkc().collect::<String>().to_lowercase();
        if s.chars().count() > Self::MAX_LEN || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid());
        }
        let (local, domain) = s.split_once('@').ok_or_else(invalid)?;
        if local.is_empty() || domain.contains('@') {
            return Err(invalid());
        }
        // UTS 46 also maps the other full stops (`。`, `．`) to `.`.
        let domain = idna::domain_to_ascii(domain).map_err(|_| invalid())?;
        if !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.') {
            return Err(invalid());
        }
        let canonical = format!("{local}@{domain}");
        if canonical.len() > Self::MAX_LEN {
            return Err(invalid());
        }
        Ok(Self(canonical))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Longest `login` (handle or e-mail) a sign-in accepts: an e-mail address's limit, which is
/// longer than a handle's.
pub const LOGIN_MAX_LEN: usize = Email::MAX_LEN;

/// The form a login (handle or e-mail address) is stored and looked up in: an e-mail address
/// in [`Email`]'s canonical form, anything else trimmed, NFKC and lower-cased (a handle that
/// does not parse finds no one either way).
pub fn canonical_login(raw: &str) -> String {
    match Email::parse(raw) {
        Ok(email) => email.0,
        Err(_) => raw.trim().nfkc().collect::<String>().to_lowercase(),
    }
}

/// A display name: 1–100 characters after trimming, with no control or format characters
/// (bidi overrides, zero-width joiners and spaces, other `Cf`), no line or paragraph
/// separators, no private-use or unassigned code points, and no word that mixes scripts the
/// way a look-alike does.
///
/// A word is a run of letters, marks and digits; each must be at most *moderately restrictive*
/// in the sense of Unicode TS #39 §5.2: one script, or Latin with Han/Hiragana/Katakana/Hangul,
/// or Latin with one other recommended script that is neither Cyrillic nor Greek (whose letters
/// are the classic Latin look-alikes). So `Аlice` with a Cyrillic `А` is refused, while
/// `Zoë`, `李小龍 Bruce` and `Иван Ivanov` (one script per word) are accepted.
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
        if s.chars().any(invisible_or_control) {
            return Err(FieldError::new(
                "display_name",
                "invalid_characters",
                "must not contain control, format (bidi, zero-width) or unassigned characters",
            ));
        }
        let mixed = s
            .split(|c: char| !(c.is_alphanumeric() || is_mark(c)))
            .filter(|w| !w.is_empty())
            .any(|w| !w.check_restriction_level(RestrictionLevel::ModeratelyRestrictive));
        if mixed {
            return Err(FieldError::new(
                "display_name",
                "mixed_script",
                "a word must not mix scripts that look alike (such as Latin with Cyrillic or Greek)",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Characters a display name must not contain: they are invisible, reorder text, or mean
/// nothing yet.
fn invisible_or_control(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
            | GeneralCategory::Unassigned
    )
}

fn is_mark(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::NonspacingMark | GeneralCategory::SpacingMark | GeneralCategory::EnclosingMark
    )
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
    /// Runs the on-call console: dead letters, cutover flags, score runs.
    Operator,
    /// Sees everything the on-call console shows and changes nothing.
    ReadOnlyOperator,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::User, Role::Moderator, Role::Admin, Role::Operator, Role::ReadOnlyOperator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Moderator => "moderator",
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::ReadOnlyOperator => "read_only_operator",
        }
    }

    /// Moderators and admins may moderate.
    pub fn can_moderate(self) -> bool {
        matches!(self, Role::Moderator | Role::Admin)
    }

    /// Operators (read-only ones too) and admins see the on-call console's operations pages.
    pub fn can_view_operations(self) -> bool {
        matches!(self, Role::Operator | Role::ReadOnlyOperator | Role::Admin)
    }

    /// Operators and admins may act on them (replay, park, purge, flip flags, trigger runs).
    pub fn can_operate(self) -> bool {
        matches!(self, Role::Operator | Role::Admin)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            format!("unknown role {s:?}; expected one of user, moderator, admin, operator, read_only_operator")
        })
    }
}

/// A stored role (the store decodes rows with it).
impl TryFrom<String> for Role {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        raw.parse()
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

/// A stored status (the store decodes rows with it).
impl TryFrom<String> for UserStatus {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        raw.parse()
    }
}

/// What an audited change of a user did (`identity.user_admin_audit.action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminAction {
    /// A role changed (from and to are roles).
    GrantRole,
    /// An upheld dispute suspended the user (from and to are statuses).
    Suspend,
    /// A suspension was undone (from and to are statuses).
    Reinstate,
}

impl AdminAction {
    pub const ALL: [AdminAction; 3] = [AdminAction::GrantRole, AdminAction::Suspend, AdminAction::Reinstate];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminAction::GrantRole => "grant_role",
            AdminAction::Suspend => "suspend",
            AdminAction::Reinstate => "reinstate",
        }
    }
}

/// A stored action (the store decodes rows with it).
impl TryFrom<String> for AdminAction {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        AdminAction::ALL
            .into_iter()
            .find(|a| a.as_str() == raw)
            .ok_or_else(|| format!("unknown user administration action {raw:?}"))
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
    fn stored_roles_statuses_and_actions_convert_back() {
        for r in Role::ALL {
            assert_eq!(Role::try_from(r.as_str().to_owned()), Ok(r));
        }
        for s in [UserStatus::Active, UserStatus::Suspended] {
            assert_eq!(UserStatus::try_from(s.as_str().to_owned()), Ok(s));
        }
        for a in AdminAction::ALL {
            assert_eq!(AdminAction::try_from(a.as_str().to_owned()), Ok(a));
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
        assert!(Role::try_from("root".to_owned()).is_err());
        assert!(UserStatus::try_from("banned".to_owned()).is_err());
        assert!(AdminAction::try_from("delete".to_owned()).is_err());
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
    fn emails_are_stored_in_one_canonical_form() {
        // NFKC folds compatibility characters (full-width letters, ligatures) to their plain form.
        assert_eq!(Email::parse("ＡＬＩＣＥ@example.com").unwrap().as_str(), "alice@example.com");
        assert_eq!(Email::parse("ﬁona@example.com").unwrap().as_str(), "fiona@example.com");
        // The domain in its ASCII (punycode) form, however it was typed.
        assert_eq!(Email::parse("Jörg@Bücher.Example").unwrap().as_str(), "jörg@xn--bcher-kva.example");
        assert_eq!(Email::parse("jörg@xn--bcher-kva.example").unwrap().as_str(), "jörg@xn--bcher-kva.example");
        assert_eq!(Email::parse("a@EXAMPLE。com").unwrap().as_str(), "a@example.com", "an ideographic full stop");
        assert!(Email::parse("a@exa\u{202e}mple.com").is_err(), "a bidi override is no domain");
        assert!(Email::parse(&format!("{}@example.com", "a".repeat(243))).is_err(), "longer than 254");
    }

    #[test]
    fn a_login_is_canonical_like_the_stored_handle_or_email() {
        assert_eq!(canonical_login(" Alice "), "alice");
        assert_eq!(canonical_login("ＡＬＩＣＥ@Bücher.example"), "alice@xn--bcher-kva.example");
        assert_eq!(canonical_login("not an @ address"), "not an @ address");
    }

    #[test]
    fn display_names_refuse_invisible_and_reordering_characters() {
        for bad in [
            "Ali\u{202e}ce", // right-to-left override
            "Ali\u{2066}ce", // left-to-right isolate
            "Ali\u{200b}ce", // zero-width space
            "Ali\u{200d}ce", // zero-width joiner
            "Ali\u{feff}ce", // zero-width no-break space (BOM)
            "Ali\u{00ad}ce", // soft hyphen
            "Ali\u{2028}ce", // line separator
            "Ali\u{e000}ce", // private use
            "Ali\u{0007}ce", // control
        ] {
            assert_eq!(DisplayName::parse(bad).unwrap_err().code, "invalid_characters", "{bad:?}");
        }
    }

    #[test]
    fn display_names_refuse_words_that_mix_look_alike_scripts() {
        for bad in ["\u{0410}lice", "P\u{0430}ypal", "\u{0391}lpha", "Bob \u{0440}\u{0430}ypal"] {
            assert_eq!(DisplayName::parse(bad).unwrap_err().code, "mixed_script", "{bad:?}");
        }
        for good in [
            "Zoë",
            "José Álvarez",
            "O'Brien",
            "李小龍 Bruce",
            "Иван Ivanov",
            "Αλέξανδρος",
            "山田 太郎",
            "Alice 🌸",
            "R2-D2",
        ] {
            assert!(DisplayName::parse(good).is_ok(), "{good:?}: {:?}", DisplayName::parse(good));
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
                Err(e) => prop_assert!(["required", "too_long", "invalid_characters", "mixed_script"].contains(&e.code)),
            }
        }

        #[test]
        fn a_display_name_with_a_format_character_anywhere_is_refused(
            s in "[a-zA-Z ]{1,40}",
            at in 0usize..40,
            cf in prop::sample::select(vec!['\u{200b}', '\u{200c}', '\u{200d}', '\u{200e}', '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{feff}', '\u{061c}']),
        ) {
            let mut chars: Vec<char> = s.chars().collect();
            let at = at.min(chars.len());
            chars.insert(at, cf);
            let name: String = chars.into_iter().collect();
            // Trimming does not remove format characters, so the name is refused wherever it is.
            let refused = DisplayName::parse(&name);
            prop_assert!(refused.is_err(), "{:?} accepted", name);
        }

        #[test]
        fn canonical_emails_are_a_fixed_point(local in "[a-zA-Z0-9._\u{e0}-\u{ff}\u{ff21}-\u{ff3a}]{1,20}", domain in "[a-zA-Z\u{e0}-\u{fc}]{1,15}") {
            let raw = format!("{local}@{domain}.example");
            if let Ok(email) = Email::parse(&raw) {
                prop_assert_eq!(Email::parse(email.as_str()).unwrap(), email.clone());
                prop_assert!(email.as_str().split_once('@').unwrap().1.is_ascii());
                prop_assert_eq!(canonical_login(&raw), email.as_str());
            }
        }
    }
}
