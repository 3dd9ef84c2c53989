//! The configured callers as the broker uses them, built once from `[[clients]]`, and how a
//! request's credentials name one of them.
//!
//! Per caller: a `token_sha256` alone means the bearer secret suffices; a `tls_san` alone means
//! a client certificate valid for that DNS name suffices (checked with webpki's name matching,
//! the chain having been verified against `server.tls.client_ca_file` during the handshake);
//! both mean both are required.
//!
//! Secrets are digested with SHA-256 and compared, in constant time, against every configured
//! digest (no early exit), so neither the secret nor which caller matched leaks through timing.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::config::{ClientConfig, ConfigError};
use crate::error::AuthError;
use crate::issuance::CallerPolicy;
use crate::passthrough::Pattern;
use crate::secret::SecretDigest;

/// A caller as the broker uses it: its name, how it authenticates, what it may ask for.
#[derive(Debug, Clone)]
pub struct Caller {
    /// From `[[clients]] id`.
    pub id: Arc<str>,
    /// From `[[clients]] token_sha256`.
    pub digest: Option<SecretDigest>,
    /// From `[[clients]] tls_san`, lower-cased.
    pub tls_san: Option<Arc<str>>,
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
            mint_rate: None,
            policy: Arc::new(CallerPolicy::default()),
            passthrough: Arc::new([]),
        }
    }
}

/// The configured callers.
#[derive(Debug, Clone)]
pub struct Callers {
    list: Arc<[Caller]>,
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
        Self { list: list.into() }
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
        self.list.iter()
    }

    /// The caller presenting the secret in `headers` and/or the certificate of `peer`.
    pub fn authenticate(&self, headers: &HeaderMap, peer: &Peer) -> Result<&Caller, AuthError> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return self.by_certificate(peer);
        };
        let value = value.as_bytes();
        let secret = match value.iter().position(|b| *b == b' ') {
            Some(i) if value[..i].eq_ignore_ascii_case(b"bearer") => &value[i + 1..],
            _ => return Err(AuthError::Malformed),
        };
        if secret.is_empty() || secret.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(AuthError::Malformed);
        }
        let presented = SecretDigest::of(secret);
        let mut found = None;
        for client in self.list.iter() {
            if client.digest.is_some_and(|d| d.ct_eq(&presented)) {
                found = Some(client);
            }
        }
        let client = found.ok_or(AuthError::Unknown)?;
        match &client.tls_san {
            Some(san) if !peer.certificate_valid_for(san) => Err(AuthError::CertificateRequired),
            _ => Ok(client),
        }
    }

    /// Without a bearer secret: the one certificate-only caller the peer's certificate is for.
    fn by_certificate(&self, peer: &Peer) -> Result<&Caller, AuthError> {
        if peer.certificate.is_none() {
            return Err(AuthError::Missing);
        }
        let mut matching = self.list.iter().filter(|c| {
            c.digest.is_none()
                && c.tls_san
                    .as_deref()
                    .is_some_and(|san| peer.certificate_valid_for(san))
        });
        match (matching.next(), matching.next()) {
            (Some(client), None) => Ok(client),
            (None, _) => Err(AuthError::Unknown),
            // A certificate valid for several callers (a wildcard, say) names none of them.
            (Some(_), Some(_)) => Err(AuthError::Unknown),
        }
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
}
