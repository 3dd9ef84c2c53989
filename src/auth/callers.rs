//! The configured callers as the broker uses them, built once from `[[clients]]`, and how a
//! request's credentials name one of them.
//!
//! Per caller, up to four credentials: a bearer secret (`token_sha256`), a client certificate
//! valid for a DNS name (`tls_san`, checked with webpki's name matching, the chain having been
//! verified against `server.tls.client_ca_file` during the handshake), a Kubernetes
//! service-account token (`service_account`, see [`super::kubernetes`]) and a client
//! certificate whose one URI SAN is a SPIFFE ID (`spiffe_id`). Any one configured identifies
//! the caller, unless it requires all (`require_all`; the default for secret + `tls_san`).
//!
//! The bearer value decides first: secrets are digested with SHA-256 and compared, in constant
//! time, against every configured digest (no early exit), so neither the secret nor which
//! caller matched leaks through timing. A value that matches no secret and is shaped as a JWT
//! is verified as a service-account token when `[auth.kubernetes]` is set; any other is
//! `unknown`, as ever. Without a bearer value, the certificate names the one caller it
//! identifies alone, or none.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;

use super::kubernetes::{expired, looks_like_jwt, ServiceAccounts, Verified};
use crate::config::{ClientConfig, ConfigError};
use crate::error::AuthError;
use crate::issuance::CallerPolicy;
use crate::passthrough::Pattern;
use crate::secret::SecretDigest;
use crate::wire::bearer_value;

/// A caller as the broker uses it: its name, how it authenticates, what it may ask for.
#[derive(Debug, Clone)]
pub struct Caller {
    /// From `[[clients]] id`.
    pub id: Arc<str>,
    /// From `[[clients]] token_sha256`.
    pub digest: Option<SecretDigest>,
    /// From `[[clients]] tls_san`, lower-cased.
    pub tls_san: Option<Arc<str>>,
    /// From `[[clients]] service_account`: `namespace:name`.
    pub service_account: Option<Arc<str>>,
    /// From `[[clients]] spiffe_id`.
    pub spiffe_id: Option<Arc<str>>,
    /// Whether every configured credential must be presented (`[[clients]] require_all`, or
    /// its default).
    pub require_all: bool,
    /// From `[[clients]] mint_rate`.
    pub mint_rate: Option<u32>,
    /// From the `allowed_*` lists and `drop_in`.
    pub policy: Arc<CallerPolicy>,
    /// From `[[clients]] passthrough`.
    pub passthrough: Arc<[Pattern]>,
}

impl Caller {
    /// The caller of the validated entry `clients[i]`; a pass-through entry that does not parse
    /// is refused here, naming it.
    pub fn from_config(i: usize, c: &ClientConfig) -> Result<Self, ConfigError> {
        let passthrough = c
            .passthrough
            .iter()
            .enumerate()
            .map(|(j, entry)| {
                Pattern::parse(entry).map_err(|reason| {
                    ConfigError::invalid(
                        format!("clients[{i}].passthrough[{j}]"),
                        format!("\"{entry}\": {reason}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let digest = match c.token_sha256.as_deref() {
            None => None,
            Some(hex) => Some(SecretDigest::from_hex(hex).ok_or_else(|| {
                ConfigError::invalid(
                    format!("clients[{i}].token_sha256"),
                    "must be 64 hex digits: the SHA-256 of the caller's secret",
                )
            })?),
        };
        Ok(Self {
            id: c.id.as_str().into(),
            digest,
            tls_san: c.tls_san.as_deref().map(|s| s.to_ascii_lowercase().into()),
            service_account: c.service_account.as_deref().map(Into::into),
            spiffe_id: c.spiffe_id.as_deref().map(Into::into),
            require_all: c.requires_all(),
            mint_rate: c.mint_rate,
            policy: Arc::new(CallerPolicy::from_config(c)),
            passthrough: passthrough.into(),
        })
    }

    /// A caller known by its bearer secret alone, allowed everything (tests, benches).
    pub fn with_secret(id: &str, secret: &[u8]) -> Self {
        Self {
            id: id.into(),
            digest: Some(SecretDigest::of(secret)),
            tls_san: None,
            service_account: None,
            spiffe_id: None,
            require_all: false,
            mint_rate: None,
            policy: Arc::new(CallerPolicy::default()),
            passthrough: Arc::new([]),
        }
    }

    /// True when the peer's certificate matches every certificate credential configured (none
    /// configured: true). What a caller requiring all must show besides its bearer value.
    fn certificate_matches_all(&self, peer: &Peer) -> bool {
        self.tls_san
            .as_deref()
            .is_none_or(|san| peer.certificate_valid_for(san))
            && self
                .spiffe_id
                .as_deref()
                .is_none_or(|id| peer.spiffe_id().as_deref() == Some(id))
    }

    /// True when the peer's certificate alone identifies this caller: one of its certificate
    /// credentials matches, or, requiring all, it has no bearer credential and all match.
    fn identified_by_certificate(&self, peer: &Peer, spiffe_id: Option<&str>) -> bool {
        let san = self
            .tls_san
            .as_deref()
            .map(|san| peer.certificate_valid_for(san));
        let spiffe = self.spiffe_id.as_deref().map(|id| spiffe_id == Some(id));
        if self.require_all {
            self.digest.is_none()
                && self.service_account.is_none()
                && (san.is_some() || spiffe.is_some())
                && san != Some(false)
                && spiffe != Some(false)
        } else {
            san == Some(true) || spiffe == Some(true)
        }
    }
}

/// The configured callers, and the verifier of service-account tokens when `[auth.kubernetes]`
/// is set.
#[derive(Clone)]
pub struct Callers {
    /// Each behind its own `Arc`: a request takes its caller with one reference count, not one
    /// per field (the two workers otherwise bounce every field's count between their cores).
    list: Arc<[Arc<Caller>]>,
    service_accounts: Option<Arc<ServiceAccounts>>,
}

impl std::fmt::Debug for Callers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callers")
            .field("list", &self.list)
            .field("service_accounts", &self.service_accounts.is_some())
            .finish()
    }
}

impl Callers {
    /// The callers of a validated config's `[[clients]]`.
    pub fn from_config(clients: &[ClientConfig]) -> Result<Self, ConfigError> {
        let list = clients
            .iter()
            .enumerate()
            .map(|(i, c)| Caller::from_config(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(list))
    }

    /// These callers.
    pub fn new(list: Vec<Caller>) -> Self {
        Self {
            list: list.into_iter().map(Arc::new).collect(),
            service_accounts: None,
        }
    }

    /// These callers, with service-account tokens verified by `verifier`.
    pub fn with_service_accounts(mut self, verifier: Option<Arc<ServiceAccounts>>) -> Self {
        self.service_accounts = verifier;
        self
    }

    /// The verifier of service-account tokens, when `[auth.kubernetes]` is set.
    pub fn service_accounts(&self) -> Option<&Arc<ServiceAccounts>> {
        self.service_accounts.as_ref()
    }

    /// How many callers are configured.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when no caller is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The callers, for the reload that replaces them.
    pub fn iter(&self) -> impl Iterator<Item = &Caller> {
        self.list.iter().map(|c| &**c)
    }

    /// The caller presenting the secret or token in `headers` and/or the certificate of `peer`.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: &Peer,
    ) -> Result<&Arc<Caller>, AuthError> {
        self.check(headers, peer, None)
    }

    /// [`Callers::authenticate`] for a request on a connection that remembers the
    /// service-account token it last proved itself with (`known`): the same token again costs
    /// no lookup in the verifier's shared memo. The connection's memo holds only for these very
    /// callers (a reload swaps them: a revoked caller is refused on its next request), while
    /// the verifier's generation has not moved (a reload or new keys) and until the token's
    /// `exp`.
    pub fn authenticate_on(
        self: &Arc<Self>,
        headers: &HeaderMap,
        peer: &Peer,
        known: &mut KnownToken,
    ) -> Result<&Arc<Caller>, AuthError> {
        self.check(headers, peer, Some((self, known)))
    }

    fn check(
        &self,
        headers: &HeaderMap,
        peer: &Peer,
        connection: Option<(&Arc<Self>, &mut KnownToken)>,
    ) -> Result<&Arc<Caller>, AuthError> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return self.by_certificate(peer);
        };
        let secret = bearer_value(value.as_bytes()).ok_or(AuthError::Malformed)?;
        let presented = SecretDigest::of(secret);
        let mut found = None;
        for client in self.list.iter() {
            if client.digest.is_some_and(|d| d.ct_eq(&presented)) {
                found = Some(client);
            }
        }
        let client = match (found, &self.service_accounts) {
            (Some(client), _) => client,
            (None, Some(verifier)) => {
                let account = match connection {
                    Some((this, known)) => known.account(this, verifier, secret, &presented)?,
                    None => service_account(verifier, secret, &presented)?.account,
                };
                self.list
                    .iter()
                    .find(|c| c.service_account.as_deref() == Some(&*account))
                    .ok_or(AuthError::UnknownServiceAccount)?
            }
            (None, _) => return Err(AuthError::Unknown),
        };
        if client.require_all && !client.certificate_matches_all(peer) {
            return Err(AuthError::CertificateRequired);
        }
        Ok(client)
    }

    /// Without a bearer value: the one caller the peer's certificate identifies alone.
    fn by_certificate(&self, peer: &Peer) -> Result<&Arc<Caller>, AuthError> {
        if peer.certificate.is_none() {
            return Err(AuthError::Missing);
        }
        let spiffe_id = peer.spiffe_id();
        let mut matching = self
            .list
            .iter()
            .filter(|c| c.identified_by_certificate(peer, spiffe_id.as_deref()));
        match (matching.next(), matching.next()) {
            (Some(client), None) => Ok(client),
            (None, _) => Err(AuthError::Unknown),
            // A certificate valid for several callers (a wildcard, say) names none of them.
            (Some(_), Some(_)) => Err(AuthError::Unknown),
        }
    }
}

/// The service account a bearer value that matched no secret names: a token verified before
/// costs one lookup; only an unknown one is read.
fn service_account(
    verifier: &ServiceAccounts,
    token: &[u8],
    digest: &SecretDigest,
) -> Result<Verified, AuthError> {
    match verifier.remembered(digest) {
        Some(known) => known,
        None if looks_like_jwt(token) => verifier.verify_afresh(token, digest),
        None => Err(AuthError::Unknown),
    }
}

/// The service-account token one connection last proved itself with (see
/// [`Callers::authenticate_on`]); empty at first.
#[derive(Debug, Clone, Default)]
pub struct KnownToken(Option<Known>);

#[derive(Debug, Clone)]
struct Known {
    /// The callers it was checked against, held so that their address cannot be reused.
    callers: Arc<Callers>,
    /// The verifier's generation when it was checked.
    generation: u64,
    digest: SecretDigest,
    verified: Verified,
}

impl KnownToken {
    /// The service account of the token whose SHA-256 is `digest`: from this connection's memo
    /// when it still holds, else from the verifier (and remembered here).
    fn account(
        &mut self,
        callers: &Arc<Callers>,
        verifier: &ServiceAccounts,
        token: &[u8],
        digest: &SecretDigest,
    ) -> Result<Arc<str>, AuthError> {
        // Read before the verifier is asked: a reload meanwhile leaves this memo stale, never
        // the other way round.
        let generation = verifier.generation();
        if let Some(known) = &self.0 {
            if Arc::ptr_eq(&known.callers, callers)
                && known.generation == generation
                && known.digest.ct_eq(digest)
            {
                if expired(known.verified.exp) {
                    self.0 = None;
                    return Err(AuthError::Expired);
                }
                return Ok(Arc::clone(&known.verified.account));
            }
        }
        let verified = service_account(verifier, token, digest)?;
        let account = Arc::clone(&verified.account);
        self.0 = Some(Known {
            callers: Arc::clone(callers),
            generation,
            digest: *digest,
            verified,
        });
        Ok(account)
    }
}

/// What the connection tells about the peer: its address, and its verified client
/// certificate if it sent one.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The end-entity certificate, its chain already verified by rustls against the client CA.
    pub certificate: Option<Arc<rustls_pki_types::CertificateDer<'static>>>,
    /// The TCP peer's address (for X-Forwarded-For on pass-through).
    pub addr: Option<std::net::SocketAddr>,
}

impl Peer {
    /// True when the peer's certificate is valid for the DNS name `san`.
    pub fn certificate_valid_for(&self, san: &str) -> bool {
        let Some(der) = &self.certificate else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(der.as_ref()) else {
            return false;
        };
        let Ok(name) = rustls_pki_types::ServerName::try_from(san) else {
            return false;
        };
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    }

    /// The SPIFFE ID of the peer's certificate: its URI SAN when it has exactly one and that
    /// one is a `spiffe://` URI. An X.509-SVID carries exactly one; a certificate with several
    /// names no SPIFFE ID at all.
    pub fn spiffe_id(&self) -> Option<String> {
        let der = self.certificate.as_ref()?;
        let cert = webpki::EndEntityCert::try_from(der.as_ref()).ok()?;
        let mut uris = cert.valid_uri_names();
        match (uris.next(), uris.next()) {
            (Some(uri), None) if uri.starts_with("spiffe://") => Some(uri.to_owned()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn clients() -> Callers {
        Callers::new(vec![
            Caller::with_secret("a", b"secret-a"),
            Caller::with_secret("b", b"secret-b"),
        ])
    }

    fn no_cert() -> Peer {
        Peer::default()
    }

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn the_right_secret_names_its_caller() {
        let c = clients();
        assert_eq!(
            &*c.authenticate(&headers("Bearer secret-b"), &no_cert())
                .unwrap()
                .id,
            "b"
        );
        assert_eq!(
            &*c.authenticate(&headers("bearer secret-a"), &no_cert())
                .unwrap()
                .id,
            "a"
        );
    }

    #[test]
    fn missing_malformed_and_unknown_credentials_are_told_apart() {
        let c = clients();
        assert_eq!(
            c.authenticate(&HeaderMap::new(), &no_cert()).unwrap_err(),
            AuthError::Missing
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "secret-a", "Bearer a b"] {
            assert_eq!(
                c.authenticate(&headers(bad), &no_cert()).unwrap_err(),
                AuthError::Malformed,
                "{bad}"
            );
        }
        assert_eq!(
            c.authenticate(&headers("Bearer secret-c"), &no_cert())
                .unwrap_err(),
            AuthError::Unknown
        );
    }

    fn client(id: &str, f: impl FnOnce(&mut ClientConfig)) -> Caller {
        let mut c = ClientConfig {
            id: id.into(),
            ..Default::default()
        };
        f(&mut c);
        Caller::from_config(0, &c).unwrap()
    }

    #[test]
    fn a_secret_and_a_certificate_name_still_need_both_unless_told_otherwise() {
        let digest = SecretDigest::of(b"secret-a").to_hex();
        let both = client("a", |c| {
            c.token_sha256 = Some(digest.clone());
            c.tls_san = Some("a.internal".into());
        });
        assert!(both.require_all);
        let callers = Callers::new(vec![both]);
        assert_eq!(
            callers
                .authenticate(&headers("Bearer secret-a"), &no_cert())
                .unwrap_err(),
            AuthError::CertificateRequired
        );
        let either = client("a", |c| {
            c.token_sha256 = Some(digest.clone());
            c.tls_san = Some("a.internal".into());
            c.require_all = Some(false);
        });
        let callers = Callers::new(vec![either]);
        assert_eq!(
            &*callers
                .authenticate(&headers("Bearer secret-a"), &no_cert())
                .unwrap()
                .id,
            "a"
        );
    }

    #[test]
    fn a_jwt_shaped_value_is_a_secret_like_any_other_without_kubernetes() {
        let jwt = "eyJhbGciOiJFUzI1NiJ9.e30.c2ln";
        let callers = Callers::new(vec![Caller::with_secret("a", jwt.as_bytes())]);
        assert_eq!(
            &*callers
                .authenticate(&headers(&format!("Bearer {jwt}")), &no_cert())
                .unwrap()
                .id,
            "a"
        );
        assert_eq!(
            callers
                .authenticate(&headers("Bearer eyJhbGciOiJub25lIn0.e30."), &no_cert())
                .unwrap_err(),
            AuthError::Unknown
        );
    }

    #[test]
    fn a_certificate_identifies_alone_only_callers_that_need_nothing_else() {
        let svid_only = client("svid", |c| c.spiffe_id = Some("spiffe://td/a".into()));
        assert!(!svid_only.require_all);
        let needs_token_too = client("both", |c| {
            c.spiffe_id = Some("spiffe://td/b".into());
            c.service_account = Some("shop:b".into());
            c.require_all = Some(true);
        });
        let peer = no_cert();
        assert!(!svid_only.identified_by_certificate(&peer, Some("spiffe://td/b")));
        assert!(svid_only.identified_by_certificate(&peer, Some("spiffe://td/a")));
        assert!(!needs_token_too.identified_by_certificate(&peer, Some("spiffe://td/b")));
    }
}
