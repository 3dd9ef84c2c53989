//! What a caller may reach: the `[[clients]] passthrough` allowlist entries, and the path checks
//! that keep a request from slipping past them.
//!
//! Truora's mint endpoint (`/truora/account/v1/api-keys` and anything below it) is never
//! relayed, whatever the allowlist says: through it a caller could mint a permanent
//! `key_type=backend` key with the master key, around every token rule. An entry that could
//! match it is refused when the config is loaded, and a request for it is refused at once.

use std::sync::Arc;

use http::Method;

use crate::error::RequestError;
use crate::truora::MINT_PATH;

/// The broker's path prefix of Truora's account API.
const ACCOUNT_PREFIX: &str = "/truora/account";

/// The segments of the mint path as a caller would send it: `truora`, `account`, `v1`,
/// `api-keys`.
fn mint_segments() -> impl Iterator<Item = &'static str> {
    ACCOUNT_PREFIX[1..]
        .split('/')
        .chain(MINT_PATH[1..].split('/'))
}

/// True when `path` is Truora's mint endpoint or below it (compared without regard to case:
/// what Truora's gateway would route there is not ours to guess).
pub fn is_mint_path(path: &str) -> bool {
    let mut parts = path.trim_start_matches('/').split('/');
    mint_segments().all(|want| {
        parts
            .next()
            .is_some_and(|got| got.eq_ignore_ascii_case(want))
    })
}

/// Which Truora API a pass-through path goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TruoraApi {
    /// `/truora/identity/...` -> `upstream.identity_url`
    Identity,
    /// `/truora/account/...` -> `upstream.account_url`
    Account,
}

impl TruoraApi {
    /// The API a caller path is for, and the path Truora knows (prefix removed).
    pub fn of(path: &str) -> Option<(TruoraApi, &str)> {
        if let Some(rest) = path.strip_prefix("/truora/identity/") {
            Some((TruoraApi::Identity, &path[path.len() - rest.len() - 1..]))
        } else if let Some(rest) = path.strip_prefix("/truora/account/") {
            Some((TruoraApi::Account, &path[path.len() - rest.len() - 1..]))
        } else {
            None
        }
    }
}

/// One allowlist entry: `"GET /truora/identity/v1/processes/*/result"`; `*` is one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    method: Method,
    segments: Vec<String>,
    text: Arc<str>,
}

impl Pattern {
    /// Parses an entry, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (method, path) = text.split_once(' ').ok_or(
            "must be \"METHOD /truora/...\", e.g. \"GET /truora/identity/v1/processes/*/result\"",
        )?;
        let method = match method {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            _ => {
                return Err(format!(
                    "method \"{method}\" must be GET, POST, PUT, PATCH or DELETE"
                ))
            }
        };
        if TruoraApi::of(path).is_none() {
            return Err("the path must start with /truora/identity/ or /truora/account/".into());
        }
        let segments: Vec<String> = path[1..].split('/').map(str::to_owned).collect();
        for s in &segments {
            let ok = s == "*"
                || (!s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')));
            if !ok {
                return Err(format!(
                    "segment \"{s}\" must be \"*\" or letters, digits, '-', '_', '.'"
                ));
            }
        }
        let pattern = Self {
            method,
            segments,
            text: text.into(),
        };
        if pattern.reaches_mint_path() {
            return Err(format!(
                "it could match Truora's mint endpoint ({ACCOUNT_PREFIX}{MINT_PATH}), which is never relayed: callers get tokens from POST /v1/tokens"
            ));
        }
        Ok(pattern)
    }

    /// True when some path this entry matches is the mint path or below it.
    fn reaches_mint_path(&self) -> bool {
        let mut segments = self.segments.iter();
        mint_segments().all(|want| {
            segments
                .next()
                .is_some_and(|s| s == "*" || s.eq_ignore_ascii_case(want))
        })
    }

    /// True when this entry allows `method` on `path`.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        if *method != self.method {
            return false;
        }
        let mut parts = path[1..].split('/');
        for want in &self.segments {
            match parts.next() {
                Some(got) if want == "*" || got == want => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }

    /// The entry as written: the bounded `pattern` label of the pass-through metrics.
    pub fn text(&self) -> &Arc<str> {
        &self.text
    }
}

/// Refuses paths that could slip past an allowlist or mean something else to a server behind
/// Truora's: empty, `.` or `..` segments, backslashes, `;` (path parameters), and any escape
/// (`%2F`, `%00`, `%25`, `%3F`...: Truora's paths are ids and words, none needs one). Then
/// refuses the mint endpoint.
pub fn check_path(path: &str) -> Result<(), RequestError> {
    let bad = path[1..]
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
        || path.contains(['%', ';', '\\']);
    if bad {
        return Err(RequestError::InvalidField {
            field: "path".into(),
            rule: "must not hold empty, '.' or '..' segments, ';', '\\\\' or %-escapes".into(),
        });
    }
    if is_mint_path(path) {
        return Err(RequestError::Forbidden {
            rule: "passthrough",
            field: None,
            message: "Truora's mint endpoint is never relayed: ask for tokens with POST /v1/tokens",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    #[test]
    fn a_star_matches_exactly_one_segment() {
        let pat = p("GET /truora/identity/v1/processes/*/result");
        assert!(pat.matches(&Method::GET, "/truora/identity/v1/processes/IDP123/result"));
        assert!(!pat.matches(&Method::GET, "/truora/identity/v1/processes/a/b/result"));
        assert!(!pat.matches(&Method::GET, "/truora/identity/v1/processes/IDP123"));
        assert!(!pat.matches(
            &Method::GET,
            "/truora/identity/v1/processes/IDP123/result/x"
        ));
        assert!(!pat.matches(&Method::POST, "/truora/identity/v1/processes/IDP123/result"));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for bad in [
            "GET",
            "FETCH /truora/identity/v1",
            "GET /v1/processes",
            "GET /truora/identity/v1/../x",
            "GET /truora/identity/v1//x",
            "GET /truora/identity/v1/a*",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_pattern_can_grant_the_mint_endpoint() {
        for bad in [
            "POST /truora/account/v1/api-keys",
            "POST /truora/account/*/*",
            "GET /truora/account/v1/*",
            "POST /truora/account/*/api-keys/*",
            "DELETE /truora/account/v1/api-keys/x",
            "POST /truora/account/V1/API-KEYS",
        ] {
            let err = Pattern::parse(bad).unwrap_err();
            assert!(err.contains("mint endpoint"), "{bad}: {err}");
        }
        for fine in [
            "GET /truora/account/v1/bre/rules",
            "POST /truora/account/*",
            "GET /truora/account/v2/api-keys",
            "GET /truora/identity/v1/api-keys",
        ] {
            Pattern::parse(fine).unwrap();
        }
    }

    #[test]
    fn the_mint_endpoint_is_refused_at_request_time_whatever_the_config() {
        for path in [
            "/truora/account/v1/api-keys",
            "/truora/account/v1/api-keys/abc",
            "/truora/account/V1/Api-Keys",
        ] {
            assert!(
                matches!(check_path(path), Err(RequestError::Forbidden { .. })),
                "{path}"
            );
        }
        check_path("/truora/account/v1/bre/rules").unwrap();
    }

    #[test]
    fn path_parameters_and_escapes_are_refused() {
        for bad in [
            "/truora/identity/v1/processes/IDP1;x=y/result",
            "/truora/identity/v1/processes/IDP1%00/result",
            "/truora/identity/v1/processes/IDP1%25/result",
            "/truora/identity/v1/processes/IDP1%3Fa/result",
            "/truora/account/v1/api%2Dkeys",
            "/truora/identity/v1\\processes",
        ] {
            assert!(
                matches!(check_path(bad), Err(RequestError::InvalidField { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn traversal_and_encoded_slashes_are_refused() {
        for bad in [
            "/truora/identity/v1/processes/../../v1/api-keys",
            "/truora/identity/v1/processes/x%2F..%2Fy/result",
            "/truora/identity/v1//processes",
            "/truora/identity/v1/./processes",
            "/truora/identity/v1/processes/%2e%2e/result",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        check_path("/truora/identity/v1/processes/IDP1/result").unwrap();
    }

    #[test]
    fn the_api_prefix_is_removed() {
        assert_eq!(
            TruoraApi::of("/truora/identity/v1/processes"),
            Some((TruoraApi::Identity, "/v1/processes"))
        );
        assert_eq!(
            TruoraApi::of("/truora/account/v1/bre/rules"),
            Some((TruoraApi::Account, "/v1/bre/rules"))
        );
        assert_eq!(TruoraApi::of("/v1/tokens"), None);
    }
}
