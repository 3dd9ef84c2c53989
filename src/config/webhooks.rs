//! `[webhooks]`: the receiver of Truora's webhook deliveries, on a listener of its own. Truora
//! tells the broker through them that a verification process ended, and the broker drops that
//! process's tokens. The receiver itself (`crate::webhooks`) is built from these structs by its
//! owner.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};
use crate::secret::SecretDigest;

/// The canonical event names a delivery may carry (or be mapped onto with `[webhooks.events]`).
pub const EVENTS: [&str; 3] = [
    "identity_process_created",
    "identity_process_succeeded",
    "identity_process_failed",
];

/// `[webhooks]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// The webhook listener's address: the one port Truora must reach from outside, apart from
    /// the caller listener, which stays internal. It serves deliveries and nothing else.
    pub listen: SocketAddr,
    /// The path deliveries are posted to; any other path is 404.
    #[serde(default = "default_path")]
    pub path: String,
    /// Hex SHA-256 of the secret the Truora webhook action sends as
    /// `Authorization: Bearer <secret>` (`token-broker hash-secret` prints it). Checked before
    /// a delivery's body is read.
    pub token_sha256: String,
    /// A file holding the secret Truora signs its JWTs with (HS256). Set: a delivery whose
    /// signature does not verify with it is refused. Absent: the signature is not checked (the
    /// bearer secret alone authenticates).
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    /// A delivery whose `iat` is older than this (or more than a minute in the future) is
    /// refused, so a captured delivery cannot be replayed later.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Most webhook connections open at once; more are closed at once. Its own cap: deliveries
    /// can never take the callers' places, nor the callers theirs.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TLS for the webhook listener. Absent: plain HTTP (behind a TLS-terminating load
    /// balancer).
    #[serde(default)]
    pub tls: Option<WebhookTlsConfig>,
    /// The claim names a delivery's JWT carries, where they differ from the defaults.
    #[serde(default)]
    pub claims: ClaimNames,
    /// Other event names mapped onto the canonical ones, e.g.
    /// `"Identity Process Success" = "identity_process_succeeded"` (compared case-insensitively).
    #[serde(default)]
    pub events: BTreeMap<String, String>,
}

/// `[webhooks.tls]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookTlsConfig {
    /// PEM file with the webhook listener's certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// `[webhooks.claims]`: which claim of the delivery's JWT holds what.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimNames {
    /// The event (unless the rule's URL carries `?event=`).
    pub event: String,
    /// The process's flow id.
    pub flow_id: String,
    /// The user's account id.
    pub account_id: String,
    /// The identity process id (logged, not needed).
    pub process_id: String,
    /// When the delivery was made, Unix seconds.
    pub iat: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            event: "event".into(),
            flow_id: "flow_id".into(),
            account_id: "account_id".into(),
            process_id: "process_id".into(),
            iat: "iat".into(),
        }
    }
}

impl ClaimNames {
    /// Each setting and the claim name it holds.
    pub fn named(&self) -> [(&'static str, &str); 5] {
        [
            ("event", &self.event),
            ("flow_id", &self.flow_id),
            ("account_id", &self.account_id),
            ("process_id", &self.process_id),
            ("iat", &self.iat),
        ]
    }
}

fn default_path() -> String {
    "/webhooks/truora".into()
}
fn default_max_age() -> Duration {
    Duration::from_secs(600)
}
fn default_max_connections() -> usize {
    256
}

impl WebhooksConfig {
    /// A receiver on `listen` for deliveries authenticated by the secret whose SHA-256 is
    /// `token_sha256`, everything else at its default.
    pub fn new(listen: SocketAddr, token_sha256: String) -> Self {
        Self {
            listen,
            path: default_path(),
            token_sha256,
            signing_secret_file: None,
            max_age: default_max_age(),
            max_connections: default_max_connections(),
            tls: None,
            claims: ClaimNames::default(),
            events: BTreeMap::new(),
        }
    }

    /// The rules of `[webhooks]` on their own; `taken` are the addresses of the other
    /// listeners, which it may not share.
    pub fn validate(&self, taken: &[(&str, SocketAddr)]) -> Result<(), ConfigError> {
        for (key, addr) in taken {
            if *addr == self.listen && addr.port() != 0 {
                return Err(invalid(
                    "webhooks.listen",
                    format!("must differ from {key}: the webhook port serves deliveries and nothing else"),
                ));
            }
        }
        let p = &self.path;
        if !p.starts_with('/')
            || p.len() > 256
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~'))
        {
            return Err(invalid(
                "webhooks.path",
                "must start with / and hold only A-Z a-z 0-9 / - _ . ~ (no query), at most 256 characters",
            ));
        }
        if SecretDigest::from_hex(&self.token_sha256).is_none() {
            return Err(invalid(
                "webhooks.token_sha256",
                "must be 64 hex digits: the SHA-256 of the secret Truora's webhook action sends (see `token-broker hash-secret`)",
            ));
        }
        if self.max_age < Duration::from_secs(10) || self.max_age > Duration::from_secs(86_400) {
            return Err(invalid("webhooks.max_age", "must be between 10s and 24h"));
        }
        if !(1..=100_000).contains(&self.max_connections) {
            return Err(invalid(
                "webhooks.max_connections",
                "must be between 1 and 100000",
            ));
        }
        let mut seen: Vec<&str> = Vec::new();
        for (setting, name) in self.claims.named() {
            if name.is_empty() || name.len() > 128 {
                return Err(invalid(
                    format!("webhooks.claims.{setting}"),
                    "must be a claim name of 1 to 128 characters",
                ));
            }
            if seen.contains(&name) {
                return Err(invalid(
                    format!("webhooks.claims.{setting}"),
                    format!("\"{name}\" is already the name of another claim"),
                ));
            }
            seen.push(name);
        }
        for (from, to) in &self.events {
            if from.trim().is_empty() {
                return Err(invalid("webhooks.events", "an event name may not be empty"));
            }
            if !EVENTS.contains(&to.as_str()) {
                return Err(invalid(
                    format!("webhooks.events.\"{from}\""),
                    format!("must map onto one of {}", EVENTS.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> WebhooksConfig {
        WebhooksConfig::new("127.0.0.1:8082".parse().unwrap(), "ab".repeat(32))
    }

    fn key_of(c: &WebhooksConfig, taken: &[(&str, SocketAddr)]) -> String {
        match c.validate(taken).unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_minimal_section_is_valid_with_its_defaults() {
        let c = valid();
        c.validate(&[]).unwrap();
        assert_eq!(c.path, "/webhooks/truora");
        assert_eq!(c.max_age, Duration::from_secs(600));
        let text = format!(
            "listen = \"127.0.0.1:8082\"\ntoken_sha256 = \"{}\"\n[claims]\nflow_id = \"FlowID\"\n[events]\n\"Success\" = \"identity_process_succeeded\"\n",
            "ab".repeat(32)
        );
        let parsed: WebhooksConfig = toml::from_str(&text).unwrap();
        parsed.validate(&[]).unwrap();
        assert_eq!(parsed.claims.flow_id, "FlowID");
        assert_eq!(parsed.claims.account_id, "account_id");
    }

    #[test]
    fn each_rule_names_its_key() {
        let server: SocketAddr = "127.0.0.1:8082".parse().unwrap();
        assert_eq!(
            key_of(&valid(), &[("server.listen", server)]),
            "webhooks.listen"
        );
        type Break = fn(&mut WebhooksConfig);
        let cases: Vec<(Break, &str)> = vec![
            (|c| c.path = "webhooks".into(), "webhooks.path"),
            (|c| c.path = "/hooks?x=1".into(), "webhooks.path"),
            (|c| c.token_sha256 = "abc".into(), "webhooks.token_sha256"),
            (|c| c.max_age = Duration::from_secs(1), "webhooks.max_age"),
            (|c| c.max_connections = 0, "webhooks.max_connections"),
            (|c| c.claims.iat = String::new(), "webhooks.claims.iat"),
            (
                |c| c.claims.account_id = "flow_id".into(),
                "webhooks.claims.account_id",
            ),
            (
                |c| {
                    c.events.insert("Done".into(), "finished".into());
                },
                "webhooks.events.\"Done\"",
            ),
        ];
        for (break_it, key) in cases {
            let mut c = valid();
            break_it(&mut c);
            assert_eq!(key_of(&c, &[]), key);
        }
    }
}
