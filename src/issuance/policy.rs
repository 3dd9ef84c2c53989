//! What each caller may ask for: per-caller allowlists of flows, countries and redirect hosts,
//! and whether it may use the drop-in endpoint. Checked after validation and before the cache or
//! Truora is touched, so a denied request costs no upstream call. Authentication (who the caller
//! is) is the auth layer's.

use super::request::TokenRequest;
use crate::config::ClientConfig;
use crate::error::RequestError;

/// One caller's allowances, from its `[[clients]]` entry. `None` allows anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerPolicy {
    /// `allowed_flows`.
    pub allowed_flows: Option<Vec<String>>,
    /// `allowed_countries`.
    pub allowed_countries: Option<Vec<String>>,
    /// `allowed_redirect_hosts`, lower-cased; `*.example.com` allows its subdomains.
    pub allowed_redirect_hosts: Option<Vec<String>>,
    /// `drop_in`.
    pub drop_in: bool,
}

impl Default for CallerPolicy {
    fn default() -> Self {
        Self {
            allowed_flows: None,
            allowed_countries: None,
            allowed_redirect_hosts: None,
            drop_in: true,
        }
    }
}

impl CallerPolicy {
    /// The allowances of a validated `[[clients]]` entry.
    pub fn from_config(client: &ClientConfig) -> Self {
        Self {
            allowed_flows: client.allowed_flows.clone(),
            allowed_countries: client.allowed_countries.clone(),
            allowed_redirect_hosts: client
                .allowed_redirect_hosts
                .as_ref()
                .map(|hosts| hosts.iter().map(|h| h.to_ascii_lowercase()).collect()),
            drop_in: client.drop_in,
        }
    }

    /// May this caller use `POST /v1/api-keys`?
    pub fn check_drop_in(&self) -> Result<(), RequestError> {
        if self.drop_in {
            Ok(())
        } else {
            Err(RequestError::Forbidden {
                rule: "drop_in",
                field: None,
                message: "this caller may not use the drop-in /v1/api-keys (drop_in = false): use POST /v1/tokens",
            })
        }
    }

    /// May this caller ask for this token?
    pub fn check(&self, req: &TokenRequest<'_>) -> Result<(), RequestError> {
        if let Some(flows) = &self.allowed_flows {
            if !flows.iter().any(|f| *f == req.flow_id) {
                return Err(RequestError::Forbidden {
                    rule: "allowed_flows",
                    field: Some("flow_id"),
                    message: "flow_id is not in this caller's allowed_flows",
                });
            }
        }
        if let Some(countries) = &self.allowed_countries {
            if !countries.iter().any(|c| c == req.country) {
                return Err(RequestError::Forbidden {
                    rule: "allowed_countries",
                    field: Some("country"),
                    message: "country is not in this caller's allowed_countries",
                });
            }
        }
        if let Some(hosts) = &self.allowed_redirect_hosts {
            // redirect_url was validated as an absolute https URL with a host.
            let host = req
                .redirect_url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_ascii_lowercase))
                .unwrap_or_default();
            if !hosts.iter().any(|allowed| host_matches(allowed, &host)) {
                return Err(RequestError::Forbidden {
                    rule: "allowed_redirect_hosts",
                    field: Some("redirect_url"),
                    message: "redirect_url's host is not in this caller's allowed_redirect_hosts",
                });
            }
        }
        Ok(())
    }
}

/// `example.com` matches itself only; `*.example.com` matches its subdomains, not itself.
fn host_matches(allowed: &str, host: &str) -> bool {
    match allowed.strip_prefix("*.") {
        Some(parent) => host
            .strip_suffix(parent)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => allowed == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::issuance::request::owned_form as req;

    const BASE: &str =
        "country=CO&flow_id=IPF1&redirect_url=https://shop.example.com/done&account_id=u";

    fn rule_of(e: RequestError) -> &'static str {
        match e {
            RequestError::Forbidden { rule, .. } => rule,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_policy_allows_everything() {
        let p = CallerPolicy::default();
        p.check(&req(BASE)).unwrap();
        p.check_drop_in().unwrap();
    }

    #[test]
    fn a_flow_outside_allowed_flows_is_denied_naming_the_rule() {
        let p = CallerPolicy {
            allowed_flows: Some(vec!["IPF2".into()]),
            ..Default::default()
        };
        assert_eq!(rule_of(p.check(&req(BASE)).unwrap_err()), "allowed_flows");
        p.check(&req(&BASE.replace("IPF1", "IPF2"))).unwrap();
    }

    #[test]
    fn a_country_outside_allowed_countries_is_denied() {
        let p = CallerPolicy {
            allowed_countries: Some(vec!["BR".into()]),
            ..Default::default()
        };
        assert_eq!(
            rule_of(p.check(&req(BASE)).unwrap_err()),
            "allowed_countries"
        );
    }

    #[test]
    fn redirect_hosts_match_exactly_or_by_subdomain_wildcard() {
        let p = CallerPolicy {
            allowed_redirect_hosts: Some(vec!["*.example.com".into(), "pay.example.org".into()]),
            ..Default::default()
        };
        p.check(&req(BASE)).unwrap();
        p.check(&req(&BASE.replace("shop.example.com", "pay.example.org")))
            .unwrap();
        for host in [
            "example.com",
            "evil-example.com",
            "shop.example.com.evil.net",
            "x.example.org",
        ] {
            let e = p
                .check(&req(&BASE.replace("shop.example.com", host)))
                .unwrap_err();
            assert_eq!(rule_of(e), "allowed_redirect_hosts", "{host}");
        }
    }

    #[test]
    fn drop_in_false_denies_the_drop_in_endpoint() {
        let p = CallerPolicy {
            drop_in: false,
            ..Default::default()
        };
        assert_eq!(rule_of(p.check_drop_in().unwrap_err()), "drop_in");
    }
}
