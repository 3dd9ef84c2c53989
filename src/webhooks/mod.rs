//! Truora's webhooks: how the broker learns that a verification process ended, so that the
//! token of that process is never handed out again. One token is one process: reuse is right
//! while the process is open, wrong once it has ended.
//!
//! A delivery is checked in this order, and nothing is dropped unless every check passes:
//! 1. its bearer secret (`webhooks.token_sha256`), before its body is read
//!    ([`Webhooks::authenticate`]);
//! 2. its body, read by [`delivery::read`]: a compact JWT, its HS256 signature when a signing
//!    secret is configured, its `iat` within `webhooks.max_age`, its event and claims;
//! 3. an ended process (succeeded or failed) drops every caller's tokens of that user and flow,
//!    here, in Redis and on every replica ([`Webhooks::take`]); created and other events change
//!    nothing. Taking the same delivery twice drops nothing more.
//!
//! The HTTP side (`crate::server::webhook`) carries deliveries here from the webhook listener;
//! every delivery is counted in `token_broker_webhook_deliveries_total{event,outcome}`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::cache::Reason;
use crate::config::{ConfigError, WebhooksConfig};
use crate::error::{BrokerError, WebhookError};
use crate::issuance::{Ended, Issuer};
use crate::metrics::Metrics;
use crate::secret::SecretDigest;

pub mod delivery;

pub use delivery::{Delivery, Event, Rules};

/// Largest delivery body read; a longer one is refused (413) unread.
pub const MAX_DELIVERY_BYTES: usize = 64 * 1024;

/// What a reload may change of `[webhooks]`: the path, the bearer secret and how deliveries
/// are read (signing secret, claim names, events, `max_age`).
pub struct Settings {
    /// `webhooks.path`.
    pub path: String,
    token: SecretDigest,
    rules: Rules,
}

impl Settings {
    /// The settings of a validated `[webhooks]`, its signing secret read from its file now.
    pub fn from_config(config: &WebhooksConfig) -> Result<Self, ConfigError> {
        let secret = match &config.signing_secret_file {
            None => None,
            Some(path) => {
                let raw = Zeroizing::new(std::fs::read(path).map_err(|e| {
                    ConfigError::invalid(
                        "webhooks.signing_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?);
                let secret = Zeroizing::new(raw.trim_ascii().to_vec());
                if secret.is_empty() {
                    return Err(ConfigError::invalid(
                        "webhooks.signing_secret_file",
                        format!("{} is empty", path.display()),
                    ));
                }
                Some(secret)
            }
        };
        let token = SecretDigest::from_hex(&config.token_sha256).ok_or_else(|| {
            ConfigError::invalid("webhooks.token_sha256", "must be 64 hex digits")
        })?;
        Ok(Self {
            path: config.path.clone(),
            token,
            rules: Rules::new(config, secret.as_deref().map(Vec::as_slice)),
        })
    }
}

/// What a delivery that was taken did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Its event.
    pub event: Event,
    /// Tokens dropped (0 for an event that ends nothing, or a repeated delivery).
    pub invalidated: u64,
}

/// The receiver: checks deliveries and drops the tokens of ended processes.
pub struct Webhooks {
    settings: ArcSwap<Settings>,
    issuer: Arc<Issuer>,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// A receiver with `settings`, dropping tokens through `issuer`.
    pub fn new(settings: Settings, issuer: Arc<Issuer>, metrics: Arc<Metrics>) -> Self {
        // Every outcome an alert or a rate may name exists from the start, at zero.
        for event in Event::LABELS.iter().chain(&["unknown"]) {
            for outcome in ["taken", "ignored", "unauthorized", "bad_signature", "stale"] {
                metrics
                    .webhook_deliveries
                    .with_label_values(&[event, outcome]);
            }
        }
        Self {
            settings: ArcSwap::from_pointee(settings),
            issuer,
            metrics,
        }
    }

    /// Applies reloaded settings to the deliveries that arrive from now on.
    pub fn swap(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    /// True when `path` is where deliveries are posted.
    pub fn is_delivery_path(&self, path: &str) -> bool {
        self.settings.load().path == path
    }

    /// Checks the bearer secret of a delivery (the `Authorization` header's value), before its
    /// body is read. `query_event` only labels a refusal.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        query_event: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<(), WebhookError> {
        let presented = authorization.and_then(crate::wire::bearer_value);
        let expected = self.settings.load().token;
        if presented.is_some_and(|secret| SecretDigest::of(secret).ct_eq(&expected)) {
            return Ok(());
        }
        self.refused(query_event, "unauthorized", peer);
        Err(WebhookError::Unauthorized)
    }

    /// Counts and audits a delivery of `peer` refused before its event was read (`outcome`:
    /// unauthorized, too_large, error), labelled with the query's event when the rule's URL
    /// carries one.
    pub fn refused(&self, query_event: Option<&str>, outcome: &str, peer: Option<IpAddr>) {
        let event = query_event.map_or("unknown", |name| {
            self.settings.load().rules.event(name).label()
        });
        self.count(event, outcome);
        self.issuer.audit().webhook_refused(event, outcome, peer);
    }

    /// Reads an authenticated delivery's body and acts on it: an ended process's tokens are
    /// dropped everywhere. Fails with what is wrong with the delivery (nothing dropped), or
    /// when the shared cache cannot be reached (the local tokens are dropped; a retry of the
    /// delivery finishes the job).
    pub async fn take(
        &self,
        body: &[u8],
        query_event: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Taken, BrokerError> {
        let settings = self.settings.load_full();
        let delivery = match delivery::read(body, query_event, &settings.rules, SystemTime::now()) {
            Ok(d) => d,
            Err(e) => {
                let event = query_event.map_or("unknown", |n| settings.rules.event(n).label());
                self.count(event, e.outcome());
                self.issuer
                    .audit()
                    .webhook_refused(event, e.outcome(), peer);
                tracing::info!(outcome = e.outcome(), "webhook delivery refused: {e}");
                return Err(e.into());
            }
        };
        let event = delivery.event;
        let Some((flow_id, account_id)) = delivery.ended() else {
            self.count(event.label(), "ignored");
            tracing::info!(
                event = event.label(),
                "webhook delivery taken: nothing ends"
            );
            return Ok(Taken {
                event,
                invalidated: 0,
            });
        };
        let ended = Ended {
            flow_id,
            account_id,
            process_id: delivery.process_id.as_deref(),
            at: Some(delivery.ended_by()),
        };
        match self.issuer.process_ended(&ended, Reason::Webhook).await {
            Ok(dropped) => {
                self.count(event.label(), "taken");
                tracing::info!(
                    event = event.label(),
                    flow_id,
                    invalidated = dropped.tokens,
                    "webhook delivery taken: the process ended"
                );
                Ok(Taken {
                    event,
                    invalidated: dropped.tokens,
                })
            }
            Err(e) => {
                self.count(event.label(), "error");
                tracing::warn!(event = event.label(), flow_id, "webhook delivery: {e}");
                Err(e)
            }
        }
    }

    fn count(&self, event: &str, outcome: &str) {
        self.metrics
            .webhook_deliveries
            .with_label_values(&[event, outcome])
            .inc();
    }
}
