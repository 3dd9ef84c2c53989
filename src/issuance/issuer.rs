//! The issuer: from a validated request of an authenticated caller to a token, cached or freshly
//! minted. The phases of one request, in order:
//!
//! 1. **Key**: [`super::key::key`] hashes the caller and the canonical request once.
//! 2. **Lookup**: a cached token with at least `min_remaining` left is a hit; what its answer
//!    needs is ready in the entry. A request that names no user skips the cache entirely (never
//!    shared).
//! 3. **Single flight**: on a miss, the first request for a key starts one upstream call in its
//!    own task; identical requests arriving meanwhile wait on it (`coalesced`). The task runs to
//!    its end even if every waiter has gone, fills the cache before it leaves the in-flight
//!    table (so a later request finds one or the other), and a failure is handed to every
//!    waiter and then forgotten: it is never cached.
//! 4. **Shared tier**: with `[cache.shared]`, a local miss reads Redis first, and one replica of
//!    the fleet mints under a lock while the others wait for its value.
//! 5. **Entry**: the token's lifetime is read from its claims and measured from receipt on the
//!    local clock, so a skewed upstream clock cannot make the broker hand out a dead token.
//!
//! Rendering the answer is [`super::answer`]'s. A mint's own task carries the request's span
//! along ([`crate::telemetry::traced`]), so that the mint and the Redis calls it makes are
//! children of the request that started it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use zeroize::Zeroizing;

use super::answer::Issued;
use super::key::key;
use super::request::TokenRequest;
use crate::audit::{Audit, Event, Origin, UserTags};
use crate::cache::shared::{SharedTier, SharedToken};
use crate::cache::{identity_prefix, CacheKey, Entry, Filter, Owner, Reason, TokenCache};
use crate::error::{BrokerError, Refusal, UpstreamError};
use crate::metrics::{CacheOutcome, Metrics};
use crate::rate::KeyedBuckets;
use crate::telemetry;
use crate::truora::{token_claims, ArrayEncoding, DEFAULT_TOKEN_LIFETIME};
use crate::upstream::{Guard, Mint};
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
    /// `cache.invalidate_rate`: `DELETE /v1/tokens` a second per caller.
    pub invalidate_rate: u32,
}

type FlightResult = Option<Result<(Arc<Entry>, CacheOutcome), BrokerError>>;

/// Whether a request may be answered from the cache or an earlier flight.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Yes: the usual request.
    Cache,
    /// No: the caller asked for a new process.
    Fresh,
}

/// What a flight brings back: the entry, where it came from, and whether it may be kept (not
/// when the shared tier saw an invalidation that drops it while it was minted).
pub(super) struct Flown {
    pub(super) entry: Arc<Entry>,
    pub(super) cache: CacheOutcome,
    pub(super) keep: bool,
}

/// The core: cache, single flight and minting.
pub struct Issuer {
    pub(super) cache: TokenCache,
    inflight: Mutex<HashMap<CacheKey, watch::Receiver<FlightResult>>>,
    /// `DELETE /v1/tokens` per caller: `cache.invalidate_rate` a second.
    pub(super) invalidations: KeyedBuckets,
    mint: Arc<dyn Mint>,
    guard: Guard,
    pub(super) metrics: Arc<Metrics>,
    pub(super) settings: IssuerSettings,
    /// [`identity_prefix`] of `settings.web_url`, shared by every entry.
    identity_prefix: Arc<str>,
    /// `[cache.shared]`: consulted only on a local miss and on invalidation.
    pub(super) shared: Option<SharedTier>,
    /// The audit trail: every mint, every drop, and with `include_hits` every hit.
    pub(super) audit: Arc<Audit>,
}

/// What a flight needs to build its entry and its mint event, owned so the flight outlives the
/// request.
pub(super) struct Subject {
    pub(super) caller: Arc<str>,
    pub(super) flow_id: Box<str>,
    pub(super) account_id: Option<Box<str>>,
    pub(super) form: String,
    /// The user's tags, under the trail's key of the request's time.
    pub(super) user: UserTags,
    /// The request that started the flight.
    pub(super) request_id: Box<str>,
    pub(super) peer: Option<IpAddr>,
    /// `miss`, `uncacheable` or `no_cache`: why this request minted.
    pub(super) cache: &'static str,
}

impl Issuer {
    /// A core minting through `mint`, every call guarded by `guard`.
    pub fn new(
        settings: IssuerSettings,
        mint: Arc<dyn Mint>,
        guard: Guard,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_shared(settings, mint, guard, metrics, None)
    }

    /// [`Issuer::new`] with a Redis tier shared by replicas behind the local cache.
    pub fn with_shared(
        settings: IssuerSettings,
        mint: Arc<dyn Mint>,
        guard: Guard,
        metrics: Arc<Metrics>,
        shared: Option<SharedTier>,
    ) -> Arc<Self> {
        Self::with_audit(settings, mint, guard, metrics, shared, Audit::stderr())
    }

    /// [`Issuer::with_shared`], recording in `audit` (the broker's trail, from `[audit]`).
    pub fn with_audit(
        settings: IssuerSettings,
        mint: Arc<dyn Mint>,
        guard: Guard,
        metrics: Arc<Metrics>,
        shared: Option<SharedTier>,
        audit: Arc<Audit>,
    ) -> Arc<Self> {
        let cache = TokenCache::observed(settings.max_entries, Arc::clone(&metrics));
        let shared = shared.map(|mut tier| {
            // Another replica's 429 opens this one's throttle window (with fleet limits).
            let on_throttle = tier.fleet().map(|_| {
                let window = guard.throttle_window();
                Arc::new(move |d| window.open_for(d)) as crate::cache::shared::OnThrottle
            });
            tier.listen(cache.clone(), on_throttle);
            tier
        });
        metrics
            .cache_max_entries
            .set(i64::try_from(settings.max_entries).unwrap_or(i64::MAX));
        for reason in Reason::COUNTED {
            metrics
                .cache_invalidations
                .with_label_values(&[reason.label()]);
        }
        Arc::new(Self {
            cache,
            inflight: Mutex::new(HashMap::new()),
            invalidations: KeyedBuckets::new(settings.invalidate_rate),
            mint,
            guard,
            metrics,
            identity_prefix: identity_prefix(&settings.web_url),
            settings,
            shared,
            audit,
        })
    }

    /// The audit trail, for the rooms that record through the core's.
    pub fn audit(&self) -> &Arc<Audit> {
        &self.audit
    }

    /// The guard around upstream calls, for `/readyz`, the gauges and reloads.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The cache, for metrics and tests.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Answers a caller's validated request with a cached or freshly minted token. What the
    /// cache did is written to `outcome` as soon as it is known, so that it is reported with a
    /// failed mint too.
    pub async fn issue(
        self: &Arc<Self>,
        caller: &Arc<str>,
        req: &TokenRequest<'_>,
        outcome: &mut CacheOutcome,
    ) -> Result<Issued, BrokerError> {
        self.issue_from(caller, req, Origin::NONE, outcome, Lookup::Cache)
            .await
    }

    /// [`Issuer::issue`] for the request `origin` (its id and peer go into the audit trail).
    pub async fn issue_for(
        self: &Arc<Self>,
        caller: &Arc<str>,
        req: &TokenRequest<'_>,
        origin: Origin<'_>,
        outcome: &mut CacheOutcome,
    ) -> Result<Issued, BrokerError> {
        self.issue_from(caller, req, origin, outcome, Lookup::Cache)
            .await
    }

    /// A new process for a caller that asked for one (`Cache-Control: no-cache`): its cached
    /// token for this request is dropped everywhere (reason `no_cache`), and a token minted now,
    /// never one of a mint that started before, is answered (`cache: "miss"`) and replaces it
    /// for later requests. Mint budgets apply as to any mint. With the shared tier unreachable
    /// the token is still minted, and other replicas may go on serving the old one until Redis
    /// is back (logged).
    pub async fn renew(
        self: &Arc<Self>,
        caller: &Arc<str>,
        req: &TokenRequest<'_>,
        outcome: &mut CacheOutcome,
    ) -> Result<Issued, BrokerError> {
        self.renew_for(caller, req, Origin::NONE, outcome).await
    }

    /// [`Issuer::renew`] for the request `origin`.
    pub async fn renew_for(
        self: &Arc<Self>,
        caller: &Arc<str>,
        req: &TokenRequest<'_>,
        origin: Origin<'_>,
        outcome: &mut CacheOutcome,
    ) -> Result<Issued, BrokerError> {
        if req.names_user() {
            let filter = Filter::key(caller, key(caller, req));
            if let Err(e) = self.invalidate_everywhere(&filter, Reason::NoCache).await {
                tracing::warn!(caller = &**caller, error = %e, "a new process was asked for while the shared cache is unreachable: other replicas may serve the old token until it is back");
            }
        }
        let mut issued = self
            .issue_from(caller, req, origin, outcome, Lookup::Fresh)
            .await?;
        issued.cache = CacheOutcome::Miss;
        Ok(issued)
    }

    async fn issue_from(
        self: &Arc<Self>,
        caller: &Arc<str>,
        req: &TokenRequest<'_>,
        origin: Origin<'_>,
        outcome: &mut CacheOutcome,
        lookup: Lookup,
    ) -> Result<Issued, BrokerError> {
        if !req.names_user() {
            self.noted(outcome, CacheOutcome::Uncacheable);
            // In its own task like a shared flight, so that a caller going away mid-call
            // cannot cut an upstream call (or a breaker probe) short.
            let this = Arc::clone(self);
            let subject = self.subject(caller, req, origin, "uncacheable");
            let entry = tokio::spawn(telemetry::traced(
                async move { this.mint_entry(subject).await },
            ))
            .await
            .map_err(|_| BrokerError::Internal("the upstream call was lost"))??;
            return Ok(self.answer(entry, CacheOutcome::Miss, Instant::now()));
        }

        let key = key(caller, req);
        let cached = |issuer: &Self| match lookup {
            Lookup::Cache => issuer.cache.get(&key, Instant::now()),
            Lookup::Fresh => None,
        };
        if let Some(entry) = cached(self) {
            self.noted(outcome, CacheOutcome::Hit);
            if self.audit.include_hits() {
                self.record_hit(caller, req, origin, &entry, "hit");
            }
            return Ok(self.answer(entry, CacheOutcome::Hit, Instant::now()));
        }

        let mut rx = {
            let mut inflight = self
                .inflight
                .lock()
                .map_err(|_| BrokerError::Internal("in-flight table poisoned"))?;
            match inflight.get(&key) {
                Some(rx) if lookup == Lookup::Cache => {
                    self.noted(outcome, CacheOutcome::Coalesced);
                    rx.clone()
                }
                _ => {
                    if let Some(entry) = cached(self) {
                        // A flight finished between our lookup and taking the lock.
                        self.noted(outcome, CacheOutcome::Hit);
                        if self.audit.include_hits() {
                            self.record_hit(caller, req, origin, &entry, "hit");
                        }
                        return Ok(self.answer(entry, CacheOutcome::Hit, Instant::now()));
                    }
                    self.noted(outcome, CacheOutcome::Miss);
                    let (tx, rx) = watch::channel(None);
                    // A fresh flight takes the place of one already in the air: later
                    // requests wait on the new process's token.
                    inflight.insert(key, rx.clone());
                    let why = match lookup {
                        Lookup::Cache => "miss",
                        Lookup::Fresh => "no_cache",
                    };
                    let subject = self.subject(caller, req, origin, why);
                    tokio::spawn(telemetry::traced(Arc::clone(self).fly(key, subject, tx)));
                    rx
                }
            }
        };

        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| BrokerError::Internal("the upstream call was lost"))?
            .clone();
        match result {
            // The flight's own answer: a hit when it found the token in the shared tier.
            Some(Ok((entry, cache))) => {
                // A mint of this request's own was recorded by the flight; a token it did not
                // mint (an identical request's, or another replica's) is a hit.
                let joined = *outcome == CacheOutcome::Coalesced;
                if self.audit.include_hits() && (joined || cache == CacheOutcome::Hit) {
                    let how = if joined { "coalesced" } else { "hit" };
                    self.record_hit(caller, req, origin, &entry, how);
                }
                Ok(self.answer(entry, cache, Instant::now()))
            }
            Some(Err(e)) => Err(e),
            None => Err(BrokerError::Internal("the upstream call was lost")),
        }
    }

    /// Counts the lookup and reports it.
    fn noted(&self, outcome: &mut CacheOutcome, found: CacheOutcome) {
        self.metrics.count_lookup(found);
        *outcome = found;
    }

    /// A token answered now: counted in `token_broker_token_remaining_seconds`.
    fn answer(&self, entry: Arc<Entry>, cache: CacheOutcome, now: Instant) -> Issued {
        self.metrics
            .token_remaining
            .observe(entry.remaining(now).as_secs_f64());
        Issued { entry, cache }
    }

    /// One upstream call for `key`, shared by every waiter. Runs in its own task.
    async fn fly(
        self: Arc<Self>,
        key: CacheKey,
        subject: Subject,
        tx: watch::Sender<FlightResult>,
    ) {
        struct Leave<'a>(&'a Issuer, CacheKey, watch::Receiver<FlightResult>);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                if let Ok(mut inflight) = self.0.inflight.lock() {
                    // Unless a fresh flight has taken this one's place.
                    if inflight
                        .get(&self.1)
                        .is_some_and(|rx| rx.same_channel(&self.2))
                    {
                        inflight.remove(&self.1);
                    }
                }
            }
        }
        // Leaves the table even if minting panics; waiters then see the channel close.
        let leave = Leave(&self, key, tx.subscribe());
        // An invalidation from here on that matches this token keeps it out of the cache.
        let since = self.cache.mark();
        let flown = match &self.shared {
            None => self.mint_entry(subject).await.map(|entry| Flown {
                entry,
                cache: CacheOutcome::Miss,
                keep: true,
            }),
            Some(shared) => self.fly_fleet(shared, &key, subject).await,
        };
        if let Ok(flown) = &flown {
            if flown.keep && flown.entry.serve_until > Instant::now() {
                self.cache
                    .insert_unless_invalidated(key, Arc::clone(&flown.entry), since);
            }
        }
        let result = flown.map(|f| (f.entry, f.cache));
        drop(leave);
        // Every request still waiting holds a receiver; the table's went with `leave`.
        self.metrics
            .fill_waiters
            .observe(tx.receiver_count() as f64);
        tx.send_replace(Some(result));
    }

    fn subject(
        &self,
        caller: &Arc<str>,
        req: &TokenRequest<'_>,
        origin: Origin<'_>,
        cache: &'static str,
    ) -> Subject {
        Subject {
            caller: Arc::clone(caller),
            flow_id: req.flow_id.as_ref().into(),
            account_id: req.account_id.as_deref().map(Into::into),
            form: req.upstream_form(self.settings.array_encoding),
            user: req.user_tags(&self.audit.key()),
            request_id: origin.request_id.into(),
            peer: origin.peer,
            cache,
        }
    }

    /// Records a token handed out again (`audit.include_hits`).
    fn record_hit(
        &self,
        caller: &str,
        req: &TokenRequest<'_>,
        origin: Origin<'_>,
        entry: &Entry,
        cache: &'static str,
    ) {
        let user = req.user_tags(&self.audit.key());
        let jti = entry.jti();
        self.audit.record(&Event::Hit {
            caller,
            flow_id: &req.flow_id,
            user: &user,
            tag_key: &user.key,
            jti: jti.as_deref(),
            request_id: origin.request_id,
            peer: origin.peer,
            cache,
        });
    }

    /// Mints a token upstream (through the guard) and builds its entry.
    pub(super) async fn mint_entry(&self, subject: Subject) -> Result<Arc<Entry>, BrokerError> {
        self.mint_token(subject).await.map(|(entry, _)| entry)
    }

    /// [`Issuer::mint_entry`], also giving what the shared tier stores.
    pub(super) async fn mint_token(
        &self,
        subject: Subject,
    ) -> Result<(Arc<Entry>, SharedToken), BrokerError> {
        // `on_failure = "refuse"`: nothing is minted while the trail cannot record it.
        if !self.audit.available("mint") {
            return Err(Refusal::AuditUnavailable.into());
        }
        let token = Zeroizing::new(
            self.guard
                .call(&subject.caller, &*self.mint, &subject.form)
                .await?,
        );
        let received = Instant::now();
        let received_wall = SystemTime::now();
        if let Some(series) = self
            .metrics
            .caller(self.metrics.caller_slot(&subject.caller))
        {
            series.mints.inc();
        }
        let claims = token_claims(&token);
        let lifetime = match claims.as_ref().and_then(|c| c.lifetime) {
            None => DEFAULT_TOKEN_LIFETIME,
            Some(l) if l.is_zero() => {
                return Err(UpstreamError::BadResponse {
                    reason: "the token expires before it was issued",
                }
                .into())
            }
            Some(l) if l > MAX_PLAUSIBLE_LIFETIME => {
                return Err(UpstreamError::BadResponse {
                    reason: "the token claims an implausibly long lifetime",
                }
                .into())
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
        let jti = claims.and_then(|c| c.jti);
        let event = Event::Mint {
            caller: &subject.caller,
            flow_id: &subject.flow_id,
            user: &subject.user,
            tag_key: &subject.user.key,
            jti: jti.as_deref(),
            request_id: &subject.request_id,
            peer: subject.peer,
            lifetime_s: lifetime.as_secs(),
            cache: subject.cache,
        };
        if self.audit.refuses() {
            // Handed out only once its event is on disk.
            if self.audit.record_durable(&event).await.is_err() {
                self.audit.count_refusal("mint");
                tracing::warn!(
                    caller = &*subject.caller,
                    jti = jti.as_deref().unwrap_or("-"),
                    "a token was minted but its audit event could not be written: it is not handed out (audit.on_failure = refuse)"
                );
                return Err(Refusal::AuditUnavailable.into());
            }
        } else {
            self.audit.record(&event);
        }
        let shared = SharedToken {
            token: Zeroizing::new(token.as_str().to_owned()),
            expires_at,
            lifetime,
            caller: subject.caller.as_ref().into(),
            flow_id: subject.flow_id.as_ref().into(),
            account_id: subject.account_id.as_deref().map(Into::into),
            // Set by the flight that stores it (the shared tier's mark at its start).
            since: 0,
        };
        let entry = self.entry(
            &token,
            received,
            expires,
            expires_at,
            received_wall,
            subject,
        );
        Ok((entry, shared))
    }

    pub(super) fn entry(
        &self,
        token: &str,
        now: Instant,
        expires: Instant,
        expires_at: SystemTime,
        minted_at: SystemTime,
        subject: Subject,
    ) -> Arc<Entry> {
        let owner = Owner {
            caller: subject.caller,
            flow_id: subject.flow_id,
            account_id: subject.account_id,
            minted_at,
        };
        let serve_until = expires
            .checked_sub(self.settings.min_remaining)
            .unwrap_or(now)
            .max(now);
        Arc::new(Entry::new(
            token,
            Arc::clone(&self.identity_prefix),
            owner,
            expires,
            serve_until,
            expires_at,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Dropped;
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
            invalidate_rate: 10,
        };
        struct Shared(Arc<Fake>);
        impl Mint for Shared {
            fn mint(&self, form: String) -> MintFuture {
                self.0.mint(form)
            }
        }
        (
            Issuer::new(
                settings,
                Arc::new(Shared(Arc::clone(&fake))),
                test_guard(&metrics),
                metrics,
            ),
            fake,
        )
    }

    /// A guard that never gets in the way of these tests.
    fn test_guard(metrics: &Arc<Metrics>) -> Guard {
        let mut config = crate::config::Config::default();
        config.upstream.mint_rate = 100_000;
        config.upstream.max_concurrent = 4096;
        Guard::new(
            crate::upstream::GuardSettings::from_config(&config),
            Arc::clone(metrics),
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

    use crate::issuance::request::owned_form as req;

    /// `USER_REQ` for `caller`, now.
    async fn issue(issuer: &Arc<Issuer>, caller: &Arc<str>) -> Result<Issued, BrokerError> {
        issuer
            .issue(caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
    }

    /// `USER_REQ` for `caller`, in a task of its own.
    fn spawn_issue(
        issuer: &Arc<Issuer>,
        caller: &Arc<str>,
    ) -> tokio::task::JoinHandle<Result<Issued, BrokerError>> {
        let (issuer, caller) = (Arc::clone(issuer), Arc::clone(caller));
        tokio::spawn(async move { issue(&issuer, &caller).await })
    }

    fn body_json(issued: &Issued) -> serde_json::Value {
        serde_json::from_slice(&issued.tokens_body(Instant::now())).unwrap()
    }

    #[tokio::test]
    async fn second_identical_request_is_a_hit_with_the_same_token() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "checkout".into();
        let a = issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        let b = issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!(a.cache, CacheOutcome::Miss);
        assert_eq!(b.cache, CacheOutcome::Hit);
        assert_eq!(body_json(&a)["api_key"], body_json(&b)["api_key"]);
        assert_eq!(body_json(&b)["cache"], "hit");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_answer_carries_every_documented_field() {
        let (issuer, _) = issuer(fake(7200), Duration::from_secs(900));
        let a = issuer
            .issue(&"c".into(), &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
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
        let d: serde_json::Value = serde_json::from_slice(&a.dropin_body()).unwrap();
        assert_eq!(d["api_key"], key);
        assert_eq!(d["message"], crate::truora::MINTED_MESSAGE);
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
                let issued = issuer
                    .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
                    .await
                    .unwrap();
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
        f.fail = Some(UpstreamError::ServerError {
            status: 500,
            retry_after: None,
        });
        let (issuer, fake) = issuer(f, Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let issuer = Arc::clone(&issuer);
            let caller = Arc::clone(&caller);
            tasks.push(tokio::spawn(async move {
                issuer
                    .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
                    .await
                    .unwrap_err()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().code(), "upstream_unavailable");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap_err();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_naming_no_user_is_never_cached_or_shared() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let anon = "country=CO&flow_id=IPF1&redirect_url=https://a.example";
        let a = issuer
            .issue(&caller, &req(anon), &mut CacheOutcome::None)
            .await
            .unwrap();
        let b = issuer
            .issue(&caller, &req(anon), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!((a.cache, b.cache), (CacheOutcome::Miss, CacheOutcome::Miss));
        assert_ne!(body_json(&a)["api_key"], body_json(&b)["api_key"]);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        assert!(issuer.cache().is_empty());
    }

    #[tokio::test]
    async fn another_caller_does_not_get_the_same_token() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        issuer
            .issue(&"a".into(), &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        let b = issuer
            .issue(&"b".into(), &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!(b.cache, CacheOutcome::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_inside_min_remaining_is_not_served_from_cache() {
        // Lives 3 s; may be handed out while 2 s are left, so for about 1 s.
        let (issuer, fake) = issuer(fake(3), Duration::from_secs(2));
        let caller: Arc<str> = "c".into();
        issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        let hit = issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!(hit.cache, CacheOutcome::Hit);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let again = issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!(again.cache, CacheOutcome::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_living_less_than_min_remaining_is_handed_over_but_not_cached() {
        let (issuer, fake) = issuer(fake(60), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        let b = issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!(b.cache, CacheOutcome::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_already_dead_or_absurd_token_is_refused() {
        let (issuer, _) = issuer(fake(0), Duration::from_secs(1));
        let err = issuer
            .issue(&"c".into(), &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "upstream_bad_response");
        let (issuer, _) = issuer_with_lifetime(10 * 365 * 86400);
        let err = issuer
            .issue(&"c".into(), &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap_err();
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
                invalidate_rate: 10,
            },
            Arc::new(Opaque),
            test_guard(&metrics),
            metrics,
        );
        let a = issuer
            .issue(&"c".into(), &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert!(body_json(&a)["expires_in"].as_u64().unwrap() >= 7199);
    }

    #[tokio::test]
    async fn invalidation_makes_the_next_request_mint_again() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        let other = Filter::of(Some("other"), Some("IPF1"), None);
        let own = Filter::of(Some("c"), None, Some("u1"));
        let drop = |f| issuer.invalidate_everywhere(f, Reason::Caller);
        assert_eq!(drop(&other).await.unwrap().tokens, 0);
        let one = Dropped {
            tokens: 1,
            callers: 1,
        };
        assert_eq!(drop(&own).await.unwrap(), one);
        let again = issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!(again.cache, CacheOutcome::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_invalidated_while_its_mint_is_in_flight_is_not_cached() {
        let mut f = fake(7200);
        f.delay = Duration::from_millis(200);
        let (issuer, fake) = issuer(f, Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let in_flight = spawn_issue(&issuer, &caller);
        tokio::time::sleep(Duration::from_millis(50)).await;
        issuer
            .invalidate_everywhere(&Filter::of(Some("c"), None, Some("u1")), Reason::Caller)
            .await
            .unwrap();
        // The waiter still gets its token...
        assert_eq!(in_flight.await.unwrap().unwrap().cache, CacheOutcome::Miss);
        // ...but it was not kept: the next request mints again.
        let next = issue(&issuer, &caller).await.unwrap();
        assert_eq!(next.cache, CacheOutcome::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn another_callers_or_users_invalidation_does_not_keep_a_mint_out_of_the_cache() {
        let mut f = fake(7200);
        f.delay = Duration::from_millis(200);
        let (issuer, fake) = issuer(f, Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let in_flight = spawn_issue(&issuer, &caller);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for filter in [
            Filter::caller("other"),
            Filter::of(Some("c"), None, Some("someone-else")),
            Filter::of(None, Some("IPF2"), Some("u1")),
        ] {
            issuer
                .invalidate_everywhere(&filter, Reason::Caller)
                .await
                .unwrap();
        }
        in_flight.await.unwrap().unwrap();
        let next = issue(&issuer, &caller).await.unwrap();
        assert_eq!(next.cache, CacheOutcome::Hit);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn deletes_beyond_the_callers_rate_are_refused_and_others_are_not() {
        let (issuer, _) = issuer(fake(7200), Duration::from_secs(900));
        for _ in 0..10 {
            issuer
                .invalidate_for_caller("c", Some("IPF1"), None)
                .await
                .unwrap();
        }
        let err = issuer
            .invalidate_for_caller("c", Some("IPF1"), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalidation_rate_exceeded");
        assert!(err.retry_after().is_some());
        issuer
            .invalidate_for_caller("d", Some("IPF1"), None)
            .await
            .unwrap();
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
            tokio::spawn(async move {
                issuer
                    .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.abort();
        let later = issuer
            .issue(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!(later.cache, CacheOutcome::Miss);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    fn api_key(issued: &Issued) -> String {
        body_json(issued)["api_key"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn no_cache_mints_a_new_token_that_replaces_the_cached_one() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let old = api_key(&issue(&issuer, &caller).await.unwrap());
        let renewed = issuer
            .renew(&caller, &req(USER_REQ), &mut CacheOutcome::None)
            .await
            .unwrap();
        assert_eq!(renewed.cache, CacheOutcome::Miss);
        assert_eq!(body_json(&renewed)["cache"], "miss");
        assert_ne!(api_key(&renewed), old);
        let next = issue(&issuer, &caller).await.unwrap();
        assert_eq!(next.cache, CacheOutcome::Hit);
        assert_eq!(api_key(&next), api_key(&renewed));
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        let counted = issuer
            .metrics
            .cache_invalidations
            .with_label_values(&["no_cache"])
            .get();
        assert_eq!(counted, 1);
    }

    #[tokio::test]
    async fn no_cache_does_not_join_a_mint_already_in_the_air_and_later_requests_wait_on_it() {
        let mut f = fake(7200);
        f.delay = Duration::from_millis(200);
        let (issuer, fake) = issuer(f, Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let earlier = spawn_issue(&issuer, &caller);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let renewing = {
            let (issuer, caller) = (Arc::clone(&issuer), Arc::clone(&caller));
            tokio::spawn(async move {
                issuer
                    .renew(&caller, &req(USER_REQ), &mut CacheOutcome::None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut outcome = CacheOutcome::None;
        let later = issuer
            .issue(&caller, &req(USER_REQ), &mut outcome)
            .await
            .unwrap();
        assert_eq!(outcome, CacheOutcome::Coalesced);
        let (earlier, renewed) = (
            earlier.await.unwrap().unwrap(),
            renewing.await.unwrap().unwrap(),
        );
        assert_ne!(api_key(&earlier), api_key(&renewed));
        assert_eq!(api_key(&later), api_key(&renewed));
        // The earlier mint started before the renewal: it is not the one kept.
        assert_eq!(
            api_key(&issue(&issuer, &caller).await.unwrap()),
            api_key(&renewed)
        );
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_ended_process_drops_that_user_and_flow_for_every_caller_only() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let other_user = "country=CO&flow_id=IPF1&redirect_url=https://a.example&account_id=u2";
        let other_flow = "country=CO&flow_id=IPF2&redirect_url=https://a.example&account_id=u1";
        for caller in [&a, &b] {
            for form in [USER_REQ, other_user, other_flow] {
                issuer
                    .issue(caller, &req(form), &mut CacheOutcome::None)
                    .await
                    .unwrap();
            }
        }
        let dropped = issuer
            .process_ended(&ended(Some("IDP1"), None), Reason::Webhook)
            .await
            .unwrap();
        assert_eq!(
            dropped,
            Dropped {
                tokens: 2,
                callers: 2
            }
        );
        for caller in [&a, &b] {
            for (form, kept) in [(USER_REQ, false), (other_user, true), (other_flow, true)] {
                let again = issuer
                    .issue(caller, &req(form), &mut CacheOutcome::None)
                    .await
                    .unwrap();
                assert_eq!(again.cache == CacheOutcome::Hit, kept, "{caller} {form}");
            }
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 8);
        let counted = |r: &str| {
            issuer
                .metrics
                .cache_invalidations
                .with_label_values(&[r])
                .get()
        };
        assert_eq!(
            (counted("webhook"), counted("result"), counted("caller")),
            (1, 0, 0)
        );
    }

    /// The end of user u1's process in flow IPF1.
    fn ended(process_id: Option<&str>, at: Option<SystemTime>) -> crate::issuance::Ended<'_> {
        crate::issuance::Ended {
            flow_id: "IPF1",
            account_id: "u1",
            process_id,
            at,
        }
    }

    #[tokio::test]
    async fn a_process_heard_of_again_does_not_drop_the_new_process_token() {
        let (issuer, fake) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        let old = api_key(&issue(&issuer, &caller).await.unwrap());
        let first = issuer
            .process_ended(&ended(Some("IDP7"), None), Reason::Webhook)
            .await
            .unwrap();
        assert_eq!(first.tokens, 1);
        let new = issue(&issuer, &caller).await.unwrap();
        assert_eq!(new.cache, CacheOutcome::Miss);
        assert_ne!(api_key(&new), old);
        // A retried delivery, or the result read afterwards: nothing more goes.
        for reason in [Reason::Webhook, Reason::Result] {
            let again = issuer
                .process_ended(&ended(Some("IDP7"), None), reason)
                .await
                .unwrap();
            assert_eq!(again, Dropped::default());
        }
        let still = issue(&issuer, &caller).await.unwrap();
        assert_eq!(
            (still.cache, api_key(&still)),
            (CacheOutcome::Hit, api_key(&new))
        );
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_process_that_ended_drops_only_tokens_minted_before_it_ended() {
        let (issuer, _) = issuer(fake(7200), Duration::from_secs(900));
        let caller: Arc<str> = "c".into();
        issue(&issuer, &caller).await.unwrap();
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        let before = issuer
            .process_ended(&ended(None, Some(an_hour_ago)), Reason::Webhook)
            .await
            .unwrap();
        assert_eq!(
            before.tokens, 0,
            "a token minted after the end is a new process's"
        );
        assert_eq!(
            issue(&issuer, &caller).await.unwrap().cache,
            CacheOutcome::Hit
        );
        let now = issuer
            .process_ended(&ended(None, Some(SystemTime::now())), Reason::Webhook)
            .await
            .unwrap();
        assert_eq!(now.tokens, 1);
    }
}
