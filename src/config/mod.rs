//! The configuration file: TOML read into plain serde structs, one per section, then validated
//! section by section and across sections before any socket is bound. Every error names the key
//! at fault (`clients[1].token_sha256`, ...), and the command line turns it into exit status 64.
//!
//! A leaf: it imports no domain module. What the broker runs with (callers, path patterns, the
//! TLS configuration, the Redis tier) is built from these structs by the module that owns it,
//! once, with errors that name the key too.
//!
//! Durations are written as humantime strings (`"5s"`, `"15m"`). Unknown keys are an error, so a
//! typo cannot silently fall back to a default.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::secret::MasterKey;

mod audit;
mod auth;
mod cache;
mod clients;
mod parse_error;
mod server;
mod telemetry;
mod upstream;
mod webhooks;

pub use audit::{AuditConfig, OnFailure};
pub use auth::{AuthConfig, KubernetesConfig, JWKS_MIN_INTERVAL};
pub use cache::{redacted_url, CacheConfig, SharedCacheConfig, SharedMode};
pub use clients::{is_service_account, is_spiffe_id, ClientConfig, Offered};
pub use parse_error::ParseError;
pub use server::{ServerConfig, TlsConfig};
pub use telemetry::TelemetryConfig;
pub use upstream::UpstreamConfig;
pub use webhooks::{ClaimNames, WebhookTlsConfig, WebhooksConfig, EVENTS};

/// The environment variable read for the master key when `upstream.api_key_file` is not set.
pub const API_KEY_ENV: &str = "TRUORA_API_KEY";

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the broker listens.
    #[serde(default)]
    pub server: ServerConfig,
    /// How the broker reaches Truora.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// The token cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Ways for callers to authenticate beyond secrets and certificate names: Kubernetes
    /// service-account tokens.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The internal callers allowed to ask for tokens.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    /// Truora's webhook deliveries, on a listener of their own. Absent: no webhook listener
    /// (ended processes are then learnt only from results read through the pass-through).
    #[serde(default)]
    pub webhooks: Option<WebhooksConfig>,
    /// Traces over OTLP/HTTP. Without `otlp_endpoint`: no tracing at all.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The audit trail: where its events go, the key of its user tags, and whether a mint that
    /// cannot be recorded is refused.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// A configuration that cannot be used, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// The TOML does not parse, has an unknown key, or a value of the wrong type. Said by
    /// line, column and key, never with the line's text.
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: ParseError },
    /// A value parses but breaks a rule.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    /// A value that breaks a rule: `key` names it as the file spells it.
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        invalid(key, reason)
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Reads and parses a file, then validates it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let config = Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        toml::from_str(text).map_err(|e| ParseError::of(text, &e))
    }

    /// Checks every rule that the types alone do not: each section's, then across sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.upstream.validate()?;
        self.cache.validate(self.upstream.deadline)?;
        self.auth.validate()?;
        self.telemetry.validate()?;
        self.audit.validate()?;
        if let Some(webhooks) = &self.webhooks {
            webhooks.validate(&[
                ("server.listen", self.server.listen),
                ("server.admin_listen", self.server.admin_listen),
            ])?;
        }
        clients::validate(
            &self.clients,
            Offered {
                client_certificates: self.server.checks_client_certificates(),
                service_accounts: self.auth.kubernetes.is_some(),
            },
        )
    }

    /// Loads the master key: from `upstream.api_key_file` when set, else from `TRUORA_API_KEY`.
    /// Neither (or an empty one) refuses to start.
    pub fn master_key(&self) -> Result<MasterKey, ConfigError> {
        self.master_key_with(std::env::var(API_KEY_ENV).ok())
    }

    /// [`Config::master_key`] with the environment's value given, for tests.
    pub fn master_key_with(&self, env_value: Option<String>) -> Result<MasterKey, ConfigError> {
        if let Some(path) = &self.upstream.api_key_file {
            // Wiped when dropped: the key is copied into the MasterKey, which wipes its own.
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "upstream.api_key_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?);
            return MasterKey::new(&text).ok_or_else(|| {
                invalid(
                    "upstream.api_key_file",
                    format!("{} is empty", path.display()),
                )
            });
        }
        env_value
            .as_deref()
            .and_then(MasterKey::new)
            .ok_or_else(|| {
                invalid(
                    "upstream.api_key_file",
                    format!("not set, and {API_KEY_ENV} is not set or empty: the broker needs Truora's master API key"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
[upstream]
account_url = "https://api.account.truora.com"
web_url = "https://identity.truora.com"
timeout = "5s"
[cache]
max_entries = 100000
min_remaining = "15m"
[[clients]]
id = "checkout"
token_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
"#;

    fn err_key(text: &str) -> String {
        match Config::parse(text).unwrap().validate().unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn the_documented_example_is_valid() {
        let c = Config::parse(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(c.upstream.timeout, Duration::from_secs(5));
        assert_eq!(c.cache.min_remaining, Duration::from_secs(900));
        assert_eq!(c.clients.len(), 1);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = GOOD.replace("timeout = \"5s\"", "timeout = \"5s\"\ntimout = \"5s\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("timout"), "{err}");
    }

    #[test]
    fn bad_duration_is_an_error_naming_the_key() {
        let text = GOOD.replace("\"15m\"", "\"fifteen\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("min_remaining"), "{err}");
    }

    #[test]
    fn bad_digest_names_the_client_key() {
        let text = GOOD.replace("ba7816bf", "zz7816bf");
        assert_eq!(err_key(&text), "clients[0].token_sha256");
    }

    #[test]
    fn duplicate_client_ids_are_refused() {
        let text = format!(
            "{GOOD}\n[[clients]]\nid = \"checkout\"\ntoken_sha256 = \"{}\"\n",
            "1".repeat(64)
        );
        assert_eq!(err_key(&text), "clients[1].id");
    }

    #[test]
    fn shared_secret_between_clients_is_refused() {
        let text = format!(
            "{GOOD}\n[[clients]]\nid = \"other\"\ntoken_sha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"\n"
        );
        assert_eq!(err_key(&text), "clients[1].token_sha256");
    }

    #[test]
    fn no_clients_is_refused() {
        let text = GOOD.split("[[clients]]").next().unwrap();
        assert_eq!(err_key(text), "clients");
    }

    #[test]
    fn same_port_for_admin_and_callers_is_refused() {
        let text = GOOD.replace("127.0.0.1:9090", "127.0.0.1:8080");
        assert_eq!(err_key(&text), "server.admin_listen");
    }

    #[test]
    fn non_http_upstream_url_is_refused() {
        let text = GOOD.replace("https://api.account.truora.com", "ftp://x");
        assert_eq!(err_key(&text), "upstream.account_url");
        let text = GOOD.replace("https://identity.truora.com", "https://u:p@identity");
        assert_eq!(err_key(&text), "upstream.web_url");
    }

    #[test]
    fn resilience_settings_are_checked_against_each_other() {
        let with =
            |extra: &str| GOOD.replace("timeout = \"5s\"", &format!("timeout = \"5s\"\n{extra}"));
        assert_eq!(err_key(&with("deadline = \"1s\"")), "upstream.deadline");
        assert_eq!(
            err_key(&with("connect_timeout = \"0s\"")),
            "upstream.connect_timeout"
        );
        assert_eq!(err_key(&with("max_retries = 99")), "upstream.max_retries");
        assert_eq!(
            err_key(&with("retry_backoff = \"5s\"")),
            "upstream.retry_backoff"
        );
        assert_eq!(
            err_key(&with("breaker_threshold = 0")),
            "upstream.breaker_threshold"
        );
        assert_eq!(
            err_key(&with("breaker_cooldown = \"0s\"")),
            "upstream.breaker_cooldown"
        );
        assert_eq!(
            err_key(&with("max_concurrent = 0")),
            "upstream.max_concurrent"
        );
        assert_eq!(err_key(&with("mint_rate = 0")), "upstream.mint_rate");
        let text = format!("{GOOD}mint_rate = 0\n");
        assert_eq!(err_key(&text), "clients[0].mint_rate");
    }

    #[test]
    fn resilience_defaults_do_not_get_in_the_way() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.upstream.max_concurrent, 64);
        assert_eq!(c.upstream.mint_rate, 50);
        assert_eq!(c.clients[0].mint_rate, None);
    }

    #[test]
    fn min_remaining_of_two_hours_is_refused() {
        let text = GOOD.replace("\"15m\"", "\"2h\"");
        assert_eq!(err_key(&text), "cache.min_remaining");
    }

    #[test]
    fn zero_timeout_and_zero_entries_are_refused() {
        assert_eq!(
            err_key(&GOOD.replace("\"5s\"", "\"0s\"")),
            "upstream.timeout"
        );
        assert_eq!(err_key(&GOOD.replace("100000", "0")), "cache.max_entries");
    }

    #[test]
    fn master_key_comes_from_the_file_before_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "file-key\n").unwrap();
        let mut c = Config::parse(GOOD).unwrap();
        c.upstream.api_key_file = Some(path);
        let key = c.master_key_with(Some("env-key".into())).unwrap();
        assert_eq!(key.expose(), "file-key");
    }

    #[test]
    fn master_key_falls_back_to_the_environment() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(
            c.master_key_with(Some("env-key".into())).unwrap().expose(),
            "env-key"
        );
    }

    #[test]
    fn no_master_key_anywhere_refuses_to_start() {
        let c = Config::parse(GOOD).unwrap();
        let err = c.master_key_with(None).unwrap_err().to_string();
        assert!(err.contains("TRUORA_API_KEY"), "{err}");
        let err = c
            .master_key_with(Some("  ".into()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("upstream.api_key_file"), "{err}");
    }

    #[test]
    fn unreadable_key_file_names_the_key() {
        let mut c = Config::parse(GOOD).unwrap();
        c.upstream.api_key_file = Some("/nonexistent/key".into());
        let err = c
            .master_key_with(Some("env".into()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("upstream.api_key_file"), "{err}");
    }
}
