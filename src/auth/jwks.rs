//! The cluster's signing keys: a JWKS document read into a [`KeySet`], from `jwks_file` or
//! fetched from `jwks_url` ([`JwksSource`]) and kept fresh by a background [`Refresher`].
//!
//! Only signing keys the broker verifies with are kept: RSA keys (RS256, 2048 bits or more) and
//! P-256 keys (ES256), each with a `kid`. Symmetric (`oct`) keys, encryption keys and any other
//! algorithm are skipped, so no JWKS can make the broker check an HMAC with a public key.
//!
//! The signatures themselves are checked by ring, the one crypto library of the broker (rustls
//! uses it too), plugged into jsonwebtoken through its `CryptoProvider` ([`install_provider`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtVerifier};
use jsonwebtoken::errors::{Error as JoseError, ErrorKind};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::kubernetes::ServiceAccounts;
use crate::config::{ConfigError, KubernetesConfig};
use crate::metrics::Metrics;

/// Largest JWKS document read, from a file or a server.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The longest one fetch of `jwks_url` may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a JWKS could not be had. Never holds a token or a credential.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The document is not a JWKS (`{"keys":[...]}`).
    #[error("not a JWKS document: {0}")]
    NotJwks(String),
    /// The document holds no key the broker can verify with.
    #[error(
        "no usable signing key: the JWKS needs an RSA (RS256) or P-256 (ES256) key with a kid"
    )]
    NoUsableKey,
    /// `jwks_url` could not be fetched, or answered something else than a JWKS.
    #[error("cannot fetch the JWKS from {url}: {reason}")]
    Fetch { url: String, reason: String },
}

/// One signing key, with the one algorithm it verifies.
pub struct Key {
    pub(super) alg: Algorithm,
    pub(super) decoding: DecodingKey,
}

/// The signing keys of a JWKS, by `kid`.
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.keys.keys()).finish()
    }
}

impl KeySet {
    /// Reads a JWKS document, keeping the usable signing keys (see the module docs). Fails when
    /// it is not a JWKS or none of its keys is usable.
    pub fn parse(json: &[u8]) -> Result<Self, JwksError> {
        install_provider();
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let doc: Document =
            serde_json::from_slice(json).map_err(|e| JwksError::NotJwks(e.to_string()))?;
        let mut keys = HashMap::new();
        for value in doc.keys {
            // A key of a kind this version of jsonwebtoken does not know is skipped, not fatal.
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            if let Some((kid, key)) = usable(&jwk) {
                keys.insert(kid, key);
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Self { keys })
    }

    /// The key named `kid`.
    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.get(kid)
    }

    /// True when a key is named `kid`.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when there is no key (before the first fetch of `jwks_url`).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `kid`s, sorted (for logs: key ids are public).
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

/// The `kid` and key of a JWK the broker verifies with, or `None`.
fn usable(jwk: &Jwk) -> Option<(String, Key)> {
    let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty())?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(rsa), None | Some(KeyAlgorithm::RS256)) => {
            let n = base64_len(&rsa.n);
            // ring refuses RSA keys under 2048 bits; skip them here rather than at each token.
            (n >= 256).then_some(Algorithm::RS256)?
        }
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        _ => return None,
    };
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, Key { alg, decoding }))
}

/// Bytes of a base64url value without leading zero bytes (an RSA modulus's size).
fn base64_len(value: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map(|b| b.iter().skip_while(|x| **x == 0).count())
        .unwrap_or(0)
}

/// Reads `[auth.kubernetes] jwks_file`, naming the key in the error.
pub fn read_file(path: &Path) -> Result<KeySet, ConfigError> {
    let key = "auth.kubernetes.jwks_file";
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(ConfigError::invalid(
            key,
            format!("{} is over 1 MiB", path.display()),
        ));
    }
    KeySet::parse(&bytes).map_err(|e| ConfigError::invalid(key, format!("{}: {e}", path.display())))
}

/// `jwks_url` and the HTTPS client that fetches it.
pub struct JwksSource {
    url: http::Uri,
    token_file: Option<PathBuf>,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl JwksSource {
    /// The source of a `[auth.kubernetes]` with `jwks_url`, `None` with `jwks_file`. Reads
    /// `ca_file` now; fetches nothing.
    pub fn from_config(k: &KubernetesConfig) -> Result<Option<Self>, ConfigError> {
        let Some(url) = &k.jwks_url else {
            return Ok(None);
        };
        let url: http::Uri = url
            .parse()
            .map_err(|_| ConfigError::invalid("auth.kubernetes.jwks_url", "is not a URL"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error = |e: rustls::Error| ConfigError::invalid("auth.kubernetes", e.to_string());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match &k.ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in ca_certificates(path)? {
                    roots.add(cert).map_err(|e| {
                        ConfigError::invalid(
                            "auth.kubernetes.ca_file",
                            format!("{}: {e}", path.display()),
                        )
                    })?;
                }
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(tls_error)?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
            None => builder
                .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
                .map_err(tls_error)?,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(FETCH_TIMEOUT));
        let https = builder.https_only().enable_http1().wrap_connector(http);
        Ok(Some(Self {
            url,
            token_file: k.jwks_token_file.clone(),
            client: Client::builder(TokioExecutor::new()).build(https),
        }))
    }

    /// Fetches and reads the JWKS, within 10 s.
    pub async fn fetch(&self) -> Result<KeySet, JwksError> {
        let fail = |reason: String| JwksError::Fetch {
            url: self.url.to_string(),
            reason,
        };
        let mut req = http::Request::get(self.url.clone()).header("accept", "application/json");
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
            let mut value = http::HeaderValue::try_from(format!("Bearer {}", token.trim()))
                .map_err(|_| fail(format!("{} does not hold a bearer token", path.display())))?;
            value.set_sensitive(true);
            req = req.header(http::header::AUTHORIZATION, value);
        }
        let req = req.body(Empty::new()).map_err(|e| fail(e.to_string()))?;
        let read = async {
            let answer = self.client.request(req).await.map_err(|e| {
                // The connection error's own chain says why (refused, TLS, DNS); never a header.
                let mut reason = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    reason = format!("{reason}: {s}");
                    source = s.source();
                }
                fail(reason)
            })?;
            if answer.status() != http::StatusCode::OK {
                return Err(fail(format!("answered {}", answer.status())));
            }
            let body = Limited::new(answer.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            KeySet::parse(&body)
        };
        tokio::time::timeout(FETCH_TIMEOUT, read)
            .await
            .map_err(|_| fail("no answer within 10 s".into()))?
    }
}

fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let key = "auth.kubernetes.ca_file";
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            ConfigError::invalid(
                key,
                format!("cannot read certificates from {}: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// The task that keeps a [`JwksSource`]'s keys fresh in a [`ServiceAccounts`]: every
/// `jwks_refresh`, and soon after a token named an unknown key, but never two fetches less
/// than `min_gap` apart. A failed fetch keeps the keys in use. Aborted when dropped, so it
/// stops with the broker.
pub struct Refresher {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Refresher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Refresher {
    /// Starts refreshing, counting every fetch in `token_broker_jwks_refreshes_total`. The
    /// first fetch (at start) has just happened.
    pub fn spawn(
        source: JwksSource,
        verifier: Arc<ServiceAccounts>,
        every: Duration,
        min_gap: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let task = tokio::spawn(async move {
            let signal = verifier.unknown_key_signal();
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(last + every) => {}
                    _ = signal.notified() => {}
                }
                tokio::time::sleep_until(last + min_gap).await;
                last = tokio::time::Instant::now();
                let fetched = source.fetch().await;
                verifier.fetched();
                match fetched {
                    Ok(keys) => {
                        metrics.jwks_refreshes.with_label_values(&["ok"]).inc();
                        let before = verifier.keys();
                        if before.kids() != keys.kids() {
                            tracing::info!(kids = ?keys.kids(), "service-account signing keys changed");
                        }
                        verifier.set_keys(keys, &metrics, "url");
                    }
                    Err(e) => {
                        metrics.jwks_refreshes.with_label_values(&["error"]).inc();
                        tracing::warn!(
                            keys = verifier.keys().len(),
                            "JWKS refresh failed, the keys in use are kept: {e}"
                        );
                    }
                }
            }
        });
        Self { task }
    }
}

/// Makes ring jsonwebtoken's crypto provider, once per process.
pub fn install_provider() {
    static ONCE: Once = Once::new();
    // Another provider installed first (none is, in this process) would be used as it is.
    ONCE.call_once(|| {
        let _ = RING.install_default();
    });
}

static RING: CryptoProvider = CryptoProvider {
    signer_factory: |_, _| Err(ErrorKind::InvalidAlgorithm.into()),
    verifier_factory: ring_verifier,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components: |_| Err(ErrorKind::InvalidKeyFormat.into()),
        extract_ec_public_key_coordinates: |_, _| Err(ErrorKind::InvalidKeyFormat.into()),
        compute_digest: |data, hash| {
            use jsonwebtoken::jwk::ThumbprintHash;
            let alg = match hash {
                ThumbprintHash::SHA256 => &ring::digest::SHA256,
                ThumbprintHash::SHA384 => &ring::digest::SHA384,
                ThumbprintHash::SHA512 => &ring::digest::SHA512,
            };
            ring::digest::digest(alg, data).as_ref().to_vec()
        },
    },
};

/// RS256 over an RSA key of 2048 to 8192 bits, ES256 over a P-256 point: nothing else.
fn ring_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, JoseError> {
    match (alg, key.family(), key.kind()) {
        (Algorithm::RS256, AlgorithmFamily::Rsa, DecodingKeyKind::RsaModulusExponent { n, e }) => {
            Ok(Box::new(RingRsa {
                n: n.clone(),
                e: e.clone(),
            }))
        }
        (Algorithm::ES256, AlgorithmFamily::Ec, DecodingKeyKind::SecretOrDer(point)) => {
            Ok(Box::new(RingP256(point.clone())))
        }
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

struct RingRsa {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl jsonwebtoken::signature::Verifier<Vec<u8>> for RingRsa {
    fn verify(
        &self,
        msg: &[u8],
        signature: &Vec<u8>,
    ) -> Result<(), jsonwebtoken::signature::Error> {
        ring::signature::RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, msg, signature)
        .map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for RingRsa {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

struct RingP256(Vec<u8>);

impl jsonwebtoken::signature::Verifier<Vec<u8>> for RingP256 {
    fn verify(
        &self,
        msg: &[u8],
        signature: &Vec<u8>,
    ) -> Result<(), jsonwebtoken::signature::Error> {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &self.0)
            .verify(msg, signature)
            .map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for RingP256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}
