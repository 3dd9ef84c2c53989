//! `[upstream]`: how the broker reaches Truora, and what guards the calls (timeouts, retries,
//! the breaker, the concurrency cap and the mint budget).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};
use crate::truora::ArrayEncoding;

/// `[upstream]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of Truora's account API, where `POST /v1/api-keys` mints tokens.
    #[serde(default = "default_account_url")]
    pub account_url: String,
    /// Base URL of Truora's identity API, where `/truora/identity/...` pass-through goes.
    #[serde(default = "default_identity_url")]
    pub identity_url: String,
    /// The longest a pass-through request may wait for Truora's answer head; past it, 504.
    #[serde(default = "default_passthrough_timeout", with = "humantime_serde")]
    pub passthrough_timeout: Duration,
    /// Largest pass-through request body, in bytes, streamed and cut off beyond it (413).
    #[serde(default = "default_passthrough_max_body_bytes")]
    pub passthrough_max_body_bytes: usize,
    /// Base URL of Truora's identity web page; responses carry `<web_url>/?token=<api_key>`.
    #[serde(default = "default_web_url")]
    pub web_url: String,
    /// File holding the master API key. When absent the key comes from `TRUORA_API_KEY`.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The longest one attempt may take, connection and answer included. An attempt that times
    /// out after its request was sent is not retried (Truora may have minted): callers get 504.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The longest opening a connection to Truora may take (never more than `upstream.timeout`).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The longest a caller waits for a mint, retries and back-off included.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Retries after the first attempt, only where safe: a connection that could not be made,
    /// and 429 or 503 answers (after their Retry-After).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First back-off before a retry; it doubles each time, with jitter.
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest back-off between two attempts.
    #[serde(default = "default_retry_backoff_max", with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Consecutive failed calls (5xx, timeouts, connection failures, unusable answers) that open
    /// the circuit breaker; while open, misses get 503 at once and hits are still served.
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one probe call may close it again.
    #[serde(default = "default_breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Most calls to Truora in flight at once; beyond it misses get 503 at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Most mints a second for all callers together (bursts of up to one second's worth);
    /// beyond it misses get 429.
    #[serde(default = "default_mint_rate")]
    pub mint_rate: u32,
    /// How list fields (`emails`, `phones`) are sent to Truora: `"repeat"` (`emails=a&emails=b`,
    /// what integrators send) or `"comma"` (`emails=a,b`). Truora's docs do not settle it.
    #[serde(default)]
    pub array_encoding: ArrayEncoding,
}

fn default_account_url() -> String {
    "https://api.account.truora.com".into()
}
fn default_identity_url() -> String {
    "https://api.identity.truora.com".into()
}
fn default_passthrough_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_passthrough_max_body_bytes() -> usize {
    10 * 1024 * 1024
}
fn default_web_url() -> String {
    "https://identity.truora.com".into()
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_deadline() -> Duration {
    Duration::from_secs(10)
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_retry_backoff_max() -> Duration {
    Duration::from_secs(2)
}
pub(super) fn default_breaker_threshold() -> u32 {
    5
}
fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_max_concurrent() -> u32 {
    64
}
fn default_mint_rate() -> u32 {
    50
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            account_url: default_account_url(),
            identity_url: default_identity_url(),
            passthrough_timeout: default_passthrough_timeout(),
            passthrough_max_body_bytes: default_passthrough_max_body_bytes(),
            web_url: default_web_url(),
            api_key_file: None,
            timeout: default_upstream_timeout(),
            connect_timeout: default_connect_timeout(),
            deadline: default_deadline(),
            max_retries: default_max_retries(),
            retry_backoff: default_retry_backoff(),
            retry_backoff_max: default_retry_backoff_max(),
            breaker_threshold: default_breaker_threshold(),
            breaker_cooldown: default_breaker_cooldown(),
            max_concurrent: default_max_concurrent(),
            mint_rate: default_mint_rate(),
            array_encoding: ArrayEncoding::default(),
        }
    }
}

impl UpstreamConfig {
    /// Checks the section's own rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let u = self;
        check_base_url("upstream.account_url", &u.account_url)?;
        check_base_url("upstream.web_url", &u.web_url)?;
        check_base_url("upstream.identity_url", &u.identity_url)?;
        if u.passthrough_timeout.is_zero() || u.passthrough_timeout > Duration::from_secs(600) {
            return Err(invalid(
                "upstream.passthrough_timeout",
                "must be more than 0s and at most 10m",
            ));
        }
        if !(1024..=1024 * 1024 * 1024).contains(&u.passthrough_max_body_bytes) {
            return Err(invalid(
                "upstream.passthrough_max_body_bytes",
                "must be between 1024 and 1073741824",
            ));
        }
        if u.timeout.is_zero() || u.timeout > Duration::from_secs(120) {
            return Err(invalid(
                "upstream.timeout",
                "must be more than 0s and at most 2m",
            ));
        }
        if u.connect_timeout.is_zero() || u.connect_timeout > Duration::from_secs(60) {
            return Err(invalid(
                "upstream.connect_timeout",
                "must be more than 0s and at most 1m",
            ));
        }
        if u.deadline < u.timeout || u.deadline > Duration::from_secs(300) {
            return Err(invalid(
                "upstream.deadline",
                "must be at least upstream.timeout and at most 5m",
            ));
        }
        if u.max_retries > 10 {
            return Err(invalid("upstream.max_retries", "must be at most 10"));
        }
        if u.retry_backoff.is_zero() || u.retry_backoff > u.retry_backoff_max {
            return Err(invalid(
                "upstream.retry_backoff",
                "must be more than 0s and at most upstream.retry_backoff_max",
            ));
        }
        if u.retry_backoff_max > Duration::from_secs(60) {
            return Err(invalid("upstream.retry_backoff_max", "must be at most 1m"));
        }
        if u.breaker_threshold == 0 {
            return Err(invalid("upstream.breaker_threshold", "must be at least 1"));
        }
        if u.breaker_cooldown.is_zero() || u.breaker_cooldown > Duration::from_secs(600) {
            return Err(invalid(
                "upstream.breaker_cooldown",
                "must be more than 0s and at most 10m",
            ));
        }
        if !(1..=4096).contains(&u.max_concurrent) {
            return Err(invalid(
                "upstream.max_concurrent",
                "must be between 1 and 4096",
            ));
        }
        if !(1..=100_000).contains(&u.mint_rate) {
            return Err(invalid(
                "upstream.mint_rate",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}

/// A base URL: `http` or `https`, a host, no query or fragment, no user info.
pub(super) fn check_base_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = value
        .parse()
        .map_err(|_| invalid(key, format!("\"{value}\" is not a URL")))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    if !scheme_ok || authority.is_empty() || authority.contains('@') {
        return Err(invalid(
            key,
            format!("\"{value}\" must be an http(s) URL with a host and no user info"),
        ));
    }
    if uri.query().is_some() || value.contains('#') {
        return Err(invalid(
            key,
            format!("\"{value}\" must have no query or fragment"),
        ));
    }
    Ok(())
}
