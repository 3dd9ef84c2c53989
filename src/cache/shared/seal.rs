//! The Redis tier's secrets and what they protect: every value and every invalidation message
//! is sealed with AES-256-GCM under the configured key, with what it is bound to (the cache key,
//! the channel) as associated data, so a value moved to another key does not open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::config::{ConfigError, SharedCacheConfig};
use crate::secret::from_hex;

/// The environment variable read for the value encryption key when
/// `cache.shared.encryption_key_file` is not set.
pub const ENCRYPTION_KEY_ENV: &str = "TOKEN_BROKER_CACHE_ENCRYPTION_KEY";

/// Format byte of a sealed value: 1 = AES-256-GCM, 96-bit random nonce, JSON inside.
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 12;

/// The secrets of the shared tier: the value keys (the current one first, then the previous
/// ones) and, when they are not in the URL, the passwords of the data nodes and the sentinels.
pub struct SharedSecrets {
    pub(super) keys: Vec<Zeroizing<[u8; 32]>>,
    pub(super) password: Option<Zeroizing<String>>,
    pub(super) sentinel_password: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for SharedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecrets([redacted])")
    }
}

impl SharedSecrets {
    /// Reads them from the files, the key from [`ENCRYPTION_KEY_ENV`] when it has no file.
    pub fn load(cfg: &SharedCacheConfig) -> Result<Self, ConfigError> {
        Self::load_with(
            cfg,
            std::env::var(ENCRYPTION_KEY_ENV).ok().map(Zeroizing::new),
        )
    }

    /// [`SharedSecrets::load`] with the environment's value given, for tests.
    pub fn load_with(
        cfg: &SharedCacheConfig,
        env_key: Option<Zeroizing<String>>,
    ) -> Result<Self, ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            key: format!("cache.shared.{key}"),
            reason,
        };
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map(Zeroizing::new)
                .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))
        };
        let parse_key = |key: &str, hex: &str| {
            from_hex::<32>(hex.trim())
                .map(Zeroizing::new)
                .ok_or_else(|| {
                    bad(
                        key,
                        "the key must be 64 hex digits (32 random bytes: `openssl rand -hex 32`)"
                            .into(),
                    )
                })
        };
        let hex = match &cfg.encryption_key_file {
            Some(path) => read("encryption_key_file", path)?,
            None => env_key.ok_or_else(|| {
                bad(
                    "encryption_key_file",
                    format!("not set, and {ENCRYPTION_KEY_ENV} is not set: values in Redis must be encrypted"),
                )
            })?,
        };
        let mut keys = vec![parse_key("encryption_key_file", &hex)?];
        for (i, path) in cfg.previous_encryption_key_files.iter().enumerate() {
            let name = format!("previous_encryption_key_files[{i}]");
            let key = parse_key(&name, &read(&name, path)?)?;
            if keys.iter().any(|k| **k == *key) {
                return Err(bad(
                    &name,
                    format!("{}: the same key as one before it", path.display()),
                ));
            }
            keys.push(key);
        }
        let password = |key: &str, path: &Option<std::path::PathBuf>| match path {
            Some(path) => {
                let text = read(key, path)?;
                let pw = text.trim_end_matches(['\r', '\n']);
                if pw.is_empty() {
                    return Err(bad(key, format!("{} is empty", path.display())));
                }
                Ok(Some(Zeroizing::new(pw.to_owned())))
            }
            None => Ok(None),
        };
        Ok(Self {
            keys,
            password: password("password_file", &cfg.password_file)?,
            sentinel_password: password("sentinel_password_file", &cfg.sentinel_password_file)?,
        })
    }
}

/// Seals with AES-256-GCM under the current key, opens under any of the keys.
pub(super) struct Sealer(Vec<Aes256Gcm>);

impl Sealer {
    /// `keys`: the current one first, then the previous ones.
    pub(super) fn new(keys: &[Zeroizing<[u8; 32]>]) -> Self {
        Self(keys.iter().map(|k| Aes256Gcm::new((&**k).into())).collect())
    }

    /// `plaintext` sealed under the current key with a fresh random nonce, bound to `aad`;
    /// `None` when the OS random source or the cipher fails (then nothing is stored or sent).
    pub(super) fn seal(&self, aad: &[&[u8]], plaintext: &[u8]) -> Option<Vec<u8>> {
        self.seal_with(0, aad, plaintext)
    }

    /// [`Sealer::seal`] under the key of index `key` (0: the current one).
    pub(super) fn seal_with(&self, key: usize, aad: &[&[u8]], plaintext: &[u8]) -> Option<Vec<u8>> {
        let cipher = self.0.get(key)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).ok()?;
        let aad = aad.concat();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// How many keys it holds (the current one and the previous ones).
    pub(super) fn keys(&self) -> usize {
        self.0.len()
    }

    /// The plaintext, and the index of the key it opened under (0: the current one).
    pub(super) fn open(&self, aad: &[&[u8]], sealed: &[u8]) -> Option<(Zeroizing<Vec<u8>>, usize)> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEALED_V1 || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = aad.concat();
        self.0.iter().enumerate().find_map(|(i, cipher)| {
            cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .ok()
                .map(|plain| (Zeroizing::new(plain), i))
        })
    }
}

/// Keyed one-way tags of what must be findable in Redis without being readable there: a
/// caller's id, a flow, a user (index names, invalidation records). HMAC-SHA256 under a key
/// derived from the encryption key, cut to 64 bits: equal inputs give equal tags on every
/// replica, and the tags alone tell nothing, not even to someone trying every phone number.
pub(super) struct Tagger(Hmac<Sha256>);

impl Tagger {
    pub(super) fn new(key: &[u8; 32]) -> Option<Self> {
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
        derive.update(b"token-broker/shared-cache/tag/v1");
        let subkey: Zeroizing<[u8; 32]> = Zeroizing::new(derive.finalize().into_bytes().into());
        <Hmac<Sha256> as Mac>::new_from_slice(&*subkey)
            .ok()
            .map(Self)
    }

    /// The tag of `parts` (length-prefixed, so parts cannot be shifted into each other), as 16
    /// hex digits.
    pub(super) fn tag(&self, parts: &[&[u8]]) -> String {
        let mut mac = self.0.clone();
        for part in parts {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        crate::secret::hex(&mac.finalize().into_bytes()[..8])
    }
}

/// A [`Tagger`] per key, the current key's first. The tag key follows the encryption key, so a
/// rotation rotates the tags too (a leaked key stops naming users in Redis once it is dropped).
/// While previous keys are configured, what was written under their tags stays findable: values
/// are indexed under the current key's tags, invalidations walk the indexes of every key's tags,
/// record every key's tags, and a value is checked against every key's tags of its owner.
pub(super) struct Taggers(Vec<Tagger>);

impl Taggers {
    pub(super) fn new(keys: &[Zeroizing<[u8; 32]>]) -> Option<Self> {
        let taggers = keys
            .iter()
            .map(|k| Tagger::new(k))
            .collect::<Option<Vec<_>>>()?;
        (!taggers.is_empty()).then_some(Self(taggers))
    }

    /// The tag of `parts` under the current key.
    pub(super) fn tag(&self, parts: &[&[u8]]) -> String {
        self.0.first().map(|t| t.tag(parts)).unwrap_or_default()
    }

    /// The tag of `parts` under every key, the current key's first.
    pub(super) fn tags(&self, parts: &[&[u8]]) -> Vec<String> {
        self.0.iter().map(|t| t.tag(parts)).collect()
    }

    /// Every key's tagger, the current key's first.
    pub(super) fn each(&self) -> &[Tagger] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> SharedCacheConfig {
        SharedCacheConfig::example()
    }

    #[test]
    fn a_sealed_value_opens_only_under_its_own_key() {
        let sealer = Sealer::new(&[Zeroizing::new([7; 32])]);
        let a = [1u8; 32];
        let b = [2u8; 32];
        let sealed = sealer.seal(&[b"value", &a], b"secret-token").unwrap();
        assert!(!sealed.windows(12).any(|w| w == b"secret-token"));
        assert_eq!(
            sealer.open(&[b"value", &a], &sealed).unwrap().0.as_slice(),
            b"secret-token"
        );
        assert!(sealer.open(&[b"value", &b], &sealed).is_none());
        assert!(Sealer::new(&[Zeroizing::new([8; 32])])
            .open(&[b"value", &a], &sealed)
            .is_none());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(sealer.open(&[b"value", &a], &tampered).is_none());
        // A fresh nonce each time: the same value never seals the same way twice.
        assert_ne!(
            sealed,
            sealer.seal(&[b"value", &a], b"secret-token").unwrap()
        );
    }

    #[test]
    fn a_rotation_seals_under_the_new_key_and_opens_under_both() {
        let (old, new) = (Zeroizing::new([1u8; 32]), Zeroizing::new([2u8; 32]));
        let before = Sealer::new(std::slice::from_ref(&old));
        let during = Sealer::new(&[new.clone(), old.clone()]);
        let after = Sealer::new(std::slice::from_ref(&new));
        let sealed_before = before.seal(&[b"v"], b"t").unwrap();
        assert_eq!(
            during.open(&[b"v"], &sealed_before).unwrap().1,
            1,
            "opened with the previous key"
        );
        let sealed_during = during.seal(&[b"v"], b"t").unwrap();
        assert_eq!(after.open(&[b"v"], &sealed_during).unwrap().1, 0);
        assert!(before.open(&[b"v"], &sealed_during).is_none());
        assert!(after.open(&[b"v"], &sealed_before).is_none());
        // Under an explicit key: a message for replicas that hold only the old one.
        let for_old = during.seal_with(1, &[b"v"], b"t").unwrap();
        assert!(before.open(&[b"v"], &for_old).is_some());
        // Every key's tags, the current key's first.
        let tags = Taggers::new(&[new.clone(), old.clone()]).unwrap();
        let t = tags.tags(&[b"caller", b"c"]);
        assert_eq!(t[0], Tagger::new(&new).unwrap().tag(&[b"caller", b"c"]));
        assert_eq!(t[1], Tagger::new(&old).unwrap().tag(&[b"caller", b"c"]));
        assert_eq!(tags.tag(&[b"caller", b"c"]), t[0]);
    }

    #[test]
    fn previous_keys_are_read_from_their_files_and_named_when_bad() {
        let dir = tempfile::tempdir().unwrap();
        let (cur, prev, bad) = (
            dir.path().join("cur"),
            dir.path().join("prev"),
            dir.path().join("bad"),
        );
        std::fs::write(&cur, "01".repeat(32)).unwrap();
        std::fs::write(&prev, format!("{}\n", "02".repeat(32))).unwrap();
        std::fs::write(&bad, "not hex").unwrap();
        let mut c = cfg();
        c.encryption_key_file = Some(cur.clone());
        c.previous_encryption_key_files = vec![prev.clone()];
        let s = SharedSecrets::load_with(&c, None).unwrap();
        assert_eq!((*s.keys[0], *s.keys[1]), ([1; 32], [2; 32]));
        c.previous_encryption_key_files = vec![prev, bad];
        let err = SharedSecrets::load_with(&c, None).unwrap_err().to_string();
        assert!(
            err.starts_with("cache.shared.previous_encryption_key_files[1]"),
            "{err}"
        );
        assert!(!err.contains("not hex"), "{err}");
        c.previous_encryption_key_files = vec![cur];
        let err = SharedSecrets::load_with(&c, None).unwrap_err().to_string();
        assert!(err.contains("the same key"), "{err}");
    }

    #[test]
    fn tags_are_stable_per_key_and_tell_parts_apart() {
        let t = Tagger::new(&[7; 32]).unwrap();
        assert_eq!(t.tag(&[b"caller", b"c"]), t.tag(&[b"caller", b"c"]));
        assert_eq!(t.tag(&[b"caller", b"c"]).len(), 16);
        assert_ne!(t.tag(&[b"ab", b"c"]), t.tag(&[b"a", b"bc"]));
        assert_ne!(
            t.tag(&[b"caller", b"c"]),
            Tagger::new(&[8; 32]).unwrap().tag(&[b"caller", b"c"])
        );
    }

    #[test]
    fn the_key_comes_from_the_file_or_the_environment_and_must_be_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        let err = SharedSecrets::load_with(&c, None).unwrap_err().to_string();
        assert!(err.contains("cache.shared.encryption_key_file"), "{err}");
        let good = "ab".repeat(32);
        assert!(SharedSecrets::load_with(&c, Some(Zeroizing::new(good.clone()))).is_ok());
        let short = "abcd1234";
        let err = SharedSecrets::load_with(&c, Some(Zeroizing::new(short.into())))
            .unwrap_err()
            .to_string();
        assert!(!err.contains(short), "the key is never echoed: {err}");
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{}\n", "0f".repeat(32))).unwrap();
        c.encryption_key_file = Some(path);
        let s = SharedSecrets::load_with(&c, None).unwrap();
        assert_eq!(*s.keys[0], [0x0f; 32]);
        assert_eq!(format!("{s:?}"), "SharedSecrets([redacted])");
    }

    #[test]
    fn the_password_comes_from_its_file_or_the_url_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "hunter2\n").unwrap();
        let mut c = cfg();
        c.password_file = Some(path);
        let key = Some(Zeroizing::new("ab".repeat(32)));
        let s = SharedSecrets::load_with(&c, key).unwrap();
        assert_eq!(s.password.as_deref().map(String::as_str), Some("hunter2"));
        assert!(c.validate(Duration::from_secs(10)).is_ok());
        c.url = Some("redis://:inline@127.0.0.1:6379".into());
        let err = c.validate(Duration::from_secs(10)).unwrap_err().to_string();
        assert!(err.starts_with("cache.shared.password_file"), "{err}");
        assert!(!err.contains("inline"), "{err}");
        assert!(!format!("{c:?}").contains("inline"));
    }
}
