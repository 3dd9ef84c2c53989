//! Holders for the two kinds of secret the broker touches: Truora's master API key and the
//! caller secrets presented as bearer tokens.
//!
//! Both redact themselves in `Debug` and `Display` and are zeroized when dropped, so a secret can
//! be carried around the program without the risk of it reaching a log line, an error message or a
//! panic text. Caller secrets are never stored at all: only their SHA-256 digest is (see
//! [`SecretDigest`]), and digests are compared in constant time.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Truora's master API key. Only the upstream client ever exposes it, to build the header.
#[derive(Clone)]
pub struct MasterKey(SecretString);

impl MasterKey {
    /// Wraps a key read from a file or the environment; surrounding white space is not part of it.
    pub fn new(raw: &str) -> Option<Self> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return None;
        }
        Some(Self(SecretString::from(trimmed.to_owned())))
    }

    /// The key itself, for the one place that sends it upstream.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// A non-secret fingerprint (`sha256:` and 8 hex digits of the key's SHA-256), so that an
    /// operator can tell which key is loaded after a rotation without seeing it.
    pub fn fingerprint(&self) -> String {
        format!(
            "sha256:{}",
            hex(&Sha256::digest(self.expose().as_bytes())[..4])
        )
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

/// The SHA-256 digest of a caller secret, as written in `[[clients]] token_sha256`.
///
/// Digests are fixed-length, so comparing them in constant time leaks nothing about the secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    /// Digests a secret as the caller presents it.
    pub fn of(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    /// Parses the 64 hex digits of the config file (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        from_hex(hex).map(Self)
    }

    /// Lower-case hex, as `hash-secret` prints it.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretDigest([redacted])")
    }
}

/// Lower-case hex of any bytes: the broker's one hex encoder (digests, fingerprints, request ids,
/// Redis keys).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Exactly `2 * N` hex digits (either case) as `N` bytes; `None` for anything else. The
/// broker's one hex decoder; callers holding a key wrap the result in `Zeroizing`.
pub fn from_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *slot = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_debug_is_redacted() {
        let key = MasterKey::new("super-secret-master-key\n").unwrap();
        assert_eq!(key.expose(), "super-secret-master-key");
        let shown = format!("{key:?}");
        assert!(!shown.contains("super-secret"), "{shown}");
    }

    #[test]
    fn the_fingerprint_tells_keys_apart_without_showing_them() {
        let a = MasterKey::new("key-a").unwrap();
        let b = MasterKey::new("key-b").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.fingerprint(),
            MasterKey::new("key-a\n").unwrap().fingerprint()
        );
        assert!(a.fingerprint().starts_with("sha256:") && a.fingerprint().len() == 15);
        assert!(!a.fingerprint().contains("key-a"));
    }

    #[test]
    fn blank_master_key_is_refused() {
        assert!(MasterKey::new(" \n").is_none());
    }

    #[test]
    fn digest_round_trips_through_hex() {
        let d = SecretDigest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(SecretDigest::from_hex(&d.to_hex().to_uppercase())
            .unwrap()
            .ct_eq(&d));
    }

    #[test]
    fn malformed_hex_digest_is_refused() {
        assert!(SecretDigest::from_hex("abc").is_none());
        assert!(SecretDigest::from_hex(&"g".repeat(64)).is_none());
    }

    #[test]
    fn hex_round_trips_and_refuses_the_wrong_length() {
        let bytes = [0x00, 0x7f, 0xab, 0xff];
        assert_eq!(hex(&bytes), "007fabff");
        assert_eq!(from_hex::<4>("007FABff"), Some(bytes));
        assert_eq!(from_hex::<4>("007fab"), None);
        assert_eq!(from_hex::<4>("007fabffff"), None);
        assert_eq!(from_hex::<1>("+1"), None);
    }

    #[test]
    fn digest_debug_is_redacted() {
        let d = SecretDigest::of(b"abc");
        assert!(!format!("{d:?}").contains("ba78"));
    }
}
