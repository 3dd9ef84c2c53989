//! `[[clients]]`: the internal callers, how each authenticates and what each may ask for. The
//! runtime caller (`crate::auth::Caller`) is built from an entry by its owner, once.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};
use crate::secret::SecretDigest;
use crate::truora::{is_flow_id, COUNTRIES};

/// One `[[clients]]` entry: an internal caller. It authenticates with a bearer secret
/// (`token_sha256`), a client certificate (`tls_san`), or both (then both are required).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The caller's name: in logs and the cache key. `[a-z0-9_.-]`, at most 64.
    pub id: String,
    /// Hex SHA-256 of the caller's bearer secret (`token-broker hash-secret` prints it).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// DNS name the caller's client certificate must be valid for (needs
    /// `server.tls.client_ca_file`).
    #[serde(default)]
    pub tls_san: Option<String>,
    /// Most mints a second for this caller (bursts of up to one second's worth); beyond it its
    /// misses get 429. Absent: only the global `upstream.mint_rate` applies.
    #[serde(default)]
    pub mint_rate: Option<u32>,
    /// Flow ids this caller may ask tokens for. Absent: any.
    #[serde(default)]
    pub allowed_flows: Option<Vec<String>>,
    /// Countries this caller may ask tokens for. Absent: any.
    #[serde(default)]
    pub allowed_countries: Option<Vec<String>>,
    /// Hosts `redirect_url` may point at (`example.com`, or `*.example.com` for its
    /// subdomains). Absent: any.
    #[serde(default)]
    pub allowed_redirect_hosts: Option<Vec<String>>,
    /// Whether this caller may use the drop-in `POST /v1/api-keys`.
    #[serde(default = "default_true")]
    pub drop_in: bool,
    /// Truora endpoints this caller may reach through the broker, as `"METHOD /truora/..."`
    /// (`*` matches one path segment). Empty: no pass-through.
    #[serde(default)]
    pub passthrough: Vec<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            token_sha256: None,
            tls_san: None,
            mint_rate: None,
            allowed_flows: None,
            allowed_countries: None,
            allowed_redirect_hosts: None,
            drop_in: true,
            passthrough: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Checks every entry on its own, then the rules across entries (distinct ids and secrets).
/// `client_certificates`: whether `server.tls.client_ca_file` is set.
pub fn validate(clients: &[ClientConfig], client_certificates: bool) -> Result<(), ConfigError> {
    if clients.is_empty() {
        return Err(invalid(
            "clients",
            "no [[clients]] configured: no caller could ask for a token",
        ));
    }
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    for (i, client) in clients.iter().enumerate() {
        client.validate(i, client_certificates)?;
        if !ids.insert(client.id.as_str()) {
            return Err(invalid(
                format!("clients[{i}].id"),
                format!("\"{}\" is used by another client", client.id),
            ));
        }
        if let Some(digest) = client
            .token_sha256
            .as_deref()
            .and_then(SecretDigest::from_hex)
        {
            if !digests.insert(digest.to_hex()) {
                return Err(invalid(
                    format!("clients[{i}].token_sha256"),
                    "is the same as another client's: each caller needs its own secret",
                ));
            }
        }
    }
    Ok(())
}

impl ClientConfig {
    /// Checks the entry at `clients[i]` on its own. `client_certificates`: whether
    /// `server.tls.client_ca_file` is set.
    pub fn validate(&self, i: usize, client_certificates: bool) -> Result<(), ConfigError> {
        let id = &self.id;
        let valid_id = !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        if !valid_id {
            return Err(invalid(
                format!("clients[{i}].id"),
                "must be 1 to 64 characters of a-z, 0-9, '_', '.', '-'",
            ));
        }
        if self.mint_rate.is_some_and(|r| !(1..=100_000).contains(&r)) {
            return Err(invalid(
                format!("clients[{i}].mint_rate"),
                "must be between 1 and 100000",
            ));
        }
        if self.token_sha256.is_none() && self.tls_san.is_none() {
            return Err(invalid(
                format!("clients[{i}]"),
                "needs token_sha256, tls_san or both: a way to authenticate",
            ));
        }
        if let Some(san) = &self.tls_san {
            if !client_certificates {
                return Err(invalid(
                    format!("clients[{i}].tls_san"),
                    "needs server.tls.client_ca_file: client certificates are only checked with a CA to check them against",
                ));
            }
            if !is_dns_name(san) {
                return Err(invalid(
                    format!("clients[{i}].tls_san"),
                    format!("\"{san}\" is not a DNS name"),
                ));
            }
        }
        check_list(
            i,
            "allowed_flows",
            self.allowed_flows.as_deref(),
            is_flow_id,
        )?;
        check_list(
            i,
            "allowed_countries",
            self.allowed_countries.as_deref(),
            |c| COUNTRIES.contains(&c),
        )?;
        check_list(
            i,
            "allowed_redirect_hosts",
            self.allowed_redirect_hosts.as_deref(),
            |h| is_dns_name(h.strip_prefix("*.").unwrap_or(h)),
        )?;
        if self
            .token_sha256
            .as_deref()
            .is_some_and(|hex| SecretDigest::from_hex(hex).is_none())
        {
            return Err(invalid(
                format!("clients[{i}].token_sha256"),
                "must be 64 hex digits: the SHA-256 of the caller's secret (see `token-broker hash-secret`)",
            ));
        }
        Ok(())
    }
}

/// A DNS name without wildcards, as a certificate or a redirect URL names its host.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('*') && rustls::pki_types::ServerName::try_from(name).is_ok()
}

/// Checks every entry of an optional `[[clients]]` list with `valid`.
fn check_list(
    i: usize,
    key: &str,
    list: Option<&[String]>,
    valid: impl Fn(&str) -> bool,
) -> Result<(), ConfigError> {
    let Some(list) = list else {
        return Ok(());
    };
    if list.is_empty() {
        return Err(invalid(
            format!("clients[{i}].{key}"),
            "is empty, so it would allow nothing: leave it out to allow any",
        ));
    }
    match list.iter().find(|v| !valid(v)) {
        Some(bad) => Err(invalid(
            format!("clients[{i}].{key}"),
            format!("\"{bad}\" is not valid here"),
        )),
        None => Ok(()),
    }
}
