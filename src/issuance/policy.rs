//! What each caller may ask for: per-caller allowlists of flows, countries, redirect hosts and
//! billing hubs, a billing hub it is pinned to, and whether it may use the drop-in endpoint. Checked after validation and before the cache or
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
    /// `billing_hub`: the hub every token of this caller is billed to.
    pub billing_hub: Option<String>,
    /// `allowed_billing_hubs`.
    pub allowed_billing_hubs: Option<Vec<String>>,
    /// `drop_in`.
    pub drop_in: bool,
}

impl Default for CallerPolicy {
    fn default() -> Self {
        Self {
            allowed_flows: None,
            allowed_countries: None,
            allowed_redirect_hosts: None,
            billing_hub: None,
            allowed_billing_hubs: None,
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
            billing_hub: client.billing_hub.clone(),
            allowed_billing_hubs: client.allowed_billing_hubs.clone(),
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

    /// Applies this caller's pins to the request (its `billing_hub` when it sent none), then
    /// [`CallerPolicy::check`]s it.
    pub fn admit(&self, req: &mut TokenRequest<'_>) -> Result<(), RequestError> {
        if let Some(pinned) = &self.billing_hub {
            match &req.billing_hub {
                None => req.billing_hub = Some(pinned.clone().into()),
                Some(sent) if sent == pinned => {}
                Some(_) => {
                    return Err(RequestError::Forbidden {
                        rule: "billing_hub",
                        field: Some("billing_hub"),
                        message: "this caller's tokens are billed to another hub (its billing_hub): send that one or none",
                    })
                }
            }
        }
        self.check(req)
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
        if let Some(hubs) = &self.allowed_billing_hubs {
            if !req
                .billing_hub
                .as_deref()
                .is_some_and(|hub| hubs.iter().any(|h| h == hub))
            {
                return Err(RequestError::Forbidden {
                    rule: "allowed_billing_hubs",
                    field: Some("billing_hub"),
                    message: "billing_hub is missing or not in this caller's allowed_billing_hubs",
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

    fn hub<'r>(req: &'r TokenRequest<'_>) -> Option<&'r str> {
        req.billing_hub.as_deref()
    }

    #[test]
    fn a_pinned_billing_hub_is_added_when_absent_and_another_is_denied() {
        let p = CallerPolicy {
            billing_hub: Some("hub-a".into()),
            ..Default::default()
        };
        let mut plain = req(BASE);
        p.admit(&mut plain).unwrap();
        assert_eq!(hub(&plain), Some("hub-a"));
        assert!(plain
            .upstream_form(crate::truora::ArrayEncoding::Repeat)
            .contains("billing_hub=hub-a"));
        let mut same = req(&format!("{BASE}&billing_hub=hub-a"));
        p.admit(&mut same).unwrap();
        assert_eq!(same, plain);
        let mut other = req(&format!("{BASE}&billing_hub=hub-b"));
        assert_eq!(rule_of(p.admit(&mut other).unwrap_err()), "billing_hub");
        // Without a pin the caller's own hub stays as sent, or absent.
        let mut own = req(&format!("{BASE}&billing_hub=hub-b"));
        CallerPolicy::default().admit(&mut own).unwrap();
        assert_eq!(hub(&own), Some("hub-b"));
        let mut none = req(BASE);
        CallerPolicy::default().admit(&mut none).unwrap();
        assert_eq!(hub(&none), None);
    }

    #[test]
    fn a_billing_hub_outside_allowed_billing_hubs_or_missing_is_denied() {
        let p = CallerPolicy {
            allowed_billing_hubs: Some(vec!["hub-a".into(), "hub-b".into()]),
            ..Default::default()
        };
        p.admit(&mut req(&format!("{BASE}&billing_hub=hub-b")))
            .unwrap();
        let err = p
            .admit(&mut req(&format!("{BASE}&billing_hub=hub-c")))
            .unwrap_err();
        assert_eq!(rule_of(err), "allowed_billing_hubs");
        assert_eq!(
            rule_of(p.admit(&mut req(BASE)).unwrap_err()),
            "allowed_billing_hubs"
        );
    }
}
