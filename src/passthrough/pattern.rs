//! What a caller may reach: the `[[clients]] passthrough` allowlist entries, and the path checks
//! that keep a request from slipping past them.

use std::sync::Arc;

use http::Method;

use crate::error::RequestError;

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
        Ok(Self {
            method,
            segments,
            text: text.into(),
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

/// Refuses paths that could slip past an allowlist: empty, `.` or `..` segments, and encoded
/// slashes, backslashes or dots.
pub fn check_path(path: &str) -> Result<(), RequestError> {
    let lower = path.to_ascii_lowercase();
    let bad = path[1..]
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
        || ["%2f", "%5c", "%2e", "\\"]
            .iter()
            .any(|p| lower.contains(p));
    if bad {
        return Err(RequestError::InvalidField {
            field: "path".into(),
            rule: "must not hold empty, '.' or '..' segments or encoded slashes".into(),
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
