//! Kubernetes projected service-account tokens: the caller sends the token its pod was given
//! (`Authorization: Bearer <jwt>`), and [`ServiceAccounts::verify`] turns it into the service
//! account it was issued to, `namespace:name`, or an [`AuthError`] whose reason tells an
//! operator what to fix.
//!
//! What is checked, in order: the token's size (8 KiB at most) and shape, its header (no
//! `crit`, `alg` RS256 or ES256 only, never `none` nor an HMAC, a `kid` the JWKS has, and the
//! `alg` that key is for), then with jsonwebtoken the signature (by ring) and the claims: `iss`
//! equal to the configured issuer, `aud` holding one of the configured audiences, `exp` and
//! `nbf` with 60 s of leeway, and `sub` = `system:serviceaccount:<namespace>:<name>`.
//!
//! A verified token is remembered by its SHA-256 until its `exp` (10,000 at most, least
//! recently used out first), so that a caller sending the same token again does not pay a
//! signature check per request. A remembered token still needs its key to be in the JWKS, and
//! the memory is cleared by every reload, so a revoked caller or a withdrawn key is forgotten
//! at once. Tokens never leave this module: not in errors, logs or metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use tokio::sync::Notify;

use super::jwks::{install_provider, read_file, KeySet};
use crate::config::{is_service_account, ConfigError, KubernetesConfig};
use crate::error::AuthError;
use crate::metrics::Metrics;
use crate::secret::SecretDigest;

/// The largest token read; a longer bearer value is refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 60;
/// Most verified tokens remembered.
const MEMO_CAPACITY: u64 = 10_000;
/// What the API server writes before `<namespace>:<name>` in `sub`.
const SUBJECT_PREFIX: &str = "system:serviceaccount:";

/// True for a bearer value shaped as a compact JWS (three base64url segments joined by dots,
/// the first two not empty). Any other value is a static secret, as before service accounts.
pub fn looks_like_jwt(value: &[u8]) -> bool {
    let mut segments = value.split(|b| *b == b'.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return false;
    };
    let base64url = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    !header.is_empty()
        && !payload.is_empty()
        && base64url(header)
        && base64url(payload)
        && base64url(signature)
}

/// What the broker acts on in a token's header, before any key is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtHeader {
    /// RS256 or ES256: nothing else gets this far.
    pub alg: Algorithm,
    /// The signing key's id.
    pub kid: String,
}

/// Reads the header of `token`: over 8 KiB, not a JWS, not a JSON object, or with a `crit`
/// parameter is `Malformed`; an `alg` other than RS256 or ES256 is `BadSignature`; no `kid` is
/// `UnknownKey`.
pub fn read_header(token: &[u8]) -> Result<JwtHeader, AuthError> {
    if token.len() > MAX_TOKEN_BYTES || !looks_like_jwt(token) {
        return Err(AuthError::Malformed);
    }
    let encoded = token.split(|b| *b == b'.').next().unwrap_or_default();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| AuthError::Malformed)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
    // Extensions the broker does not understand must not be ignored (RFC 7515, 4.1.11): it
    // understands none.
    if header.contains_key("crit") {
        return Err(AuthError::Malformed);
    }
    let alg = match header.get("alg").and_then(|a| a.as_str()) {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        Some(_) => return Err(AuthError::BadSignature),
        None => return Err(AuthError::Malformed),
    };
    let kid = header
        .get("kid")
        .and_then(|k| k.as_str())
        .filter(|k| !k.is_empty())
        .ok_or(AuthError::UnknownKey)?;
    Ok(JwtHeader {
        alg,
        kid: kid.to_owned(),
    })
}

/// The claims read once the signature and the registered claims hold.
#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// What jsonwebtoken checks: per algorithm, since each key verifies one.
struct Rules {
    rs256: Validation,
    es256: Validation,
}

impl Rules {
    fn of(k: &KubernetesConfig) -> Self {
        let rule = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = LEEWAY_SECS;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = true;
            v.set_issuer(&[&k.issuer]);
            v.set_audience(&k.audiences);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            v
        };
        Self {
            rs256: rule(Algorithm::RS256),
            es256: rule(Algorithm::ES256),
        }
    }
}

/// A verified token, remembered.
#[derive(Clone)]
struct Memo {
    account: Arc<str>,
    kid: Arc<str>,
    exp: u64,
}

/// Drops a remembered token when its `exp` (plus the leeway) has passed.
struct UntilExp;

impl moka::Expiry<SecretDigest, Memo> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &SecretDigest,
        memo: &Memo,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(
            (memo.exp + LEEWAY_SECS).saturating_sub(unix_now()),
        ))
    }
}

/// What a reload applies to a running [`ServiceAccounts`]: the rules, and the keys re-read from
/// `jwks_file` (none with `jwks_url`: its refresher keeps them).
pub struct Prepared {
    rules: Rules,
    keys: Option<KeySet>,
}

/// The verifier of `[auth.kubernetes]`: see the module docs.
pub struct ServiceAccounts {
    rules: ArcSwap<Rules>,
    keys: ArcSwap<KeySet>,
    memo: moka::sync::Cache<SecretDigest, Memo>,
    unknown_key: Arc<Notify>,
    /// A token named an unknown key since the last fetch: one wake-up is enough for any number.
    refresh_wanted: AtomicBool,
    signature_checks: AtomicU64,
    /// Moves on whenever what was remembered may no longer hold (every token forgotten, or
    /// another key set): a connection's own memo ([`super::callers::KnownToken`]) holds only
    /// while it has not moved.
    generation: AtomicU64,
}

impl ServiceAccounts {
    /// The verifier of a validated `[auth.kubernetes]`, its `jwks_file` read now. With
    /// `jwks_url` it has no key until [`ServiceAccounts::set_keys`].
    pub fn from_config(k: &KubernetesConfig) -> Result<Self, ConfigError> {
        let Prepared { keys, .. } = Self::prepare(k)?;
        Ok(Self::new(k, keys.unwrap_or_default()))
    }

    /// The verifier of `k`'s issuer and audiences with these keys (its key source unused).
    pub fn new(k: &KubernetesConfig, keys: KeySet) -> Self {
        install_provider();
        Self {
            rules: ArcSwap::from_pointee(Rules::of(k)),
            keys: ArcSwap::from_pointee(keys),
            memo: moka::sync::Cache::builder()
                .max_capacity(MEMO_CAPACITY)
                .expire_after(UntilExp)
                .build(),
            unknown_key: Arc::new(Notify::new()),
            refresh_wanted: AtomicBool::new(false),
            signature_checks: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// Reads and checks what a reload of `k` would apply, changing nothing yet.
    pub fn prepare(k: &KubernetesConfig) -> Result<Prepared, ConfigError> {
        let keys = match &k.jwks_file {
            Some(path) => Some(read_file(path)?),
            None => None,
        };
        Ok(Prepared {
            rules: Rules::of(k),
            keys,
        })
    }

    /// Applies a reload: new rules, the re-read keys, and every remembered token forgotten.
    pub fn apply(&self, prepared: Prepared, metrics: &Metrics) {
        self.rules.store(Arc::new(prepared.rules));
        if let Some(keys) = prepared.keys {
            self.set_keys(keys, metrics, "file");
        }
        self.forget_all();
    }

    /// Forgets every remembered token: the next request with each pays a full check.
    pub fn forget_all(&self) {
        self.memo.invalidate_all();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Where the verifier stands: it moves on when remembered tokens are forgotten or the keys
    /// change, and with it every connection's memo lapses.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `keys` (from `source`: `file` or `url`) in use. A remembered token whose key is no
    /// longer among them is checked afresh, and refused.
    pub fn set_keys(&self, keys: KeySet, metrics: &Metrics, source: &str) {
        metrics
            .jwks_keys
            .with_label_values(&[source])
            .set(i64::try_from(keys.len()).unwrap_or(i64::MAX));
        self.keys.store(Arc::new(keys));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The keys in use.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Notified when a token names a key that is not in use: the refresher fetches then.
    pub fn unknown_key_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.unknown_key)
    }

    /// Called by the refresher after each fetch: the next unknown key asks for another.
    pub fn fetched(&self) {
        self.refresh_wanted.store(false, Ordering::Release);
    }

    /// How many signatures were checked so far (remembered tokens are not checked again).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// The service account (`namespace:name`) that `token` (whose SHA-256 is `digest`) was
    /// issued to, or why it is refused.
    pub fn verify(&self, token: &[u8], digest: &SecretDigest) -> Result<Arc<str>, AuthError> {
        match self.remembered(digest) {
            Some(known) => known,
            None => self.verify_afresh(token, digest),
        }
        .map(|v| v.account)
    }

    /// What a token verified before (known by its SHA-256, `digest`) is now: its service
    /// account, or `Expired` past its `exp`. `None` when it is not remembered, or its key was
    /// withdrawn (then it must be checked afresh, and is refused). Checked before anything is
    /// read of the token, so that a known token costs one lookup.
    pub fn remembered(&self, digest: &SecretDigest) -> Option<Result<Verified, AuthError>> {
        let memo = self.memo.get(digest)?;
        if expired(memo.exp) {
            self.memo.invalidate(digest);
            return Some(Err(AuthError::Expired));
        }
        if self.keys.load().contains(&memo.kid) {
            return Some(Ok(Verified {
                account: memo.account,
                exp: memo.exp,
            }));
        }
        self.memo.invalidate(digest);
        None
    }

    /// [`ServiceAccounts::verify`] of a token not remembered: its header, key, signature and
    /// claims, then remembered.
    pub fn verify_afresh(
        &self,
        token: &[u8],
        digest: &SecretDigest,
    ) -> Result<Verified, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let header = read_header(token)?;
        let keys = self.keys.load();
        let Some(key) = keys.get(&header.kid) else {
            if !self.refresh_wanted.swap(true, Ordering::AcqRel) {
                self.unknown_key.notify_one();
            }
            return Err(AuthError::UnknownKey);
        };
        if key.alg != header.alg {
            return Err(AuthError::BadSignature);
        }
        let text = std::str::from_utf8(token).map_err(|_| AuthError::Malformed)?;
        let rules = self.rules.load();
        let rule = match header.alg {
            Algorithm::RS256 => &rules.rs256,
            _ => &rules.es256,
        };
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let claims = jsonwebtoken::decode::<Claims>(text, &key.decoding, rule)
            .map_err(|e| reason(e.kind()))?
            .claims;
        let account = claims
            .sub
            .strip_prefix(SUBJECT_PREFIX)
            .filter(|a| is_service_account(a))
            .ok_or(AuthError::UnknownServiceAccount)?;
        let account: Arc<str> = account.into();
        self.memo.insert(
            *digest,
            Memo {
                account: Arc::clone(&account),
                kid: header.kid.into(),
                exp: claims.exp,
            },
        );
        Ok(Verified {
            account,
            exp: claims.exp,
        })
    }
}

/// A token found good: the service account it names, and its `exp` (Unix seconds).
#[derive(Debug, Clone)]
pub struct Verified {
    /// `namespace:name`.
    pub account: Arc<str>,
    /// The token's `exp`.
    pub exp: u64,
}

/// True once a token whose `exp` this is may no longer be accepted (the leeway past it).
pub fn expired(exp: u64) -> bool {
    unix_now() > exp + LEEWAY_SECS
}

/// The refusal reason of jsonwebtoken's error: what an operator would fix.
fn reason(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => AuthError::BadSignature,
        ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => AuthError::Expired,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "aud" => AuthError::WrongAudience,
            "iss" => AuthError::WrongIssuer,
            "sub" => AuthError::UnknownServiceAccount,
            _ => AuthError::Malformed,
        },
        _ => AuthError::Malformed,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::callers::{Caller, Callers, KnownToken, Peer};
    use crate::config::ClientConfig;
    use http::HeaderMap;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use serde_json::json;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    struct Ec {
        pair: EcdsaKeyPair,
        kid: String,
    }

    impl Ec {
        fn new(kid: &str) -> Self {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            Ec {
                pair,
                kid: kid.into(),
            }
        }
        fn jwk(&self) -> serde_json::Value {
            let point = self.pair.public_key().as_ref();
            json!({"kty":"EC","crv":"P-256","use":"sig","alg":"ES256","kid":self.kid,
                   "x": b64(&point[1..33]), "y": b64(&point[33..])})
        }
        fn sign(&self, header: serde_json::Value, claims: serde_json::Value) -> String {
            let msg = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let sig = self
                .pair
                .sign(&SystemRandom::new(), msg.as_bytes())
                .unwrap();
            format!("{msg}.{}", b64(sig.as_ref()))
        }
        fn token(&self, claims: serde_json::Value) -> String {
            self.sign(json!({"alg":"ES256","kid":self.kid,"typ":"JWT"}), claims)
        }
    }

    fn claims(sub: &str) -> serde_json::Value {
        let now = unix_now();
        json!({"iss": ISSUER, "aud": ["token-broker"], "sub": sub, "iat": now, "nbf": now, "exp": now + 3600})
    }

    fn verifier(dir: &std::path::Path, keys: &[&Ec]) -> ServiceAccounts {
        let path = dir.join("jwks.json");
        let jwks = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
        std::fs::write(&path, jwks.to_string()).unwrap();
        ServiceAccounts::from_config(&KubernetesConfig {
            issuer: ISSUER.into(),
            audiences: vec!["token-broker".into()],
            jwks_file: Some(path),
            jwks_url: None,
            ca_file: None,
            jwks_token_file: None,
            jwks_refresh: Duration::from_secs(300),
        })
        .unwrap()
    }

    fn check(v: &ServiceAccounts, token: &str) -> Result<Arc<str>, AuthError> {
        v.verify(token.as_bytes(), &SecretDigest::of(token.as_bytes()))
    }

    #[test]
    fn only_compact_jws_shapes_look_like_jwts() {
        for yes in ["a.b.c", "a.b.", "eyJ-_.x_Y.Zz09"] {
            assert!(looks_like_jwt(yes.as_bytes()), "{yes}");
        }
        for no in [
            "secret", "a.b", "a.b.c.d", ".b.c", "a..c", "a.b.c=", "a+b.c.d", "",
        ] {
            assert!(!looks_like_jwt(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn the_header_is_read_before_any_key_is_used() {
        let enc = |h: serde_json::Value| format!("{}.e30.", b64(h.to_string().as_bytes()));
        assert_eq!(
            read_header(enc(json!({"alg":"ES256","kid":"k"})).as_bytes()),
            Ok(JwtHeader {
                alg: Algorithm::ES256,
                kid: "k".into()
            })
        );
        for (header, want) in [
            (json!({"alg":"none","kid":"k"}), AuthError::BadSignature),
            (json!({"alg":"HS256","kid":"k"}), AuthError::BadSignature),
            (json!({"alg":"PS256","kid":"k"}), AuthError::BadSignature),
            (json!({"kid":"k"}), AuthError::Malformed),
            (json!({"alg":"ES256"}), AuthError::UnknownKey),
            (json!({"alg":"ES256","kid":""}), AuthError::UnknownKey),
            (
                json!({"alg":"ES256","kid":"k","crit":["exp"]}),
                AuthError::Malformed,
            ),
            (json!(["alg"]), AuthError::Malformed),
        ] {
            assert_eq!(
                read_header(enc(header.clone()).as_bytes()),
                Err(want),
                "{header}"
            );
        }
        let huge = format!(
            "{}.{}.x",
            b64(br#"{"alg":"ES256","kid":"k"}"#),
            "a".repeat(MAX_TOKEN_BYTES)
        );
        assert_eq!(read_header(huge.as_bytes()), Err(AuthError::Malformed));
    }

    #[test]
    fn a_valid_token_names_its_service_account_and_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let key = Ec::new("k1");
        let v = verifier(dir.path(), &[&key]);
        let token = key.token(claims("system:serviceaccount:shop:checkout"));
        assert_eq!(&*check(&v, &token).unwrap(), "shop:checkout");
        assert_eq!(v.signature_checks(), 1);
        assert_eq!(&*check(&v, &token).unwrap(), "shop:checkout");
        assert_eq!(v.signature_checks(), 1, "the second one was remembered");
        v.forget_all();
        assert_eq!(&*check(&v, &token).unwrap(), "shop:checkout");
        assert_eq!(v.signature_checks(), 2, "a reload forgets");
    }

    #[test]
    fn a_remembered_token_whose_key_was_withdrawn_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (Ec::new("old"), Ec::new("new"));
        let v = verifier(dir.path(), &[&old]);
        let token = old.token(claims("system:serviceaccount:shop:checkout"));
        check(&v, &token).unwrap();
        let metrics = Metrics::new(prometheus::Registry::new()).unwrap();
        v.set_keys(
            KeySet::parse(json!({"keys":[new.jwk()]}).to_string().as_bytes()).unwrap(),
            &metrics,
            "url",
        );
        assert_eq!(check(&v, &token), Err(AuthError::UnknownKey));
    }

    /// A connection of the caller `checkout` (service account `shop:checkout`), whose token
    /// `signer` signed, to a verifier of `keys`.
    struct Connection {
        _dir: tempfile::TempDir,
        verifier: Arc<ServiceAccounts>,
        callers: Arc<Callers>,
        headers: HeaderMap,
        known: KnownToken,
    }

    impl Connection {
        fn new(keys: &[&Ec], signer: &Ec) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let verifier = Arc::new(verifier(dir.path(), keys));
            let client = Caller::from_config(
                0,
                &ClientConfig {
                    id: "checkout".into(),
                    service_account: Some("shop:checkout".into()),
                    ..Default::default()
                },
            )
            .unwrap();
            let token = signer.token(claims("system:serviceaccount:shop:checkout"));
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            Self {
                callers: Arc::new(
                    Callers::new(vec![client]).with_service_accounts(Some(Arc::clone(&verifier))),
                ),
                _dir: dir,
                verifier,
                headers,
                known: KnownToken::default(),
            }
        }

        /// The next request, checked against `callers`: the caller's id.
        fn ask(&mut self, callers: &Arc<Callers>) -> Result<Arc<str>, AuthError> {
            Callers::authenticate_on(callers, &self.headers, &Peer::default(), &mut self.known)
                .map(|c| Arc::clone(&c.id))
        }
    }

    #[test]
    fn a_connection_checks_its_token_again_once_the_verifier_forgets() {
        let key = Ec::new("k1");
        let mut c = Connection::new(&[&key], &key);
        let callers = Arc::clone(&c.callers);
        for _ in 0..3 {
            assert_eq!(c.ask(&callers).as_deref(), Ok("checkout"));
        }
        assert_eq!(c.verifier.signature_checks(), 1);
        c.verifier.forget_all();
        c.ask(&callers).unwrap();
        assert_eq!(
            c.verifier.signature_checks(),
            2,
            "a reload forgets on every connection too"
        );
    }

    #[test]
    fn a_connection_whose_token_key_was_withdrawn_is_refused_on_its_next_request() {
        let (old, new) = (Ec::new("old"), Ec::new("new"));
        let mut c = Connection::new(&[&old], &old);
        let callers = Arc::clone(&c.callers);
        c.ask(&callers).unwrap();
        let metrics = Metrics::new(prometheus::Registry::new()).unwrap();
        c.verifier.set_keys(
            KeySet::parse(json!({"keys":[new.jwk()]}).to_string().as_bytes()).unwrap(),
            &metrics,
            "url",
        );
        assert_eq!(c.ask(&callers), Err(AuthError::UnknownKey));
    }

    #[test]
    fn a_connection_whose_caller_was_revoked_is_refused_on_its_next_request() {
        let key = Ec::new("k1");
        let mut c = Connection::new(&[&key], &key);
        let callers = Arc::clone(&c.callers);
        c.ask(&callers).unwrap();
        let reloaded =
            Arc::new(Callers::new(Vec::new()).with_service_accounts(Some(Arc::clone(&c.verifier))));
        assert_eq!(c.ask(&reloaded), Err(AuthError::UnknownServiceAccount));
    }

    #[test]
    fn claims_are_checked_after_the_signature() {
        let dir = tempfile::tempdir().unwrap();
        let key = Ec::new("k1");
        let v = verifier(dir.path(), &[&key]);
        let sa = "system:serviceaccount:shop:checkout";
        let now = unix_now();
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = claims(sa);
            f(&mut c);
            check(&v, &key.token(c))
        };
        assert_eq!(
            with(&|c| c["aud"] = json!(["vault"])),
            Err(AuthError::WrongAudience)
        );
        assert_eq!(
            with(&|c| c["aud"] = json!("token-broker")).as_deref(),
            Ok("shop:checkout"),
            "a single audience string"
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            Err(AuthError::WrongAudience)
        );
        assert_eq!(
            with(&|c| c["iss"] = json!("https://other.cluster")),
            Err(AuthError::WrongIssuer)
        );
        assert_eq!(
            with(&|c| c["exp"] = json!(now - 120)),
            Err(AuthError::Expired)
        );
        assert_eq!(
            with(&|c| c["exp"] = json!(now - 30)).as_deref(),
            Ok("shop:checkout"),
            "60 s of leeway"
        );
        assert_eq!(
            with(&|c| c["nbf"] = json!(now + 600)),
            Err(AuthError::Expired)
        );
        assert_eq!(
            with(&|c| c["nbf"] = json!("later")),
            Err(AuthError::Malformed),
            "a claim of the wrong type is not skipped"
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            with(&|c| c["sub"] = json!("system:node:worker-1")),
            Err(AuthError::UnknownServiceAccount)
        );
        // Claims swapped under a genuine signature.
        let genuine = key.token(claims(sa));
        let other = key.token(claims("system:serviceaccount:kube-system:admin"));
        let parts: Vec<&str> = genuine.split('.').collect();
        let payload = other.split('.').nth(1).unwrap();
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(check(&v, &tampered), Err(AuthError::BadSignature));
    }

    #[test]
    fn a_key_verifies_only_its_own_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let key = Ec::new("k1");
        let other = Ec::new("k1");
        let v = verifier(dir.path(), &[&key]);
        let sa = "system:serviceaccount:shop:checkout";
        // Another key's signature under this kid.
        assert_eq!(
            check(&v, &other.token(claims(sa))),
            Err(AuthError::BadSignature)
        );
        // RS256 claimed for an EC key.
        let t = key.sign(json!({"alg":"RS256","kid":"k1"}), claims(sa));
        assert_eq!(check(&v, &t), Err(AuthError::BadSignature));
        // Unknown kid.
        let t = key.sign(json!({"alg":"ES256","kid":"k9"}), claims(sa));
        assert_eq!(check(&v, &t), Err(AuthError::UnknownKey));
    }

    #[test]
    fn a_jwks_keeps_only_signing_keys_it_can_use() {
        let ec = Ec::new("ec").jwk();
        let oct = json!({"kty":"oct","kid":"h","k":"c2VjcmV0"});
        let enc = {
            let mut j = Ec::new("enc").jwk();
            j["use"] = json!("enc");
            j
        };
        let small_rsa = json!({"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB"});
        let no_kid = {
            let mut j = Ec::new("x").jwk();
            j.as_object_mut().unwrap().remove("kid");
            j
        };
        let weird = json!({"kty":"OKP","crv":"X448","kid":"w","x":"AA"});
        let set = KeySet::parse(
            json!({"keys":[ec, oct, enc, small_rsa, no_kid, weird]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(set.kids(), ["ec"]);
        assert!(matches!(
            KeySet::parse(br#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#),
            Err(crate::auth::JwksError::NoUsableKey)
        ));
        assert!(KeySet::parse(b"[]").is_err());
    }
}
