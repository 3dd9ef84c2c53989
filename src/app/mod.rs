//! The composition root: the one room that knows every other. It reads and checks the
//! configuration and the secrets ([`load`]), builds the broker from them ([`Broker`]: metrics,
//! upstream client and guard, the Redis tier, the issuance core, callers, pass-through, the two
//! listeners), re-reads the configuration into a running broker ([`reload`]), and holds the
//! command line ([`cli`]), the process around a running broker ([`process`]: hardening, signals)
//! and the demo ([`demo`]).
//!
//! Start-up fails with a typed [`StartError`]: a bad configuration is reported before any
//! socket is bound (the command line exits 64 for it), a listener that cannot be bound after
//! (exit 1).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{Audit, AuditStartError, TagKey};
use crate::auth::{Callers, JwksError, JwksSource, Refresher, ServiceAccounts};
use crate::cache::shared::{SharedSecrets, SharedTier, TierError};
use crate::config::{AuditConfig, Config, ConfigError, JWKS_MIN_INTERVAL};
use crate::issuance::{fleet_limits, Issuer, IssuerSettings};
use crate::metrics::Metrics;
use crate::passthrough::{Forwarder, Passthrough, ResultCache};
use crate::secret::MasterKey;
use crate::server::{tls, Admin, ApiState, BindError, Listeners, SharedTls, WebhookListener};
use crate::telemetry::{self, SpanMetrics, Telemetry, TelemetryError};
use crate::upstream::{pooled_client, ClientError, Guard, GuardSettings, TruoraClient};
use crate::webhooks::{self, Webhooks};

pub mod cli;
pub mod demo;
pub mod process;
pub mod reload;
pub mod watch;

pub use reload::Reloader;

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration, a secret it names, or a file it points at cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A client to Truora could not be built.
    #[error(transparent)]
    Upstream(#[from] ClientError),
    /// The Redis tier could not be set up.
    #[error(transparent)]
    SharedCache(#[from] TierError),
    /// `auth.kubernetes.jwks_url` gave no usable key set at start.
    #[error("auth.kubernetes.jwks_url: {0}")]
    Jwks(#[from] JwksError),
    /// The series could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The trace exporter could not be set up.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The audit trail could not be set up (never because of its file: the broker starts
    /// without it, and says why).
    #[error(transparent)]
    Audit(#[from] AuditStartError),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The demo's sandbox Truora could not start.
    #[error("cannot start the sandbox upstream: {0}")]
    Sandbox(#[source] io::Error),
    /// The OS random source failed (the demo's random master key).
    #[error("the OS random source failed")]
    Random,
}

impl StartError {
    /// True for what a better configuration would fix (exit 64), false for run-time failures.
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_))
    }
}

/// A configuration file and everything it names, read and checked: what `serve`,
/// `check-config` and a reload start from.
pub struct Loaded {
    /// The validated file.
    pub config: Config,
    /// The master key.
    pub key: MasterKey,
    /// What is usable but unwise, for the operator (secret files other users can read).
    pub warnings: Vec<String>,
}

/// Reads and checks `path` whole, as `serve` does before binding anything: the file, every
/// rule, the master key, the callers (pass-through patterns included), with `[cache.shared]`
/// its secrets, and with `[auth.kubernetes]` its `jwks_file` or its `ca_file` (`jwks_url` is
/// fetched by `serve` only).
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    loaded(Config::load(path)?)
}

/// [`load`] of a file already read and validated: the master key, what only the runtime types
/// check, and the warnings.
pub fn loaded(config: Config) -> Result<Loaded, ConfigError> {
    let key = config.master_key()?;
    check(&config)?;
    let warnings = secret_files_others_can_read(&config);
    Ok(Loaded {
        config,
        key,
        warnings,
    })
}

/// One warning per secret file that users other than the broker's own can read (mode bits for
/// group or others): the broker still starts, but the file should be `0600` (or `0400`; on
/// Kubernetes, `defaultMode: 0400` on the Secret's volume).
pub fn secret_files_others_can_read(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    for file in watch::secret_files(config).iter().filter(|f| f.secret) {
        if let Some(mode) = readable_by_others(&file.path) {
            warnings.push(format!(
                "{}: {} is readable by other users (mode {mode:o}); make it 0600 or 0400",
                file.key,
                file.path.display()
            ));
        }
    }
    warnings
}

/// The permission bits of `path` (its target, for a link) when group or others may read it.
fn readable_by_others(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o044 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// The user tags' key of `[audit]`, read from `hmac_key_file`; `None` without one (a key is
/// then made at start).
pub fn audit_key(config: &AuditConfig) -> Result<Option<TagKey>, ConfigError> {
    config
        .hmac_key_file
        .as_deref()
        .map(|path| {
            TagKey::load(path)
                .map_err(|e| ConfigError::invalid("audit.hmac_key_file", e.to_string()))
        })
        .transpose()
}

/// What only the owners of the runtime types can check of a validated config.
fn check(config: &Config) -> Result<(), ConfigError> {
    audit_key(&config.audit)?;
    Callers::from_config(&config.clients)?;
    if let Some(shared) = &config.cache.shared {
        SharedSecrets::load(shared)?;
    }
    if let Some(k) = &config.auth.kubernetes {
        ServiceAccounts::from_config(k)?;
        JwksSource::from_config(k)?;
    }
    if let Some(w) = &config.webhooks {
        webhooks::Settings::from_config(w)?;
        if let Some(t) = &w.tls {
            tls::webhook_config(t)?;
        }
    }
    Ok(())
}

/// The verifier of `[auth.kubernetes]`, its keys read (`jwks_file`) or fetched (`jwks_url`:
/// no key set, no start), and for `jwks_url` the task that keeps them fresh.
async fn service_accounts(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(Option<Arc<ServiceAccounts>>, Option<Refresher>), StartError> {
    let Some(k) = &config.auth.kubernetes else {
        return Ok((None, None));
    };
    let verifier = Arc::new(ServiceAccounts::from_config(k)?);
    let refresher = match JwksSource::from_config(k)? {
        Some(source) => {
            let fetched = source.fetch().await;
            let outcome = if fetched.is_ok() { "ok" } else { "error" };
            metrics.jwks_refreshes.with_label_values(&[outcome]).inc();
            let keys = fetched?;
            tracing::info!(kids = ?keys.kids(), "service-account signing keys fetched");
            verifier.set_keys(keys, metrics, "url");
            Some(Refresher::spawn(
                source,
                Arc::clone(&verifier),
                k.jwks_refresh,
                JWKS_MIN_INTERVAL,
                Arc::clone(metrics),
            ))
        }
        None => {
            metrics
                .jwks_keys
                .with_label_values(&["file"])
                .set(i64::try_from(verifier.keys().len()).unwrap_or(i64::MAX));
            None
        }
    };
    Ok((Some(verifier), refresher))
}

/// A broker with both listeners bound, ready to run.
pub struct Broker {
    state: Arc<ApiState>,
    admin: Arc<Admin>,
    listeners: Listeners,
    client: Arc<TruoraClient>,
    tls: Option<SharedTls>,
    /// The webhook receiver and its listener's TLS, with `[webhooks]`, for reloads.
    webhooks: Option<(Arc<Webhooks>, Option<SharedTls>)>,
    /// Keeps `jwks_url`'s keys fresh while the broker runs; stops with it.
    refresher: Option<Refresher>,
    /// The trace pipeline, with `[telemetry]`: flushed and stopped after the drain.
    telemetry: Option<Arc<Telemetry>>,
    /// The secret-file watcher's series (exported whether it watches or not).
    watch_metrics: Arc<watch::WatchMetrics>,
}

impl Broker {
    /// Assembles a broker from a validated config and binds its listeners.
    pub async fn from_config(config: &Config, key: MasterKey) -> Result<Self, StartError> {
        let registry = prometheus::Registry::new();
        let metrics = Arc::new(Metrics::new(registry.clone())?);
        let tag_key = match audit_key(&config.audit)? {
            Some(key) => key,
            None => TagKey::generate().map_err(|_| StartError::Random)?,
        };
        // Opened before anything is bound; a file that cannot be written does not stop the
        // start (its series and logs say why).
        let audit = Audit::start(&config.audit, tag_key, &registry).await?;
        let watch_metrics = watch::WatchMetrics::new(&registry)?;
        let tls = match &config.server.tls {
            Some(t) => Some(Arc::new(arc_swap::ArcSwap::new(tls::server_config(t)?))),
            None => None,
        };
        let spans = SpanMetrics::register(&registry)?;
        let telemetry = Telemetry::start(
            &config.telemetry,
            pooled_client(telemetry::export::EXPORT_TIMEOUT)?,
            spans,
        )?
        .map(Arc::new);
        let propagate = telemetry.as_ref().is_some_and(|t| t.propagates_upstream());
        let u = &config.upstream;
        let client = Arc::new(
            TruoraClient::new(&u.account_url, key, u.connect_timeout, u.timeout)?
                .with_trace_propagation(propagate),
        );
        let guard = Guard::new(GuardSettings::from_config(config), Arc::clone(&metrics));
        let shared = match &config.cache.shared {
            Some(shared) => Some(SharedTier::new(
                shared,
                SharedSecrets::load(shared)?,
                &registry,
            )?),
            None => None,
        };
        // With `fleet_limits`, the mint budgets and the throttle window are the fleet's.
        if let Some(limits) = shared.as_ref().and_then(fleet_limits) {
            guard.share_limits(limits, &registry)?;
        }
        let issuer = Issuer::with_audit(
            IssuerSettings {
                min_remaining: config.cache.min_remaining,
                max_entries: config.cache.max_entries,
                web_url: u.web_url.clone(),
                array_encoding: u.array_encoding,
                invalidate_rate: config.cache.invalidate_rate,
            },
            Arc::new(Arc::clone(&client)),
            guard,
            Arc::clone(&metrics),
            shared,
            audit,
        );
        let (verifier, refresher) = service_accounts(config, &metrics).await?;
        let callers = Callers::from_config(&config.clients)?.with_service_accounts(verifier);
        metrics.register_callers(callers.iter().map(|c| &c.id));
        // Every pass-through pattern's series exist from the start, at zero.
        for pattern in callers.iter().flat_map(|c| c.passthrough.iter()) {
            metrics
                .passthrough_duration
                .with_label_values(&[pattern.text()]);
        }
        let forwarder = Forwarder::new(
            &u.identity_url,
            &u.account_url,
            client.key_handle(),
            u.connect_timeout,
            u.passthrough_timeout,
            u.passthrough_max_body_bytes,
        )?
        .with_trace_propagation(propagate);
        let c = &config.cache;
        let results =
            (!c.result_ttl.is_zero()).then(|| ResultCache::new(c.result_ttl, c.result_max_bytes));
        let mut state = ApiState::new(issuer, callers, Arc::clone(&metrics));
        state.max_body_bytes = config.server.max_body_bytes;
        state.body_read_timeout = config.server.body_read_timeout;
        state.telemetry = telemetry.clone();
        state.passthrough = Some(Passthrough::new(
            forwarder,
            results,
            Arc::clone(&state.issuer),
            metrics,
        ));
        let state = Arc::new(state);
        let webhooks = match &config.webhooks {
            Some(w) => {
                let receiver = Arc::new(Webhooks::new(
                    webhooks::Settings::from_config(w)?,
                    Arc::clone(&state.issuer),
                    Arc::clone(&state.metrics),
                ));
                let tls = match &w.tls {
                    Some(t) => Some(Arc::new(arc_swap::ArcSwap::new(tls::webhook_config(t)?))),
                    None => None,
                };
                Some((w, receiver, tls))
            }
            None => None,
        };
        let mut listeners = Listeners::bind(&config.server, tls.clone()).await?;
        if let Some((w, receiver, tls)) = &webhooks {
            let listener = WebhookListener::bind(w, tls.clone(), Arc::clone(receiver)).await?;
            listeners.add_webhooks(listener);
        }
        Ok(Self {
            admin: Arc::new(Admin::new(Arc::clone(&state))),
            state,
            listeners,
            client,
            tls,
            webhooks: webhooks.map(|(_, receiver, tls)| (receiver, tls)),
            refresher,
            telemetry,
            watch_metrics,
        })
    }

    /// Lets SIGHUP and `POST /admin/reload` re-read `path` (the file this broker was built from,
    /// as `config`), and with `server.watch_files` a change of a secret or certificate file.
    pub fn reload_from(&self, path: PathBuf, config: Config) -> Option<Arc<Reloader>> {
        let watch_files = config.server.watch_files;
        let reloader = Arc::new(Reloader::new(
            path,
            config,
            Arc::clone(&self.state),
            Arc::clone(&self.client),
            self.tls.clone(),
            self.webhooks.clone(),
            Arc::clone(&self.watch_metrics),
        ));
        if !self
            .admin
            .set_reload(Arc::clone(&reloader) as Arc<dyn crate::server::Reload>)
        {
            return None;
        }
        if watch_files {
            reloader.watch_files();
        }
        Some(reloader)
    }

    /// The caller API's state, for tests.
    pub fn state(&self) -> &Arc<ApiState> {
        &self.state
    }

    /// The caller listener's address (useful with port 0); never fails once bound.
    pub fn caller_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.listeners.caller_addr())
    }

    /// The admin listener's address; never fails once bound.
    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.listeners.admin_addr())
    }

    /// The webhook listener's address, with `[webhooks]`.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.listeners.webhook_addr()
    }

    /// Both addresses: the caller listener's and the admin listener's.
    pub fn addresses(&self) -> (SocketAddr, SocketAddr) {
        (self.listeners.caller_addr(), self.listeners.admin_addr())
    }

    /// Serves until `shutdown` completes, then drains (see [`Listeners::run`]), writes the
    /// audit events still queued and, with tracing, exports the last spans, for at most
    /// [`telemetry::FLUSH_LIMIT`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let _refresher = self.refresher;
        let audit = Arc::clone(self.state.issuer.audit());
        self.listeners.run(self.state, self.admin, shutdown).await;
        if let Some(telemetry) = self.telemetry {
            telemetry.shutdown(telemetry::FLUSH_LIMIT).await;
        }
        let _ = tokio::task::spawn_blocking(move || audit.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_sentinel_password_and_previous_keys_are_secret_files_too() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "x").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            path
        };
        let text = format!(
            "[cache.shared]\nmode = \"sentinel\"\nnodes = [\"redis://s:26379\"]\nsentinel_master = \"m\"\n\
             sentinel_password_file = \"{}\"\nprevious_encryption_key_files = [\"{}\"]\n",
            open("sentinel-pw").display(),
            open("old-key").display()
        );
        let config = Config::parse(&text).unwrap();
        let warnings = secret_files_others_can_read(&config).join("\n");
        assert!(
            warnings.contains("cache.shared.sentinel_password_file"),
            "{warnings}"
        );
        assert!(
            warnings.contains("cache.shared.previous_encryption_key_files"),
            "{warnings}"
        );
    }
}
