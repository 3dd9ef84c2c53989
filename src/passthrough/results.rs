//! Final process results (`status` success or failure) read through
//! `GET /truora/identity/v1/processes/<id>/result`: what they say of their process
//! ([`verdict`]: an ended process's tokens are dropped), and the cache that keeps them for
//! `cache.result_ttl` per caller and path; pending ones never are.
//!
//! Bounded in bytes (`cache.result_max_bytes`, every body and key counted), not by count: one
//! caller varying a path could otherwise hold thousands of large answers. The query string is
//! not part of the key (Truora's result call takes no parameters), so varying it makes no new
//! entries either.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::response::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;

use super::forward::Relayed;
use super::pattern::TruoraApi;
use crate::cache::bounded;
use crate::error::{BrokerError, UpstreamError};
use crate::truora::{is_account_id, is_flow_id};
use crate::wire::{full, HttpResponse};

/// A final result kept for `cache.result_ttl`.
#[derive(Debug, Clone)]
pub struct CachedResult {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

/// Largest result body the result cache reads to decide whether it is final.
pub const MAX_CACHED_RESULT: usize = 256 * 1024;

/// What an entry costs besides its body and path: the key's caller, the status, the content
/// type and moka's own bookkeeping, rounded up.
const ENTRY_OVERHEAD: usize = 256;

/// Final process results by caller and path.
pub struct ResultCache {
    inner: moka::sync::Cache<(Arc<str>, Box<str>), CachedResult>,
}

impl ResultCache {
    /// A cache keeping results for `ttl`, at most `max_bytes` of them (the least recently read
    /// make room, see [`bounded`]).
    pub fn new(ttl: Duration, max_bytes: u64) -> Self {
        Self {
            inner: bounded(max_bytes)
                .weigher(|(caller, path): &(Arc<str>, Box<str>), r: &CachedResult| {
                    let bytes = r.body.len() + caller.len() + path.len() + ENTRY_OVERHEAD;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
        }
    }

    /// Drops every result kept for `caller` (a revoked caller).
    pub fn forget_caller(&self, caller: &str) {
        let caller: Arc<str> = caller.into();
        // Fails only when closures are not supported, which `new` turns on.
        let _ = self
            .inner
            .invalidate_entries_if(move |(c, _), _| *c == caller);
    }

    /// Bytes held now (after pending evictions are applied).
    pub fn weighted_size(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.weighted_size()
    }

    /// True for the paths whose answers may be cached: `GET /v1/processes/<id>/result`.
    pub fn cacheable(method: &Method, api: TruoraApi, path: &str) -> bool {
        let mut parts = path.split('/');
        *method == Method::GET
            && api == TruoraApi::Identity
            && parts.next() == Some("")
            && parts.next() == Some("v1")
            && parts.next() == Some("processes")
            && parts.next().is_some_and(|id| !id.is_empty())
            && parts.next() == Some("result")
            && parts.next().is_none()
    }

    /// The cached answer for the caller's path.
    pub fn get(&self, caller: &Arc<str>, path: &str) -> Option<HttpResponse> {
        let hit = self.inner.get(&(Arc::clone(caller), path.into()))?;
        let mut r = Response::new(full(hit.body));
        *r.status_mut() = hit.status;
        if let Some(ct) = hit.content_type {
            r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
        }
        Some(r)
    }

    /// Keeps a final result read for `caller` at `path`.
    pub fn keep(&self, caller: &Arc<str>, path: &str, parts: &Parts, body: Bytes) {
        self.inner.insert(
            (Arc::clone(caller), path.into()),
            CachedResult {
                status: parts.status,
                content_type: parts.headers.get(http::header::CONTENT_TYPE).cloned(),
                body,
            },
        );
    }
}

/// Reads a relayed result whole when it is a 200 of at most [`MAX_CACHED_RESULT`] by its
/// `Content-Length`; any other answer comes back untouched, to be streamed.
pub async fn read_small(response: Relayed) -> Result<Result<(Parts, Bytes), Relayed>, BrokerError> {
    let small = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len <= MAX_CACHED_RESULT);
    if response.status() != StatusCode::OK || !small {
        return Ok(Err(response));
    }
    let (parts, body) = response.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|_| UpstreamError::ConnectionLost)?
        .to_bytes();
    Ok(Ok((parts, bytes)))
}

/// What a process result says of its process.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The process ended: its status (`override_status` first) is success or failure.
    pub ended: bool,
    /// The flow it ran in, when the result names a well-formed one.
    pub flow_id: Option<String>,
    /// The user it was for, when the result names a well-formed one.
    pub account_id: Option<String>,
}

/// Reads a result body (Truora's `GET /v1/processes/{id}/result`); anything unreadable is a
/// process that has not ended.
pub fn verdict(body: &[u8]) -> Verdict {
    #[derive(serde::Deserialize)]
    struct Result_ {
        status: Option<String>,
        override_status: Option<String>,
        flow_id: Option<String>,
        account_id: Option<String>,
    }
    let Ok(r) = serde_json::from_slice::<Result_>(body) else {
        return Verdict::default();
    };
    Verdict {
        ended: r
            .override_status
            .or(r.status)
            .is_some_and(|s| s == "success" || s == "failure"),
        flow_id: r.flow_id.filter(|f| is_flow_id(f)),
        account_id: r.account_id.filter(|a| is_account_id(a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_final(body: &[u8]) -> bool {
        verdict(body).ended
    }

    /// What the tests used to call in one go: read, and keep when final.
    async fn fill(cache: &ResultCache, caller: &Arc<str>, path: &str, relayed: Relayed) {
        let (parts, body) = read_small(relayed).await.unwrap().unwrap();
        if verdict(&body).ended {
            cache.keep(caller, path, &parts, body);
        }
    }

    #[test]
    fn a_result_names_its_flow_and_user_when_they_are_well_formed() {
        let v = verdict(
            br#"{"status":"failure","flow_id":"IPF1","account_id":"u-1","process_id":"IDP1"}"#,
        );
        assert_eq!(
            v,
            Verdict {
                ended: true,
                flow_id: Some("IPF1".into()),
                account_id: Some("u-1".into()),
            }
        );
        let odd = verdict(br#"{"status":"success","flow_id":"a/b","account_id":"x y"}"#);
        assert_eq!((odd.ended, odd.flow_id, odd.account_id), (true, None, None));
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

    /// What one entry of these tests weighs.
    fn weight(caller: &str, path: &str, body: &str) -> u64 {
        (caller.len() + path.len() + body.len() + ENTRY_OVERHEAD) as u64
    }

    #[tokio::test]
    async fn a_full_result_cache_keeps_the_result_just_read() {
        const ROOM: u64 = 20;
        let one = weight("c", "/v1/processes/P00/result", r#"{"status":"success"}"#);
        let cache = ResultCache::new(Duration::from_secs(600), ROOM * one);
        let caller: Arc<str> = "c".into();
        let path = |i: u32| format!("/v1/processes/P{i:02}/result");
        const FINAL: &str = r#"{"status":"success"}"#;
        for i in 0..20 {
            fill(&cache, &caller, &path(i), relayed(FINAL)).await;
        }
        for _ in 0..20 {
            for i in 0..20 {
                assert!(cache.get(&caller, &path(i)).is_some());
            }
            cache.inner.run_pending_tasks();
        }
        for new in 100..105 {
            fill(&cache, &caller, &path(new), relayed(FINAL)).await;
            cache.inner.run_pending_tasks();
            assert!(
                cache.get(&caller, &path(new)).is_some(),
                "the result just read for {} was refused",
                path(new)
            );
        }
        assert!(cache.inner.entry_count() <= ROOM);
    }

    #[tokio::test]
    async fn the_cache_stays_under_its_byte_bound_and_forgets_a_revoked_caller() {
        const BOUND: u64 = 1024 * 1024;
        let cache = ResultCache::new(Duration::from_secs(600), BOUND);
        let big: &'static str = Box::leak(
            format!(
                r#"{{"status":"success","pad":"{}"}}"#,
                "x".repeat(100 * 1024)
            )
            .into_boxed_str(),
        );
        for caller in ["a", "b"] {
            let caller: Arc<str> = caller.into();
            for i in 0..100 {
                let path = format!("/v1/processes/P{i}/result");
                fill(&cache, &caller, &path, relayed(big)).await;
            }
        }
        let held = cache.weighted_size();
        assert!(held <= BOUND, "{held} bytes held, bound {BOUND}");
        assert!(held >= BOUND / 2, "the bound is used: {held}");
        cache.forget_caller("b");
        cache.weighted_size();
        assert!(cache.inner.iter().all(|(k, _)| &*k.0 == "a"));
    }

    #[test]
    fn only_result_reads_are_cacheable() {
        assert!(ResultCache::cacheable(
            &Method::GET,
            TruoraApi::Identity,
            "/v1/processes/P1/result"
        ));
        assert!(!ResultCache::cacheable(
            &Method::POST,
            TruoraApi::Identity,
            "/v1/processes/P1/result"
        ));
        assert!(!ResultCache::cacheable(
            &Method::GET,
            TruoraApi::Account,
            "/v1/processes/P1/result"
        ));
        assert!(!ResultCache::cacheable(
            &Method::GET,
            TruoraApi::Identity,
            "/v1/processes/P1"
        ));
    }
}
