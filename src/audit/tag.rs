//! Keyed user tags: what the audit trail writes instead of a user's identifiers.
//!
//! Each identifier a request names (its `account_id`, each email, its phone or phones) gets a tag
//! of its own: the first 16 hex digits of HMAC-SHA256, under the trail's key, of
//! `<kind>:<value>`, where kind is `account_id`, `email` (lowercased) or `phone` (`phone` and
//! `phones` alike). Without the key nobody can tell whose tag it is, not even by trying every
//! phone number; with it, an operator computes the tag of the identifier they hold (the
//! worked example is in docs/security.md) and finds it in the trail, whichever other identifiers
//! the requests carried.
//!
//! The key is 32 bytes, written as 64 hex digits (`openssl rand -hex 32`); its id (8 hex digits
//! of a MAC of a fixed text) goes with every tag, so a reader knows which key made it.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::{from_hex, hex};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC a tag keeps: 16 hex digits.
const TAG_BYTES: usize = 8;
/// The text whose MAC names the key.
const KEY_ID_TEXT: &[u8] = b"token-broker audit key id";

/// Where the key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `audit.hmac_key_file`.
    File,
    /// Made at start (no `audit.hmac_key_file`): tags match within this run only.
    Generated,
}

impl KeySource {
    /// As the trail's `start` event and the logs say it.
    pub fn name(self) -> &'static str {
        match self {
            KeySource::File => "file",
            KeySource::Generated => "generated",
        }
    }
}

/// Why a key file cannot be used. Never holds the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum TagKeyError {
    /// The file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    /// The file does not hold 64 hex digits.
    #[error("{path} must hold 64 hex digits (openssl rand -hex 32)")]
    Malformed { path: String },
    /// No randomness for a generated key.
    #[error("the OS random source failed")]
    Random,
}

/// The key of the user tags, with the MAC state already keyed.
pub struct TagKey {
    mac: HmacSha256,
    id: Box<str>,
    source: KeySource,
}

impl fmt::Debug for TagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TagKey({}, {})", self.id, self.source.name())
    }
}

impl TagKey {
    /// The key of 32 bytes `key`.
    pub fn new(key: &[u8; 32], source: KeySource) -> Self {
        // HMAC takes a key of any length: this cannot fail.
        let mac = <HmacSha256 as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        let mut id_mac = mac.clone();
        id_mac.update(KEY_ID_TEXT);
        let id = hex(&id_mac.finalize().into_bytes()[..4]).into_boxed_str();
        Self { mac, id, source }
    }

    /// Reads the key from `path`: 64 hex digits, surrounding white space ignored.
    pub fn load(path: &Path) -> Result<Self, TagKeyError> {
        let shown = path.display().to_string();
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| TagKeyError::Read {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?,
            );
        let key = Zeroizing::new(
            from_hex::<32>(text.trim()).ok_or(TagKeyError::Malformed { path: shown })?,
        );
        Ok(Self::new(&key, KeySource::File))
    }

    /// A key made now from the OS random source.
    pub fn generate() -> Result<Self, TagKeyError> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut()).map_err(|_| TagKeyError::Random)?;
        Ok(Self::new(&key, KeySource::Generated))
    }

    /// The key's id: 8 hex digits that tell keys apart and say nothing of them.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the key came from.
    pub fn source(&self) -> KeySource {
        self.source
    }

    /// The tag of one identifier.
    pub fn tag(&self, id: Identifier<'_>) -> Tag {
        let mut mac = self.mac.clone();
        let (kind, value) = match id {
            Identifier::AccountId(v) => ("account_id", v),
            Identifier::Email(v) => ("email", v),
            Identifier::Phone(v) => ("phone", v),
        };
        mac.update(kind.as_bytes());
        mac.update(b":");
        if let Identifier::Email(_) = id {
            // Byte by byte, lowercased, without a copy of the address.
            for chunk in value.as_bytes().chunks(64) {
                let mut lower = [0u8; 64];
                let lower = &mut lower[..chunk.len()];
                lower.copy_from_slice(chunk);
                lower.make_ascii_lowercase();
                mac.update(lower);
            }
        } else {
            mac.update(value.as_bytes());
        }
        let out = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&out[..TAG_BYTES]);
        Tag(tag)
    }
}

/// One of a user's identifiers, as a request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identifier<'a> {
    /// `account_id`.
    AccountId(&'a str),
    /// One of `emails` (tagged lowercased).
    Email(&'a str),
    /// `phone`, or one of `phones`.
    Phone(&'a str),
}

/// The tag of one identifier: 16 hex digits when written.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag([u8; TAG_BYTES]);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({self})")
    }
}

impl serde::Serialize for Tag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A user's tags, in the order the request names the identifiers, and the id of the key that
/// made them (taken with them, so a key swapped meanwhile cannot mislabel them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserTags {
    /// One per identifier; empty when the request names no user.
    pub tags: Vec<Tag>,
    /// The key's id ([`TagKey::id`]).
    pub key: Box<str>,
}

impl UserTags {
    /// Tags `ids` under `key`.
    pub fn of<'a>(key: &TagKey, ids: impl IntoIterator<Item = Identifier<'a>>) -> Self {
        Self {
            tags: ids.into_iter().map(|id| key.tag(id)).collect(),
            key: key.id().into(),
        }
    }

    /// The tags as one log field: comma-separated, `-` for none.
    pub fn joined(&self) -> String {
        if self.tags.is_empty() {
            return "-".to_owned();
        }
        self.tags
            .iter()
            .map(Tag::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key and tag of the worked example in docs/security.md, which `openssl dgst -sha256
    /// -mac HMAC -macopt hexkey:<key>` reproduces.
    const DOC_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const DOC_TAG: &str = "94daf9971f55ed17";
    const DOC_KEY_ID: &str = "3ba62dab";

    fn key(hex_key: &str) -> TagKey {
        TagKey::new(&from_hex::<32>(hex_key).unwrap(), KeySource::File)
    }

    #[test]
    fn the_same_identifier_under_the_same_key_gets_the_same_tag() {
        let a = key(DOC_KEY);
        let b = key(DOC_KEY);
        let id = Identifier::AccountId("user-1");
        assert_eq!(a.tag(id), b.tag(id));
        assert_eq!(a.id(), b.id());
        assert_eq!(a.tag(id).to_string().len(), 16);
    }

    #[test]
    fn another_key_gives_another_tag_and_another_key_id() {
        let a = key(DOC_KEY);
        let b = key(&"ab".repeat(32));
        let id = Identifier::Phone("+573001112233");
        assert_ne!(a.tag(id), b.tag(id));
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn the_tag_is_the_documented_hmac_of_kind_and_value() {
        let k = key(DOC_KEY);
        assert_eq!(k.tag(Identifier::AccountId("user-1")).to_string(), DOC_TAG);
        assert_eq!(k.id(), DOC_KEY_ID);
        assert_eq!(
            k.tag(Identifier::Email("Ana@Example.com")).to_string(),
            "991ba5397fc8c8c8"
        );
        assert_eq!(
            k.tag(Identifier::Phone("+573001234567")).to_string(),
            "e2e1b536a0ef4680"
        );
        // docs/security.md shows these values: keep the two in step.
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/security.md"),
        )
        .unwrap();
        for value in [
            DOC_KEY,
            DOC_TAG,
            DOC_KEY_ID,
            "991ba5397fc8c8c8",
            "e2e1b536a0ef4680",
        ] {
            assert!(
                doc.contains(value),
                "docs/security.md does not show {value}"
            );
        }
    }

    #[test]
    fn kinds_are_told_apart_and_emails_match_whatever_their_case() {
        let k = key(DOC_KEY);
        assert_ne!(
            k.tag(Identifier::AccountId("x@y.co")),
            k.tag(Identifier::Email("x@y.co"))
        );
        let long = format!("{}@Example.COM", "A".repeat(100));
        assert_eq!(
            k.tag(Identifier::Email(&long)),
            k.tag(Identifier::Email(&long.to_ascii_lowercase()))
        );
    }

    #[test]
    fn a_key_file_holds_64_hex_digits_and_its_errors_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, format!("{DOC_KEY}\n")).unwrap();
        let k = TagKey::load(&path).unwrap();
        assert_eq!(k.source(), KeySource::File);
        assert_eq!(k.id(), key(DOC_KEY).id());
        std::fs::write(&path, "not-hex-secret-value").unwrap();
        let err = TagKey::load(&path).unwrap_err().to_string();
        assert!(!err.contains("not-hex-secret-value"), "{err}");
        assert!(err.contains("64 hex digits"), "{err}");
        assert!(TagKey::load(&dir.path().join("missing")).is_err());
        assert!(!format!("{k:?}").contains(DOC_KEY));
    }

    #[test]
    fn generated_keys_differ() {
        let (a, b) = (TagKey::generate().unwrap(), TagKey::generate().unwrap());
        assert_eq!(a.source(), KeySource::Generated);
        assert_ne!(
            a.tag(Identifier::AccountId("u")),
            b.tag(Identifier::AccountId("u"))
        );
    }
}
