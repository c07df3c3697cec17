//! Cursor pagination: a cursor is an opaque, URL-safe token that encodes the sort key (or, for
//! search, the offset) of the last row a client has seen, sealed with an HMAC so that a client
//! can hand back only cursors this deployment made, for the list that made them.
//!
//! A sealed cursor is `base64url(JSON key) "." base64url(HMAC-SHA256(list name, JSON key))`,
//! the tag cut to 128 bits. The key is [`CursorKey`], shared by every replica of a deployment.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Serialize, de::DeserializeOwned};
use sha2::Sha256;

/// Rows of one page, plus the (unsealed) cursor of the next page when there is one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only proves there is more.
    pub fn from_rows<K: Serialize>(mut rows: Vec<T>, limit: usize, key: impl Fn(&T) -> K) -> Self {
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more { rows.last().map(|last| Cursor::of(&key(last))) } else { None };
        Self { items: rows, next }
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page { items: self.items.into_iter().map(f).collect(), next: self.next }
    }
}

/// The position a next page starts after, not yet sealed: [`CursorKey::seal`] makes it the
/// token a client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(Vec<u8>);

impl Cursor {
    pub fn of<K: Serialize>(key: &K) -> Self {
        Self(serde_json::to_vec(key).expect("cursor keys are plain data"))
    }
}

/// The HMAC key that seals cursors. Its `Debug` is redacted.
#[derive(Clone)]
pub struct CursorKey(Hmac<Sha256>);

/// Bytes of a sealed cursor's tag: 128 bits, beyond guessing.
const TAG_LEN: usize = 16;

/// Longest cursor [`CursorKey::open`] looks at; every cursor this code makes is far shorter.
const MAX_SEALED_LEN: usize = 512;

impl CursorKey {
    pub fn new(secret: &[u8]) -> Self {
        Self(Hmac::new_from_slice(secret).expect("HMAC takes a key of any length"))
    }

    fn mac(&self, list: &str, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        // The list name is length-prefixed so that no (list, payload) pair reads as another.
        mac.update(&(list.len() as u64).to_be_bytes());
        mac.update(list.as_bytes());
        mac.update(payload);
        mac
    }

    fn tag(&self, list: &str, payload: &[u8]) -> [u8; TAG_LEN] {
        let full = self.mac(list, payload).finalize().into_bytes();
        full[..TAG_LEN].try_into().expect("SHA-256 is longer than the tag")
    }

    /// The token a client gets for `cursor` of the list `list`.
    pub fn seal(&self, list: &str, cursor: &Cursor) -> String {
        let tag = self.tag(list, &cursor.0);
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&cursor.0), URL_SAFE_NO_PAD.encode(tag))
    }

    /// The key inside a token that [`seal`](Self::seal) made for `list` with this key; `None`
    /// for anything else (forged, altered, from another list or deployment, or not a key of
    /// type `K`).
    pub fn open<K: DeserializeOwned>(&self, list: &str, sealed: &str) -> Option<K> {
        if sealed.len() > MAX_SEALED_LEN {
            return None;
        }
        let (payload, tag) = sealed.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok().filter(|t| t.len() == TAG_LEN)?;
        // A constant-time comparison of the truncated tag.
        self.mac(list, &payload).verify_truncated_left(&tag).ok()?;
        serde_json::from_slice(&payload).ok()
    }
}

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_cursor_opens_only_with_its_key_and_list() {
        let key = CursorKey::new(b"one deployment's key");
        let sealed = key.seal("contacts", &Cursor::of(&42_i64));
        assert_eq!(key.open::<i64>("contacts", &sealed), Some(42));
        assert_eq!(key.open::<i64>("circles", &sealed), None, "another list");
        assert_eq!(CursorKey::new(b"another key").open::<i64>("contacts", &sealed), None, "another deployment");
        assert_eq!(key.open::<String>("contacts", &sealed), None, "another key type");
    }

    #[test]
    fn an_altered_or_unsigned_cursor_does_not_open() {
        let key = CursorKey::new(b"k");
        let sealed = key.seal("search-users", &Cursor::of(&20_i64));
        let (_, tag) = sealed.split_once('.').unwrap();
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(b"1000000000"));
        assert_eq!(key.open::<i64>("search-users", &forged), None);
        assert_eq!(key.open::<i64>("search-users", &URL_SAFE_NO_PAD.encode(b"20")), None, "no tag");
        let short_tag = format!("{}.{}", URL_SAFE_NO_PAD.encode(b"20"), &tag[..4]);
        assert_eq!(key.open::<i64>("search-users", &short_tag), None, "a cut tag");
        assert_eq!(key.open::<i64>("search-users", ""), None);
        assert_eq!(key.open::<i64>("search-users", &"a".repeat(10_000)), None);
    }

    #[test]
    fn the_key_does_not_print() {
        assert_eq!(format!("{:?}", CursorKey::new(b"secret")), "CursorKey(<redacted>)");
    }
}
