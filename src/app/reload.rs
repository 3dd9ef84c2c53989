//! Rotation without restart: SIGHUP and `POST /admin/reload` re-read the config file and the
//! master key file, validate them whole, and swap in what can change while running.
//!
//! What a reload applies: the `[[clients]]` (new callers, changed secrets, certificates, service
//! accounts, SPIFFE IDs, policies and budgets; a removed caller is refused from the next request
//! on and its cached tokens are dropped at once), the master key (from `upstream.api_key_file`,
//! or `TRUORA_API_KEY`), the TLS certificate, key and client CA files, and `[auth.kubernetes]`'s
//! `issuer`, `audiences` and `jwks_file` (re-read), and `[webhooks]`' path, bearer secret,
//! signing secret (re-read), claim names, events, `max_age` and TLS files. Every remembered
//! service-account token is
//! forgotten, so the next request of each caller is checked afresh. Any other change (addresses,
//! timeouts, cache sizes, turning `[auth.kubernetes]` or `[webhooks]` on or off, its `jwks_url`
//! and what goes with it, the webhook listener's address, cap and turning its TLS on or off)
//! needs a restart: the reload says which sections, and keeps running with the old
//! values.
//!
//! A bad new config is refused as a whole: the old one stays in force, the failure is logged and
//! counted, and the caller of `/admin/reload` gets the reason. Requests in flight finish with
//! the settings they started with, since each took its own snapshot.
//!
//! Files are read on the blocking pool, never on a runtime worker, and one reload runs at a
//! time from reading to applying, so two overlapping reloads apply in the order they read: an
//! older file never overwrites a newer one. A revoked caller's tokens are dropped everywhere
//! (this replica, Redis, the other replicas) and so are its cached pass-through results.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use tokio::sync::{Mutex, Notify};

use super::watch::{self, secret_files, ContentDigest, SecretFile, WatchMetrics, Watcher};
use super::{loaded, Loaded};
use crate::audit::Event;
use crate::auth::{Callers, ServiceAccounts};
use crate::cache::{Filter, Reason};
use crate::config::{AuditConfig, AuthConfig, Config, ConfigError, WebhooksConfig};
use crate::server::{tls, ApiState, Reload, SharedTls};
use crate::upstream::guard::caller_rates;
use crate::upstream::TruoraClient;
use crate::webhooks::{self, Webhooks};

/// What started a reload, as the audit trail and the logs say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Sighup,
    /// `POST /admin/reload`.
    Admin,
    /// A watched secret or certificate file changed (`server.watch_files`).
    Watch,
}

impl Trigger {
    /// `sighup`, `admin` or `watch`.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Sighup => "sighup",
            Trigger::Admin => "admin",
            Trigger::Watch => "watch",
        }
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Callers configured now.
    pub callers: usize,
    /// Callers removed, whose cached tokens were dropped.
    pub revoked: Vec<String>,
    /// Sections that changed but only take effect at the next start.
    pub restart_required: Vec<&'static str>,
    /// The fingerprint of the master key now in use ([`crate::secret::MasterKey::fingerprint`]).
    pub key_fingerprint: String,
}

/// Re-reads one config file into a running broker.
pub struct Reloader {
    path: PathBuf,
    running: Mutex<Config>,
    state: Arc<ApiState>,
    client: Arc<TruoraClient>,
    tls: Option<SharedTls>,
    /// The webhook receiver and its listener's TLS, with `[webhooks]`.
    webhooks: Option<(Arc<Webhooks>, Option<SharedTls>)>,
    /// The digest of each secret file's content in force: read before the file was loaded, so
    /// that a change racing a reload is seen again rather than taken as applied.
    in_force: std::sync::Mutex<HashMap<PathBuf, ContentDigest>>,
    /// With `server.watch_files`: what keeps the watch alive.
    watcher: OnceLock<Watcher>,
    /// Wakes the watcher: its events, and every reload (so that it recounts what is pending).
    poke: Arc<Notify>,
    watch_metrics: Arc<WatchMetrics>,
}

impl Reloader {
    /// A reloader for the broker built from `config`, read from `path`.
    pub fn new(
        path: PathBuf,
        config: Config,
        state: Arc<ApiState>,
        client: Arc<TruoraClient>,
        tls: Option<SharedTls>,
        webhooks: Option<(Arc<Webhooks>, Option<SharedTls>)>,
        watch_metrics: Arc<WatchMetrics>,
    ) -> Self {
        state.metrics.config_last_reload_success.set(unix_now());
        // What the broker read at start (a change in the moment since is taken as read: the
        // next one is seen).
        let in_force = watch::digests(&secret_files(&config));
        Self {
            path,
            running: Mutex::new(config),
            state,
            client,
            tls,
            webhooks,
            in_force: std::sync::Mutex::new(in_force),
            watcher: OnceLock::new(),
            poke: Arc::new(Notify::new()),
            watch_metrics,
        }
    }

    /// Watches the secret and certificate files and applies their changes (see
    /// [`super::watch`]); once.
    pub fn watch_files(self: &Arc<Self>) {
        if self.watcher.get().is_some() {
            return;
        }
        if let Some(watcher) = watch::watcher(&self.poke) {
            if self.watcher.set(watcher).is_ok() {
                watch::spawn(self, Arc::clone(&self.poke));
            }
        }
    }

    /// The watcher, when files are watched.
    pub(super) fn watcher(&self) -> Option<&Watcher> {
        self.watcher.get()
    }

    /// The watcher's series.
    pub(super) fn watch_metrics(&self) -> &WatchMetrics {
        &self.watch_metrics
    }

    /// The secret files of the running configuration.
    pub(super) async fn secret_files(&self) -> Vec<SecretFile> {
        secret_files(&*self.running.lock().await)
    }

    /// The digests of the secret files' contents in force.
    pub(super) fn in_force(&self) -> HashMap<PathBuf, ContentDigest> {
        self.in_force
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads as SIGHUP does, logs, counts and audits the outcome.
    pub async fn reload(&self) -> Result<Reloaded, ConfigError> {
        self.reload_by(Trigger::Sighup, &[]).await
    }

    /// Reloads for `trigger` (with `files`, the config keys of the watched files whose change
    /// started it), logs, counts and audits the outcome.
    pub async fn reload_by(
        &self,
        trigger: Trigger,
        files: &[&str],
    ) -> Result<Reloaded, ConfigError> {
        // Boxed: the reading, checking and revoking make a deep future, and every caller would
        // carry its layout.
        let outcome = Box::pin(self.try_reload()).await;
        // The watcher recounts what is pending against what is in force now.
        self.poke.notify_one();
        let metrics = &self.state.metrics;
        let audit = self.state.issuer.audit();
        let error = outcome.as_ref().err().map(ToString::to_string);
        let done = outcome.as_ref().ok();
        audit.record(&Event::Reload {
            trigger: trigger.name(),
            result: if done.is_some() { "applied" } else { "refused" },
            files,
            callers: done.map(|d| d.callers),
            revoked: done.map_or(&[], |d| d.revoked.as_slice()),
            restart_required: done.map_or(&[], |d| d.restart_required.as_slice()),
            key_fingerprint: done.map(|d| d.key_fingerprint.as_str()),
            tag_key: audit.key().id(),
            error: error.as_deref(),
        });
        match &outcome {
            Ok(done) => {
                metrics.config_reloads.with_label_values(&["ok"]).inc();
                metrics.config_last_reload_success.set(unix_now());
                tracing::info!(
                    trigger = trigger.name(),
                    callers = done.callers,
                    revoked = ?done.revoked,
                    restart_required = ?done.restart_required,
                    key = %done.key_fingerprint,
                    "configuration reloaded"
                );
            }
            Err(e) => {
                metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    trigger = trigger.name(),
                    files = ?files,
                    "configuration reload refused, the running one is kept: {e}"
                );
            }
        }
        outcome
    }

    /// [`Reloader::reload`] as the status and JSON body of `POST /admin/reload`.
    async fn answer(&self) -> (StatusCode, String) {
        match self.reload_by(Trigger::Admin, &[]).await {
            Ok(done) => (
                StatusCode::OK,
                serde_json::json!({
                    "reloaded": true,
                    "callers": done.callers,
                    "revoked": done.revoked,
                    "restart_required": done.restart_required,
                    "key_fingerprint": done.key_fingerprint,
                })
                .to_string(),
            ),
            Err(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({
                    "reloaded": false,
                    "error": "bad_config",
                    "message": e.to_string(),
                })
                .to_string(),
            ),
        }
    }

    async fn try_reload(&self) -> Result<Reloaded, ConfigError> {
        // One reload at a time, from reading the file to applying it.
        let mut running = self.running.lock().await;
        // Everything is read and checked before anything is applied, off the runtime's workers.
        let path = self.path.clone();
        let with_tls = self.tls.is_some();
        let verifier = self.state.callers.load().service_accounts().cloned();
        let with_verifier = verifier.is_some();
        let running_auth = running.auth.clone();
        let running_hooks = running.webhooks.clone();
        let hooks_tls = self.webhooks.as_ref().is_some_and(|(_, t)| t.is_some());
        let read = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            // Before the files are read: a change racing this reload is then seen again.
            let digests = watch::digests(secret_files(&config).iter().filter(|f| f.reloadable));
            let Loaded {
                config,
                key,
                warnings,
            } = loaded(config)?;
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            let tls = match (&config.server.tls, with_tls) {
                (Some(t), true) => Some(tls::server_config(t)?),
                _ => None,
            };
            let auth = match (&config.auth.kubernetes, with_verifier) {
                (Some(k), true) if !auth_needs_restart(&running_auth, &config.auth) => {
                    Some(ServiceAccounts::prepare(k)?)
                }
                _ => None,
            };
            let hooks = match &config.webhooks {
                Some(w) if !webhooks_need_restart(running_hooks.as_ref(), Some(w)) => Some((
                    webhooks::Settings::from_config(w)?,
                    match (&w.tls, hooks_tls) {
                        (Some(t), true) => Some(tls::webhook_config(t)?),
                        _ => None,
                    },
                )),
                _ => None,
            };
            let tag_key = super::audit_key(&config.audit)?;
            Ok::<_, ConfigError>((config, key, tls, auth, hooks, tag_key, digests))
        });
        let (new, key, tls, auth, hooks, tag_key, digests) =
            read.await.map_err(|_| ConfigError::Read {
                path: self.path.clone(),
                reason: "the reading task stopped".into(),
            })??;
        let callers = Callers::from_config(&new.clients)?.with_service_accounts(verifier.clone());
        let restart_required = restart_required(&running, &new);

        let key_fingerprint = key.fingerprint();
        self.client.set_key(key);
        if let Some(tag_key) = tag_key {
            let audit = self.state.issuer.audit();
            if tag_key.id() != audit.key().id() {
                tracing::info!(
                    from = audit.key().id(),
                    to = tag_key.id(),
                    "audit.hmac_key_file: user tags are made with a new key from now on"
                );
            }
            audit.set_key(tag_key);
        }
        if let (Some(slot), Some(tls)) = (&self.tls, tls) {
            slot.store(tls);
        }
        if let (Some((receiver, slot)), Some((settings, tls))) = (&self.webhooks, hooks) {
            receiver.swap(settings);
            if let (Some(slot), Some(tls)) = (slot, tls) {
                slot.store(tls);
            }
        }
        let kept: HashSet<&str> = new.clients.iter().map(|c| c.id.as_str()).collect();
        let revoked: Vec<String> = running
            .clients
            .iter()
            .filter(|c| !kept.contains(c.id.as_str()))
            .map(|c| c.id.clone())
            .collect();
        self.state
            .metrics
            .register_callers(callers.iter().map(|c| &c.id));
        self.state.callers.store(Arc::new(callers));
        if let Some(verifier) = &verifier {
            match auth {
                Some(prepared) => verifier.apply(prepared, &self.state.metrics),
                None => verifier.forget_all(),
            }
        }
        self.state
            .issuer
            .guard()
            .set_caller_rates(&caller_rates(&new));
        for id in &revoked {
            self.revoke(id).await;
        }
        {
            // Files a reload read are in force as read; those only a restart reads keep the
            // digest of what the broker started with.
            let mut in_force = self.in_force.lock().unwrap_or_else(|p| p.into_inner());
            let mut now = digests;
            for f in secret_files(&new).iter().filter(|f| !f.reloadable) {
                if let Some(d) = in_force.get(&f.path) {
                    now.insert(f.path.clone(), *d);
                }
            }
            *in_force = now;
        }
        let callers = new.clients.len();
        *running = new;
        Ok(Reloaded {
            callers,
            revoked,
            restart_required,
            key_fingerprint,
        })
    }
}

impl Reloader {
    /// Forgets a removed caller's tokens here, in Redis and on every replica, and its cached
    /// pass-through results.
    async fn revoke(&self, id: &str) {
        if let Some(passthrough) = &self.state.passthrough {
            passthrough.forget_caller(id);
        }
        let issuer = &self.state.issuer;
        let dropped = issuer
            .invalidate_everywhere(&Filter::caller(id), Reason::Revoked)
            .await;
        issuer.audit().record(&Event::Revocation {
            caller: id,
            invalidated: dropped.as_ref().ok().map(|d| d.tokens),
            everywhere: dropped.is_ok(),
        });
        if dropped.is_err() {
            tracing::warn!(
                caller = %id,
                "caller revoked; its tokens are dropped here, but the shared cache could not be reached: other replicas refuse the caller from their next reload, and its values in Redis expire with the tokens"
            );
        }
    }
}

impl Reload for Reloader {
    fn reload_answer(&self) -> Pin<Box<dyn Future<Output = (StatusCode, String)> + Send + '_>> {
        Box::pin(self.answer())
    }
}

/// The sections whose change only a restart applies.
fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
        serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
    }
    let mut changed = Vec::new();
    let (mut old_server, mut new_server) = (old.server.clone(), new.server.clone());
    // Certificate files are re-read by the reload itself; turning TLS on or off is not.
    if old_server.tls.is_some() == new_server.tls.is_some() {
        old_server.tls = None;
        new_server.tls = None;
    }
    if !same(&old_server, &new_server) {
        changed.push("server");
    }
    let (mut old_up, mut new_up) = (old.upstream.clone(), new.upstream.clone());
    old_up.api_key_file = None;
    new_up.api_key_file = None;
    if !same(&old_up, &new_up) {
        changed.push("upstream");
    }
    if !same(&old.cache, &new.cache) {
        changed.push("cache");
    }
    if auth_needs_restart(&old.auth, &new.auth) {
        changed.push("auth");
    }
    if webhooks_need_restart(old.webhooks.as_ref(), new.webhooks.as_ref()) {
        changed.push("webhooks");
    }
    changed.extend((!same(&old.telemetry, &new.telemetry)).then_some("telemetry"));
    if audit_needs_restart(&old.audit, &new.audit) {
        changed.push("audit");
    }
    changed
}

/// Whether `[audit]` changed beyond what a reload applies (the key, re-read from
/// `hmac_key_file`): its file, `on_failure`, `include_hits`, or the key file taken away (the
/// running key is kept).
fn audit_needs_restart(old: &AuditConfig, new: &AuditConfig) -> bool {
    (&old.file, old.on_failure, old.include_hits) != (&new.file, new.on_failure, new.include_hits)
        || (old.hmac_key_file.is_some() && new.hmac_key_file.is_none())
}

/// Whether `[webhooks]` changed beyond what a reload applies: turned on or off, or its
/// listener's address, cap, or TLS turned on or off.
fn webhooks_need_restart(old: Option<&WebhooksConfig>, new: Option<&WebhooksConfig>) -> bool {
    match (old, new) {
        (None, None) => false,
        (Some(old), Some(new)) => {
            let listener = |w: &WebhooksConfig| (w.listen, w.max_connections, w.tls.is_some());
            listener(old) != listener(new)
        }
        _ => true,
    }
}

/// Whether `[auth]` changed beyond what a reload applies (`issuer`, `audiences`, `jwks_file`).
fn auth_needs_restart(old: &AuthConfig, new: &AuthConfig) -> bool {
    match (&old.kubernetes, &new.kubernetes) {
        (None, None) => false,
        (Some(old), Some(new)) => {
            let by_url = |k: &crate::config::KubernetesConfig| {
                k.jwks_url.as_ref().map(|url| {
                    (
                        url.clone(),
                        k.ca_file.clone(),
                        k.jwks_token_file.clone(),
                        k.jwks_refresh,
                    )
                })
            };
            by_url(old) != by_url(new)
        }
        _ => true,
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
