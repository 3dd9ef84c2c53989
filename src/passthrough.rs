//! Pass-through: callers reach Truora's other endpoints (process results, listings, access
//! links) under `/truora/identity/...` and `/truora/account/...` without ever holding the master
//! key. The broker authenticates the caller, checks method and path against that caller's
//! `passthrough` allowlist, strips the caller's credentials and the hop-by-hop headers, rewrites
//! Host, appends X-Forwarded-For, injects the master key, and relays both bodies as streams.
//! Truora's status and body come back as they are (they are the caller's own results), except
//! that a 401/403 (the master key refused) becomes 502, as for minting.
//!
//! Final process results (`status` success or failure) may be cached for `cache.result_ttl`,
//! keyed by caller and path; pending ones never are.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::error::{BrokerError, RequestError, UpstreamError};
use crate::secret::MasterKey;
use crate::server::{full, BoxError, HttpResponse};
use crate::upstream::API_KEY_HEADER;

/// Which Truora API a pass-through path goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/truora/identity/...` -> `upstream.identity_url`
    Identity,
    /// `/truora/account/...` -> `upstream.account_url`
    Account,
}

impl Api {
    /// The API a caller path is for, and the path Truora knows (prefix removed).
    pub fn of(path: &str) -> Option<(Api, &str)> {
        if let Some(rest) = path.strip_prefix("/truora/identity/") {
            Some((Api::Identity, &path[path.len() - rest.len() - 1..]))
        } else if let Some(rest) = path.strip_prefix("/truora/account/") {
            Some((Api::Account, &path[path.len() - rest.len() - 1..]))
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
        if Api::of(path).is_none() {
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

/// Headers that belong to one connection and are never forwarded (RFC 9110 7.6.1), plus the
/// caller's own credentials.
const NOT_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "authorization",
];

/// Removes hop-by-hop headers (those named by `Connection` too) and credentials.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
    headers.remove(API_KEY_HEADER);
}

/// Appends the caller's address to `X-Forwarded-For`.
pub fn append_forwarded_for(headers: &mut HeaderMap, peer: Option<IpAddr>) {
    let Some(ip) = peer else { return };
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

/// A streamed body, either way.
type Streamed = UnsyncBoxBody<Bytes, BoxError>;

/// The streaming client to Truora's identity and account APIs.
pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Streamed>,
    identity: String,
    account: String,
    key: Arc<arc_swap::ArcSwap<MasterKey>>,
    timeout: Duration,
    max_body: usize,
}

/// A relayed answer: status, headers, and the body as a stream.
pub type Relayed = Response<Streamed>;

impl Forwarder {
    /// A forwarder to `identity_url` and `account_url`, injecting the current `key`.
    pub fn new(
        identity_url: &str,
        account_url: &str,
        key: Arc<arc_swap::ArcSwap<MasterKey>>,
        connect_timeout: Duration,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Self, String> {
        let base = |url: &str| -> Result<String, String> {
            let trimmed = url.trim_end_matches('/');
            trimmed.parse::<Uri>().map_err(|e| format!("{url}: {e}"))?;
            Ok(trimmed.to_owned())
        };
        Ok(Self {
            client: crate::upstream::pooled_client(connect_timeout)?,
            identity: base(identity_url)?,
            account: base(account_url)?,
            key,
            timeout,
            max_body,
        })
    }

    /// Relays `req` (already authorised) to Truora's `api` at `path`.
    pub async fn forward<B>(
        &self,
        api: Api,
        path: &str,
        req: Request<B>,
        peer: Option<IpAddr>,
    ) -> Result<Relayed, BrokerError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let (mut parts, body) = req.into_parts();
        if let Some(len) = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > self.max_body as u64 {
                return Err(RequestError::PayloadTooLarge {
                    limit: self.max_body,
                }
                .into());
            }
        }
        let base = match api {
            Api::Identity => &self.identity,
            Api::Account => &self.account,
        };
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let uri: Uri = format!("{base}{path}{query}")
            .parse()
            .map_err(|_| BrokerError::Internal("a pass-through URI did not parse"))?;
        strip_hop_by_hop(&mut parts.headers);
        // The client sets Host from the URI: Truora's, not the broker's.
        parts.headers.remove(HOST);
        append_forwarded_for(&mut parts.headers, peer);
        let mut key = HeaderValue::from_str(self.key.load().expose())
            .map_err(|_| BrokerError::Internal("the master key is not a valid header value"))?;
        key.set_sensitive(true);
        parts.headers.insert(API_KEY_HEADER, key);
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        // Streamed as it arrives, cut off past the cap.
        let body = Limited::new(body, self.max_body).boxed_unsync();
        let request = Request::from_parts(parts, body);

        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Unreachable
                } else {
                    UpstreamError::ConnectionLost
                }
            })?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::CredentialRejected {
                status: status.as_u16(),
            }
            .into());
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        ))
    }
}

/// A final result kept for `cache.result_ttl`.
#[derive(Debug, Clone)]
pub struct CachedResult {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

/// Largest result body the result cache reads to decide whether it is final.
pub const MAX_CACHED_RESULT: usize = 256 * 1024;

/// Final process results by caller and path.
pub struct ResultCache {
    inner: moka::sync::Cache<(Arc<str>, Box<str>), CachedResult>,
}

impl ResultCache {
    /// A cache keeping results for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self::with_capacity(ttl, 10_000)
    }

    /// At most `max_entries` results (the least recently read make room, see
    /// [`crate::cache::bounded`]), each kept for `ttl`.
    fn with_capacity(ttl: Duration, max_entries: u64) -> Self {
        Self {
            inner: crate::cache::bounded(max_entries).time_to_live(ttl).build(),
        }
    }

    /// True for the paths whose answers may be cached: `GET /v1/processes/<id>/result`.
    pub fn cacheable(method: &Method, api: Api, path: &str) -> bool {
        let mut parts = path.split('/');
        *method == Method::GET
            && api == Api::Identity
            && parts.next() == Some("")
            && parts.next() == Some("v1")
            && parts.next() == Some("processes")
            && parts.next().is_some_and(|id| !id.is_empty())
            && parts.next() == Some("result")
            && parts.next().is_none()
    }

    /// The cached answer for the caller's path.
    pub fn get(&self, caller: &Arc<str>, path_and_query: &str) -> Option<HttpResponse> {
        let hit = self
            .inner
            .get(&(Arc::clone(caller), path_and_query.into()))?;
        let mut r = Response::new(full(hit.body));
        *r.status_mut() = hit.status;
        if let Some(ct) = hit.content_type {
            r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
        }
        Some(r)
    }

    /// Reads a relayed answer whole (it is small) and keeps it when the result is final.
    /// Answers that are not 200, too large, or pending pass through untouched.
    pub async fn fill(
        &self,
        caller: &Arc<str>,
        path_and_query: &str,
        response: Relayed,
    ) -> Result<HttpResponse, BrokerError> {
        let small = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|len| len <= MAX_CACHED_RESULT);
        if response.status() != StatusCode::OK || !small {
            return Ok(response.map(Either::Right));
        }
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|_| UpstreamError::ConnectionLost)?
            .to_bytes();
        if is_final(&bytes) {
            self.inner.insert(
                (Arc::clone(caller), path_and_query.into()),
                CachedResult {
                    status: parts.status,
                    content_type: parts.headers.get(http::header::CONTENT_TYPE).cloned(),
                    body: bytes.clone(),
                },
            );
        }
        Ok(Response::from_parts(parts, full(bytes)))
    }
}

/// A process result is final when its status (`override_status` first) is success or failure.
fn is_final(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Result_ {
        status: Option<String>,
        override_status: Option<String>,
    }
    serde_json::from_slice::<Result_>(body)
        .ok()
        .and_then(|r| r.override_status.or(r.status))
        .is_some_and(|s| s == "success" || s == "failure")
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
            Api::of("/truora/identity/v1/processes"),
            Some((Api::Identity, "/v1/processes"))
        );
        assert_eq!(
            Api::of("/truora/account/v1/bre/rules"),
            Some((Api::Account, "/v1/bre/rules"))
        );
        assert_eq!(Api::of("/v1/tokens"), None);
    }

    #[test]
    fn hop_by_hop_headers_and_credentials_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "x-private, keep-alive"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("authorization", "Bearer secret"),
            ("truora-api-key", "nope"),
            ("accept", "application/json"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn x_forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, Some("10.0.0.1".parse().unwrap()));
        append_forwarded_for(&mut h, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }

    #[test]
    fn only_final_results_are_final() {
        assert!(is_final(br#"{"status":"success"}"#));
        assert!(is_final(
            br#"{"status":"failure","failure_status":"declined"}"#
        ));
        assert!(!is_final(br#"{"status":"pending"}"#));
        assert!(is_final(
            br#"{"status":"pending","override_status":"success"}"#
        ));
        assert!(!is_final(
            br#"{"status":"success","override_status":"pending"}"#
        ));
        assert!(!is_final(b"not json"));
    }

    /// A relayed 200 answer carrying `body`, as the forwarder hands it over.
    fn relayed(body: &'static str) -> Relayed {
        let mut r = Response::new(
            http_body_util::Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        r.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        r
    }

    #[tokio::test]
    async fn a_full_result_cache_keeps_the_result_just_read() {
        let cache = ResultCache::with_capacity(Duration::from_secs(600), 20);
        let caller: Arc<str> = "c".into();
        let path = |i: u32| format!("/v1/processes/P{i}/result");
        const FINAL: &str = r#"{"status":"success"}"#;
        for i in 0..20 {
            cache.fill(&caller, &path(i), relayed(FINAL)).await.unwrap();
        }
        for _ in 0..20 {
            for i in 0..20 {
                assert!(cache.get(&caller, &path(i)).is_some());
            }
            cache.inner.run_pending_tasks();
        }
        for new in 100..105 {
            cache
                .fill(&caller, &path(new), relayed(FINAL))
                .await
                .unwrap();
            cache.inner.run_pending_tasks();
            assert!(
                cache.get(&caller, &path(new)).is_some(),
                "the result just read for {} was refused",
                path(new)
            );
        }
        assert!(cache.inner.entry_count() <= 20);
    }

    #[test]
    fn only_result_reads_are_cacheable() {
        assert!(ResultCache::cacheable(
            &Method::GET,
            Api::Identity,
            "/v1/processes/P1/result"
        ));
        assert!(!ResultCache::cacheable(
            &Method::POST,
            Api::Identity,
            "/v1/processes/P1/result"
        ));
        assert!(!ResultCache::cacheable(
            &Method::GET,
            Api::Account,
            "/v1/processes/P1/result"
        ));
        assert!(!ResultCache::cacheable(
            &Method::GET,
            Api::Identity,
            "/v1/processes/P1"
        ));
    }
}
