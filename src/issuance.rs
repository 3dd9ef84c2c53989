//! The issuance core: from a validated request of an authenticated caller to the bytes of the
//! answer. It knows nothing of hyper, so it is benchmarked and fuzzed without sockets.
//!
//! The phases of one request, in order:
//!
//! 1. **Key**: [`cache::key`] hashes the caller and the canonical request once.
//! 2. **Lookup**: a cached token with at least `min_remaining` left is a hit; its answer bytes are
//!    ready in the entry. A request that names no user skips the cache entirely (never shared).
//! 3. **Single flight**: on a miss, the first request for a key starts one upstream call in its
//!    own task; identical requests arriving meanwhile wait on it (`coalesced`). The task runs to
//!    its end even if every waiter has gone, fills the cache before it leaves the in-flight
//!    table (so a later request finds one or the other), and a failure is handed to every
//!    waiter and then forgotten: it is never cached.
//! 4. **Entry**: the token's lifetime is read from its claims and measured from receipt on the
//!    local clock, so a skewed upstream clock cannot make the broker hand out a dead token.
//! 5. **Render**: the answer is the entry's prefix plus the cache status and `expires_in`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::cache::{self, CacheKey, Entry, TokenCache};
use crate::config::{ArrayEncoding, DEFAULT_TOKEN_LIFETIME};
use crate::error::{BrokerError, UpstreamError};
use crate::metrics::Metrics;
use crate::request::TokenRequest;
use crate::token;
use crate::upstream::Mint;

/// The `message` of a drop-in answer, as Truora words it.
pub const DROPIN_MESSAGE: &str = "API key created successfully";
/// A token whose claims give a longer life than this is not believed.
pub const MAX_PLAUSIBLE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Settings of the core, from the config file.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// `cache.min_remaining`.
    pub min_remaining: Duration,
    /// `cache.max_entries`.
    pub max_entries: u64,
    /// `upstream.web_url`.
    pub web_url: String,
    /// `upstream.array_encoding`.
    pub array_encoding: ArrayEncoding,
}

/// Whether the answer came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache.
    Hit,
    /// Minted for this request (or for an identical one it waited on).
    Miss,
}

impl CacheStatus {
    /// `X-Cache` header value.
    pub fn header(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
        }
    }
}

/// A token to answer with.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The token and its ready answer bytes.
    pub entry: Arc<Entry>,
    /// Where it came from.
    pub cache: CacheStatus,
}

impl Issued {
    /// The `POST /v1/tokens` answer: `{"api_key","expires_at","identity_url","cache","expires_in"}`.
    ///
    /// The buffer is allocated at its final size, so turning it into `Bytes` needs no second
    /// allocation.
    pub fn tokens_body(&self, now: Instant) -> Vec<u8> {
        let prefix = &self.entry.tokens_prefix;
        let status: &[u8] = match self.cache {
            CacheStatus::Hit => b"hit\",\"expires_in\":",
            CacheStatus::Miss => b"miss\",\"expires_in\":",
        };
        let mut digits = [0u8; 20];
        let expires_in = Self::decimal(self.entry.remaining(now).as_secs(), &mut digits);
        let mut out = Vec::with_capacity(prefix.len() + status.len() + expires_in.len() + 1);
        out.extend_from_slice(prefix);
        out.extend_from_slice(status);
        out.extend_from_slice(expires_in);
        out.push(b'}');
        out
    }

    /// `n` in decimal digits, written at the end of `buf`.
    fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return &buf[start..];
            }
        }
    }

    /// The `POST /v1/api-keys` answer, Truora's shape: `{"api_key","message"}`.
    pub fn dropin_body(&self) -> &[u8] {
        &self.entry.dropin_body
    }
}

type FlightResult = Option<Result<Arc<Entry>, UpstreamError>>;

/// The core: cache, single flight and minting.
pub struct Issuer {
    cache: TokenCache,
    inflight: Mutex<HashMap<CacheKey, watch::Receiver<FlightResult>>>,
    mint: Arc<dyn Mint>,
    metrics: Arc<Metrics>,
    settings: IssuerSettings,
}

/// What a flight needs to build its entry, owned so the flight outlives the request.
struct Subject {
    caller: Arc<str>,
    flow_id: Box<str>,
    account_id: Option<Box<str>>,
    form: String,
}

impl Issuer {
    /// A core minting through `mint`.
    pub fn new(settings: IssuerSettings, mint: Arc<dyn Mint>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            cache: TokenCache::new(settings.max_entries),
            inflight: Mutex::new(HashMap::new()),
            mint,
            metrics,
            settings,
        })
    }

    /// The cache, for metrics and tests.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Answers a caller's validated request with a cached or freshly minted token.
    pub async fn issue(
        self: &Arc<Self>,
        caller: &Arc<str>,
        req: &TokenRequest<'_>,
    ) -> Result<Issued, BrokerError> {
        if !req.names_user() {
            self.metrics.lookup_uncacheable.inc();
            let entry = self.mint_entry(self.subject(caller, req)).await?;
            return Ok(Issued {
                entry,
                cache: CacheStatus::Miss,
            });
        }

        let key = cache::key(caller, req);
        if let Some(entry) = self.cache.get(&key, Instant::now()) {
            self.metrics.lookup_hit.inc();
            return Ok(Issued {
                entry,
                cache: CacheStatus::Hit,
            });
        }

        let mut rx = {
            let mut inflight = self
                .inflight
                .lock()
                .map_err(|_| BrokerError::Internal("in-flight table poisoned"))?;
            if let Some(rx) = inflight.get(&key) {
                self.metrics.lookup_coalesced.inc();
                rx.clone()
            } else if let Some(entry) = self.cache.get(&key, Instant::now()) {
                // A flight finished between our lookup and taking the lock.
                self.metrics.lookup_hit.inc();
                return Ok(Issued {
                    entry,
                    cache: CacheStatus::Hit,
                });
            } else {
                self.metrics.lookup_miss.inc();
                let (tx, rx) = watch::channel(None);
                inflight.insert(key, rx.clone());
                tokio::spawn(Arc::clone(self).fly(key, self.subject(caller, req), tx));
                rx
            }
        };

        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| BrokerError::Internal("the upstream call was lost"))?
            .clone();
        match result {
            Some(Ok(entry)) => Ok(Issued {
                entry,
                cache: CacheStatus::Miss,
            }),
            Some(Err(e)) => Err(e.into()),
            None => Err(BrokerError::Internal("the upstream call was lost")),
        }
    }

    /// Drops this caller's cached tokens for the flow and/or account; returns how many.
    pub fn invalidate(&self, caller: &str, flow_id: Option<&str>, account_id: Option<&str>) -> u64 {
        let n = self.cache.invalidate(caller, flow_id, account_id);
        tracing::info!(target: "audit", caller, flow_id, invalidated = n, "tokens invalidated");
        n
    }

    /// One upstream call for `key`, shared by every waiter. Runs in its own task.
    async fn fly(
        self: Arc<Self>,
        key: CacheKey,
        subject: Subject,
        tx: watch::Sender<FlightResult>,
    ) {
        struct Leave<'a>(&'a Issuer, CacheKey);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                if let Ok(mut inflight) = self.0.inflight.lock() {
                    inflight.remove(&self.1);
                }
            }
        }
        // Leaves the table even if minting panics; waiters then see the channel close.
        let leave = Leave(&self, key);
        let result = self.mint_entry(subject).await;
        if let Ok(entry) = &result {
            if entry.serve_until > Instant::now() {
                self.cache.insert(key, Arc::clone(entry));
            }
        }
        drop(leave);
        tx.send_replace(Some(result));
    }

    fn subject(&self, caller: &Arc<str>, req: &TokenRequest<'_>) -> Subject {
        Subject {
            caller: Arc::clone(caller),
            flow_id: req.flow_id.as_ref().into(),
            account_id: req.account_id.as_deref().map(Into::into),
            form: req.upstream_form(self.settings.array_encoding),
        }
    }

    /// Mints a token upstream and builds its entry.
    async fn mint_entry(&self, subject: Subject) -> Result<Arc<Entry>, UpstreamError> {
        let token = Zeroizing::new(self.mint.mint(subject.form).await?);
        let received = Instant::now();
        let received_wall = SystemTime::now();
        let lifetime = match token::lifetime(&token) {
            None => DEFAULT_TOKEN_LIFETIME,
            Some(l) if l.is_zero() => {
                return Err(UpstreamError::BadResponse {
                    reason: "the token expires before it was issued",
                })
            }
            Some(l) if l > MAX_PLAUSIBLE_LIFETIME => {
                return Err(UpstreamError::BadResponse {
                    reason: "the token claims an implausibly long lifetime",
                })
            }
            Some(l) => l,
        };
        if lifetime <= self.settings.min_remaining {
            tracing::warn!(
                lifetime_s = lifetime.as_secs(),
                "Truora minted a token that lives less than cache.min_remaining: it is handed to this caller but not cached"
            );
        }
        let expires = received + lifetime;
        let expires_at = received_wall + lifetime;
        tracing::info!(
            target: "audit",
            caller = &*subject.caller,
            flow_id = &*subject.flow_id,
            lifetime_s = lifetime.as_secs(),
            "token minted"
        );
        Ok(Arc::new(Entry {
            tokens_prefix: self.tokens_prefix(&token, expires_at),
            dropin_body: dropin_body(&token),
            caller: subject.caller,
            flow_id: subject.flow_id,
            account_id: subject.account_id,
            expires,
            serve_until: expires
                .checked_sub(self.settings.min_remaining)
                .unwrap_or(received)
                .max(received),
            expires_at,
        }))
    }

    fn tokens_prefix(&self, token: &str, expires_at: SystemTime) -> Zeroizing<Vec<u8>> {
        let escaped: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
        let escaped = Zeroizing::new(escaped);
        let identity_url = Zeroizing::new(format!(
            "{}/?token={}",
            self.settings.web_url.trim_end_matches('/'),
            escaped.as_str()
        ));
        let mut out = Zeroizing::new(Vec::with_capacity(2 * token.len() + 160));
        out.extend_from_slice(b"{\"api_key\":");
        json_string(&mut out, token);
        out.extend_from_slice(b",\"expires_at\":\"");
        let _ = write!(out, "{}", humantime::format_rfc3339_seconds(expires_at));
        out.extend_from_slice(b"\",\"identity_url\":");
        json_string(&mut out, &identity_url);
        out.extend_from_slice(b",\"cache\":\"");
        out
    }
}

fn dropin_body(token: &str) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(token.len() + 64));
    out.extend_from_slice(b"{\"api_key\":");
    json_string(&mut out, token);
    out.extend_from_slice(b",\"message\":");
    json_string(&mut out, DROPIN_MESSAGE);
    out.push(b'}');
    out
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    // Serialising a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::MintFuture;
    use base64::Engine;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake upstream: counts calls, waits a little, answers with a JWT of the given lifetime
    /// or with the given error.
    struct Fake {
        calls: AtomicUsize,
        lifetime: u64,
        fail: Option<UpstreamError>,
        delay: Duration,
    }

    impl Mint for Fake {
        fn mint(&self, _form: String) -> MintFuture {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let fail = self.fail.clone();
            let lifetime = self.lifetime;
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if let Some(e) = fail {
                    return Err(e);
                }
                Ok(jwt(1_000_000, 1_000_000 + lifetime, n))
            })
        }
    }

    fn jwt(iat: u64, exp: u64, n: usize) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(r#"{"alg":"HS256"}"#),
            e.encode(format!(r#"{{"iat":{iat},"exp":{exp},"jti":"{n}"}}"#))
        )
    }

    fn issuer(fake: Fake, min_remaining: Duration) -> (Arc<Issuer>, Arc<Fake>) {
        let fake = Arc::new(fake);
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let settings = IssuerSettings {
            min_remaining,
            max_entries: 1000,
            web_url: "https://identity.truora.com".into(),
            array_encoding: ArrayEncoding::Repeat,
        };
        struct Shared(Arc<Fake>);
        impl Mint for Shared {
            fn mint(&self, form: String) -> MintFuture {
                self.0.mint(form)
            }
        }
        (
            Issuer::new(settings, Arc::new(Shared(Arc::clone(&fake))), metrics),
            fake,
        )
    }

    fn fake(lifetime: u64) -> Fake {
        Fake {
            calls: AtomicUsize::new(0),
            lifetime,
            fail: None,
            delay: Duration::from_millis(20),
        }
    }

    const USER_REQ: &str = "country=CO&flow_id=IPF1&redirect_url=https://a.example&account_id=u1";

    fn req(body: &str) -> TokenRequest<'static> {
        TokenRequest::from_form(body.as_bytes())
            .unwrap()
            .into_owned()
    }

    fn body_json(issued: &Issued) -> serde_json::Value {
        serde_json::from_slice(&issued.tokens_body(Instant::now())).unwrap()
    }

    #[tokio::test]
    async fn second_identical_request_is_a_hit_with_the_same_token() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "checkout".into();
        let a = issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        let b = issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        assert_eq!(a.cache, CacheStatus::Miss);
        assert_eq!(b.cache, CacheStatus::Hit);
        assert_eq!(body_json(&a)["api_key"], body_json(&b)["api_key"]);
        assert_eq!(body_json(&b)["cache"], "hit");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_answer_carries_every_documented_field() {
        let (issuer, _) = issuer(fake(7200), Duration::from_secs(900));
        let a = issuer.issue(&"c".into(), &req(USER_REQ)).await.unwrap();
        let v = body_json(&a);
        let key = v["api_key"].as_str().unwrap();
        assert_eq!(
            v["identity_url"],
            format!("https://identity.truora.com/?token={key}")
        );
        assert_eq!(v["cache"], "miss");
        let expires_in = v["expires_in"].as_u64().unwrap();
        assert!((7190..=7200).contains(&expires_in), "{expires_in}");
        let at = humantime::parse_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
        let from_now = at.duration_since(SystemTime::now()).unwrap().as_secs();
        assert!((7190..=7200).contains(&from_now), "{from_now}");
        let d: serde_json::Value = serde_json::from_slice(a.dropin_body()).unwrap();
        assert_eq!(d["api_key"], key);
        assert_eq!(d["message"], DROPIN_MESSAGE);
    }

    #[tokio::test]
    async fn concurrent_identical_misses_make_one_upstream_call() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let issuer = Arc::clone(&issuer);
            let caller = Arc::clone(&caller);
            tasks.push(tokio::spawn(async move {
                let issued = issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
                body_json(&issued)["api_key"].as_str().unwrap().to_owned()
            }));
        }
        let mut keys = std::collections::HashSet::new();
        for t in tasks {
            keys.insert(t.await.unwrap());
        }
        assert_eq!(keys.len(), 1);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failure_reaches_every_waiter_and_is_not_cached() {
        let mut f = fake(7200);
        f.fail = Some(UpstreamError::ServerError { status: 500 });
        let (issuer, fake) = issuer(f, Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let issuer = Arc::clone(&issuer);
            let caller = Arc::clone(&caller);
            tasks.push(tokio::spawn(async move {
                issuer.issue(&caller, &req(USER_REQ)).await.unwrap_err()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().code(), "upstream_unavailable");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        issuer.issue(&caller, &req(USER_REQ)).await.unwrap_err();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_naming_no_user_is_never_cached_or_shared() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let anon = "country=CO&flow_id=IPF1&redirect_url=https://a.example";
        let a = issuer.issue(&caller, &req(anon)).await.unwrap();
        let b = issuer.issue(&caller, &req(anon)).await.unwrap();
        assert_eq!((a.cache, b.cache), (CacheStatus::Miss, CacheStatus::Miss));
        assert_ne!(body_json(&a)["api_key"], body_json(&b)["api_key"]);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        assert!(issuer.cache().is_empty());
    }

    #[tokio::test]
    async fn another_caller_does_not_get_the_same_token() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        issuer.issue(&"a".into(), &req(USER_REQ)).await.unwrap();
        let b = issuer.issue(&"b".into(), &req(USER_REQ)).await.unwrap();
        assert_eq!(b.cache, CacheStatus::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_inside_min_remaining_is_not_served_from_cache() {
        // Lives 3 s; may be handed out while 2 s are left, so for about 1 s.
        let (issuer, fake) = issuer(fake(3), Duration::from_secs(2));
        let caller: Arc<str> = "c".into();
        issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        let hit = issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        assert_eq!(hit.cache, CacheStatus::Hit);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let again = issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        assert_eq!(again.cache, CacheStatus::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_living_less_than_min_remaining_is_handed_over_but_not_cached() {
        let (issuer, fake) = issuer(fake(60), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        let b = issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        assert_eq!(b.cache, CacheStatus::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_already_dead_or_absurd_token_is_refused() {
        let (issuer, _) = issuer(fake(0), Duration::from_secs(1));
        let err = issuer.issue(&"c".into(), &req(USER_REQ)).await.unwrap_err();
        assert_eq!(err.code(), "upstream_bad_response");
        let (issuer, _) = issuer_with_lifetime(10 * 365 * 86400);
        let err = issuer.issue(&"c".into(), &req(USER_REQ)).await.unwrap_err();
        assert_eq!(err.code(), "upstream_bad_response");
    }

    fn issuer_with_lifetime(l: u64) -> (Arc<Issuer>, Arc<Fake>) {
        issuer(fake(l), Duration::from_secs(1))
    }

    #[tokio::test]
    async fn a_token_without_claims_lives_two_hours_from_receipt() {
        struct Opaque;
        impl Mint for Opaque {
            fn mint(&self, _: String) -> MintFuture {
                Box::pin(async { Ok("opaque-token".to_owned()) })
            }
        }
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let issuer = Issuer::new(
            IssuerSettings {
                min_remaining: Duration::from_secs(900),
                max_entries: 10,
                web_url: "https://id.example".into(),
                array_encoding: ArrayEncoding::Repeat,
            },
            Arc::new(Opaque),
            metrics,
        );
        let a = issuer.issue(&"c".into(), &req(USER_REQ)).await.unwrap();
        assert!(body_json(&a)["expires_in"].as_u64().unwrap() >= 7199);
    }

    #[tokio::test]
    async fn invalidation_makes_the_next_request_mint_again() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        assert_eq!(issuer.invalidate("other", Some("IPF1"), None), 0);
        assert_eq!(issuer.invalidate("c", None, Some("u1")), 1);
        let again = issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        assert_eq!(again.cache, CacheStatus::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_does_not_cancel_the_call() {
        let mut f = fake(7200);
        f.delay = Duration::from_millis(200);
        let (issuer, fake) = issuer(f, Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let first = {
            let issuer = Arc::clone(&issuer);
            let caller = Arc::clone(&caller);
            tokio::spawn(async move { issuer.issue(&caller, &req(USER_REQ)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.abort();
        let later = issuer.issue(&caller, &req(USER_REQ)).await.unwrap();
        assert_eq!(later.cache, CacheStatus::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }
}
