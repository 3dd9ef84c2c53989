//! `[audit]`: where the audit trail goes (a JSON-lines file of its own, or the `audit` log target
//! on stderr), the key its user tags are made with, and what happens to a mint that cannot be
//! recorded. The trail itself (`crate::audit`) is built from these structs by its owner.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `[audit]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit trail: one JSON object per line, appended (created `0640` when missing) and
    /// synced to disk in batches. Absent: the events go to stderr under the `audit` log target,
    /// among the other logs. A file that cannot be opened or written does not stop the broker:
    /// `on_failure` decides what is minted meanwhile.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// A file holding the key of the user tags (64 hex digits: `openssl rand -hex 32`): each of
    /// a user's identifiers is tagged with HMAC-SHA256 under it, so that the trail names no one
    /// to a reader without the key. Re-read on reload. Absent: a key is made at start, and tags
    /// then match only within one run of one replica.
    #[serde(default)]
    pub hmac_key_file: Option<PathBuf>,
    /// What a mint does when `file` cannot be written: `continue` (mint, count the lost event,
    /// alert) or `refuse` (503 `audit_unavailable`, no call to Truora; a minted token is handed
    /// out only once its event is on disk). Pass-through calls follow the same rule.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Also record every token handed out from the cache (`hit` events), not only mints.
    #[serde(default)]
    pub include_hits: bool,
}

/// `audit.on_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Go on minting; the events that could not be written are counted and alerted on.
    #[default]
    Continue,
    /// Mint nothing that cannot be audited: 503 `audit_unavailable`, and no upstream call.
    Refuse,
}

impl OnFailure {
    /// The value as the config file spells it.
    pub fn name(self) -> &'static str {
        match self {
            OnFailure::Continue => "continue",
            OnFailure::Refuse => "refuse",
        }
    }
}

impl AuditConfig {
    /// Checks the section's own rules (the key file's contents are read by the trail's owner).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.on_failure == OnFailure::Refuse && self.file.is_none() {
            return Err(invalid(
                "audit.on_failure",
                "\"refuse\" needs audit.file: without it the events go to stderr, which never refuses",
            ));
        }
        if let Some(file) = &self.file {
            if file.as_os_str().is_empty() || file.is_dir() {
                return Err(invalid(
                    "audit.file",
                    format!("{} is not a file path", file.display()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn err_key(text: &str) -> String {
        match Config::parse(text).unwrap().validate().unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    const CLIENT: &str = "[[clients]]\nid = \"c\"\ntoken_sha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"\n";

    #[test]
    fn the_audit_section_defaults_to_stderr_continue_and_mints_only() {
        let c = Config::parse(CLIENT).unwrap();
        assert_eq!(c.audit, AuditConfig::default());
        assert_eq!(c.audit.on_failure, OnFailure::Continue);
        assert!(!c.audit.include_hits);
        c.validate().unwrap();
    }

    #[test]
    fn refuse_without_a_file_is_refused_naming_on_failure() {
        let text = format!("[audit]\non_failure = \"refuse\"\n{CLIENT}");
        assert_eq!(err_key(&text), "audit.on_failure");
        let text = format!(
            "[audit]\non_failure = \"refuse\"\nfile = \"/var/log/token-broker/audit.jsonl\"\n{CLIENT}"
        );
        Config::parse(&text).unwrap().validate().unwrap();
    }

    #[test]
    fn a_directory_is_not_an_audit_file() {
        let text = format!("[audit]\nfile = \"/tmp\"\n{CLIENT}");
        assert_eq!(err_key(&text), "audit.file");
    }

    #[test]
    fn an_unknown_on_failure_value_is_a_parse_error() {
        let text = format!("[audit]\non_failure = \"ignore\"\n{CLIENT}");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("on_failure"), "{err}");
    }
}
