//! `[[clients]]`: the internal callers, how each authenticates and what each may ask for. The
//! runtime caller (`crate::auth::Caller`) is built from an entry by its owner, once.
//!
//! A caller proves who it is with any of four credentials: a bearer secret (`token_sha256`), a
//! client certificate valid for a DNS name (`tls_san`), a Kubernetes projected service-account
//! token (`service_account`) or a client certificate carrying a SPIFFE ID (`spiffe_id`). Any
//! one configured identifies it, unless `require_all` asks for all of them.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};
use crate::secret::SecretDigest;
use crate::truora::{is_billing_hub, is_flow_id, COUNTRIES};

/// One `[[clients]]` entry: an internal caller. It authenticates with a bearer secret
/// (`token_sha256`), a client certificate (`tls_san`), a service-account token
/// (`service_account`), a SPIFFE certificate (`spiffe_id`), or several (see `require_all`).
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
    /// The Kubernetes service account, `"namespace:name"`, whose projected token
    /// (`Authorization: Bearer <jwt>`, verified as `[auth.kubernetes]` says) identifies the
    /// caller: the token's `sub` must be `system:serviceaccount:<namespace>:<name>`.
    #[serde(default)]
    pub service_account: Option<String>,
    /// The SPIFFE ID (`spiffe://trust-domain/path`) that the caller's client certificate must
    /// carry as its one URI SAN (an X.509-SVID; needs `server.tls.client_ca_file`).
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// Whether every credential configured above must be presented together (`true`) or any one
    /// of them identifies the caller (`false`). Absent: `true` for a client with both
    /// `token_sha256` and `tls_san` (what that pair has always meant), `false` otherwise.
    #[serde(default)]
    pub require_all: Option<bool>,
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
    /// The billing hub every token of this caller is billed to: added to its requests that name
    /// none; a request naming another is refused (403). Absent: the caller's own choice.
    #[serde(default)]
    pub billing_hub: Option<String>,
    /// Billing hubs this caller may name (a request must then name one, or be pinned to one).
    /// Absent: any, or none.
    #[serde(default)]
    pub allowed_billing_hubs: Option<Vec<String>>,
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
            service_account: None,
            spiffe_id: None,
            require_all: None,
            mint_rate: None,
            allowed_flows: None,
            allowed_countries: None,
            allowed_redirect_hosts: None,
            billing_hub: None,
            allowed_billing_hubs: None,
            drop_in: true,
            passthrough: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// What the other sections offer the clients: whether client certificates are checked
/// (`server.tls.client_ca_file`) and service-account tokens verified (`[auth.kubernetes]`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Offered {
    /// `server.tls.client_ca_file` is set.
    pub client_certificates: bool,
    /// `[auth.kubernetes]` is set.
    pub service_accounts: bool,
}

/// Checks every entry on its own, then the rules across entries (distinct ids, secrets,
/// service accounts and SPIFFE IDs).
pub fn validate(clients: &[ClientConfig], offered: Offered) -> Result<(), ConfigError> {
    if clients.is_empty() {
        return Err(invalid(
            "clients",
            "no [[clients]] configured: no caller could ask for a token",
        ));
    }
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    let mut accounts = HashSet::new();
    let mut spiffe_ids = HashSet::new();
    for (i, client) in clients.iter().enumerate() {
        client.validate(i, offered)?;
        if let Some(account) = &client.service_account {
            if !accounts.insert(account.as_str()) {
                return Err(invalid(
                    format!("clients[{i}].service_account"),
                    format!("\"{account}\" is used by another client"),
                ));
            }
        }
        if let Some(id) = &client.spiffe_id {
            if !spiffe_ids.insert(id.as_str()) {
                return Err(invalid(
                    format!("clients[{i}].spiffe_id"),
                    format!("\"{id}\" is used by another client"),
                ));
            }
        }
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
    /// Whether all the credentials configured for this client must be presented together:
    /// `require_all` when given, else `true` only for the pair `token_sha256` + `tls_san`.
    pub fn requires_all(&self) -> bool {
        self.require_all
            .unwrap_or(self.token_sha256.is_some() && self.tls_san.is_some())
    }

    /// Checks the entry at `clients[i]` on its own, against what the other sections offer.
    pub fn validate(&self, i: usize, offered: Offered) -> Result<(), ConfigError> {
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
        if self.token_sha256.is_none()
            && self.tls_san.is_none()
            && self.service_account.is_none()
            && self.spiffe_id.is_none()
        {
            return Err(invalid(
                format!("clients[{i}]"),
                "needs token_sha256, tls_san, service_account or spiffe_id: a way to authenticate",
            ));
        }
        if self.requires_all() && self.token_sha256.is_some() && self.service_account.is_some() {
            return Err(invalid(
                format!("clients[{i}].require_all"),
                "cannot be met with both token_sha256 and service_account: both are sent as Authorization: Bearer, one at a time",
            ));
        }
        if let Some(account) = &self.service_account {
            if !offered.service_accounts {
                return Err(invalid(
                    format!("clients[{i}].service_account"),
                    "needs [auth.kubernetes]: the issuer, audiences and keys that tokens are verified with",
                ));
            }
            if !is_service_account(account) {
                return Err(invalid(
                    format!("clients[{i}].service_account"),
                    format!("\"{account}\" must be \"namespace:name\": a namespace (a DNS label) and a service account name (a DNS subdomain)"),
                ));
            }
        }
        if let Some(id) = &self.spiffe_id {
            if !offered.client_certificates {
                return Err(invalid(
                    format!("clients[{i}].spiffe_id"),
                    "needs server.tls.client_ca_file: SVIDs are only checked with a trust bundle to check them against",
                ));
            }
            if !is_spiffe_id(id) {
                return Err(invalid(
                    format!("clients[{i}].spiffe_id"),
                    format!("\"{id}\" must be a SPIFFE ID: spiffe://<trust domain>/<path>, trust domain in a-z 0-9 . - _, path segments in A-Z a-z 0-9 . - _"),
                ));
            }
        }
        if let Some(san) = &self.tls_san {
            if !offered.client_certificates {
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
        check_list(
            i,
            "allowed_billing_hubs",
            self.allowed_billing_hubs.as_deref(),
            is_billing_hub,
        )?;
        if let Some(hub) = &self.billing_hub {
            if !is_billing_hub(hub) {
                return Err(invalid(
                    format!("clients[{i}].billing_hub"),
                    format!("\"{hub}\" is not valid here: 1 to 128 characters of [a-zA-Z0-9_.-]"),
                ));
            }
            if let Some(allowed) = self
                .allowed_billing_hubs
                .as_ref()
                .filter(|a| !a.contains(hub))
            {
                return Err(invalid(
                    format!("clients[{i}].billing_hub"),
                    format!(
                        "\"{hub}\" is not in allowed_billing_hubs ({})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
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

/// `namespace:name`: a Kubernetes namespace (an RFC 1123 label) and a service account name (an
/// RFC 1123 subdomain), as the API server writes them into `sub`.
pub fn is_service_account(value: &str) -> bool {
    let Some((namespace, name)) = value.split_once(':') else {
        return false;
    };
    let label = |s: &str, max: usize, dots: bool| {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= max
            && b.iter().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || (dots && *c == b'.')
            })
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
    };
    label(namespace, 63, false) && label(name, 253, true)
}

/// A SPIFFE ID naming a workload: `spiffe://`, a trust domain of `a-z 0-9 . - _`, then a path of
/// one or more `/segment`s of `A-Z a-z 0-9 . - _` (no `.` or `..` segment, no trailing slash),
/// 2048 bytes at most, as the SPIFFE ID specification writes them.
pub fn is_spiffe_id(value: &str) -> bool {
    let Some(rest) = value.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((domain, path)) = rest.split_once('/') else {
        return false;
    };
    let domain_ok = !domain.is_empty()
        && domain.len() <= 255
        && domain
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-_".contains(&c));
    let path_ok = path.split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".-_".contains(&c))
    });
    value.len() <= 2048 && domain_ok && path_ok
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

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Offered = Offered {
        client_certificates: true,
        service_accounts: true,
    };

    fn key_of(clients: &[ClientConfig], offered: Offered) -> String {
        match validate(clients, offered).unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    fn sa(id: &str, account: &str) -> ClientConfig {
        ClientConfig {
            id: id.into(),
            service_account: Some(account.into()),
            ..Default::default()
        }
    }

    fn svid(id: &str, spiffe: &str) -> ClientConfig {
        ClientConfig {
            id: id.into(),
            spiffe_id: Some(spiffe.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_service_account_or_a_spiffe_id_alone_is_a_way_to_authenticate() {
        validate(
            &[
                sa("checkout", "shop:checkout"),
                svid("billing", "spiffe://prod.example/ns/shop/sa/billing"),
            ],
            BOTH,
        )
        .unwrap();
        let nothing = ClientConfig {
            id: "x".into(),
            ..Default::default()
        };
        assert_eq!(key_of(&[nothing], BOTH), "clients[0]");
    }

    #[test]
    fn each_needs_what_checks_it() {
        let no_k8s = Offered {
            client_certificates: true,
            service_accounts: false,
        };
        assert_eq!(
            key_of(&[sa("a", "shop:a")], no_k8s),
            "clients[0].service_account"
        );
        let no_ca = Offered {
            client_certificates: false,
            service_accounts: true,
        };
        assert_eq!(
            key_of(&[svid("a", "spiffe://td/a")], no_ca),
            "clients[0].spiffe_id"
        );
    }

    #[test]
    fn malformed_service_accounts_and_spiffe_ids_are_refused() {
        for bad in [
            "checkout",
            "shop:",
            ":checkout",
            "Shop:checkout",
            "shop:check_out",
            "shop:checkout:x",
            "-shop:checkout",
            "shop:checkout-",
        ] {
            assert!(!is_service_account(bad), "{bad}");
        }
        assert!(is_service_account("shop:checkout"));
        assert!(is_service_account("kube-system:a.b-c"));
        for bad in [
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/a",
            "spiffe://td/a/",
            "spiffe://td/a//b",
            "spiffe://td/./a",
            "spiffe://td/../a",
            "spiffe://td/a?b",
            "spiffe://td/a#b",
            "spiffe://user@td/a",
            "spiffe:///a",
            "https://td/a",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
        assert!(is_spiffe_id(
            "spiffe://prod.example-1/ns/shop/sa/Checkout_2"
        ));
        assert_eq!(
            key_of(&[sa("a", "shop")], BOTH),
            "clients[0].service_account"
        );
        assert_eq!(
            key_of(&[svid("a", "spiffe://td")], BOTH),
            "clients[0].spiffe_id"
        );
    }

    #[test]
    fn two_clients_never_share_a_service_account_or_a_spiffe_id() {
        assert_eq!(
            key_of(&[sa("a", "shop:x"), sa("b", "shop:x")], BOTH),
            "clients[1].service_account"
        );
        assert_eq!(
            key_of(
                &[svid("a", "spiffe://td/x"), svid("b", "spiffe://td/x")],
                BOTH
            ),
            "clients[1].spiffe_id"
        );
    }

    #[test]
    fn require_all_defaults_to_what_secret_and_san_always_meant() {
        let mut c = ClientConfig {
            id: "a".into(),
            token_sha256: Some("0".repeat(64)),
            tls_san: Some("a.internal".into()),
            ..Default::default()
        };
        assert!(c.requires_all(), "secret + tls_san: both, as before");
        c.require_all = Some(false);
        assert!(!c.requires_all());
        let mut c = sa("a", "shop:a");
        c.spiffe_id = Some("spiffe://td/a".into());
        assert!(!c.requires_all(), "new pairs: any one");
        c.require_all = Some(true);
        assert!(c.requires_all());
    }

    #[test]
    fn require_all_with_a_secret_and_a_token_cannot_be_met() {
        let mut c = sa("a", "shop:a");
        c.token_sha256 = Some("0".repeat(64));
        validate(std::slice::from_ref(&c), BOTH).unwrap();
        c.require_all = Some(true);
        assert_eq!(key_of(&[c], BOTH), "clients[0].require_all");
    }

    #[test]
    fn billing_hubs_must_be_well_formed_and_a_pin_inside_the_allowed_ones() {
        let with = |hub: Option<&str>, allowed: Option<&[&str]>| ClientConfig {
            id: "c".into(),
            token_sha256: Some("ab".repeat(32)),
            billing_hub: hub.map(Into::into),
            allowed_billing_hubs: allowed.map(|a| a.iter().map(|h| (*h).to_owned()).collect()),
            ..Default::default()
        };
        validate(&[with(Some("hub-a"), Some(&["hub-a", "hub-b"]))], BOTH).unwrap();
        validate(&[with(Some("hub-a"), None)], BOTH).unwrap();
        for (bad, key) in [
            (with(Some("hub a"), None), "clients[0].billing_hub"),
            (
                with(Some("hub-c"), Some(&["hub-a"])),
                "clients[0].billing_hub",
            ),
            (
                with(None, Some(&["ok", "not&ok"])),
                "clients[0].allowed_billing_hubs",
            ),
            (with(None, Some(&[])), "clients[0].allowed_billing_hubs"),
        ] {
            assert_eq!(key_of(&[bad], BOTH), key);
        }
    }
}
