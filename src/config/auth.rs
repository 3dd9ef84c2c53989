//! `[auth]`: ways for callers to prove who they are beyond the bearer secrets and certificate
//! names of `[[clients]]`. Today one subsection, `[auth.kubernetes]`: projected service-account
//! tokens, verified against the cluster's signing keys. The verifier itself
//! (`crate::auth::kubernetes`) is built from these structs by its owner.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `[auth]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Kubernetes projected service-account tokens (`[[clients]] service_account`). Absent:
    /// no caller may authenticate with one.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

/// `[auth.kubernetes]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The cluster's service-account issuer (the API server's `--service-account-issuer`, the
    /// `issuer` of `<issuer>/.well-known/openid-configuration`). A token's `iss` must equal it
    /// exactly.
    pub issuer: String,
    /// The audiences this broker accepts: a token's `aud` must contain one of them, so a token
    /// the caller was given for another service is refused. At least one.
    pub audiences: Vec<String>,
    /// A JWKS document on disk holding the cluster's public signing keys (what
    /// `kubectl get --raw /openid/v1/jwks` prints), re-read on every reload. Exactly one of
    /// `jwks_file` and `jwks_url`.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// An `https` URL serving the cluster's JWKS (`<issuer>/openid/v1/jwks`, or the API
    /// server's `https://kubernetes.default.svc/openid/v1/jwks`): fetched at start (no set, no
    /// start), refreshed every `jwks_refresh` and when a token names an unknown key (at most
    /// once every 10 s). A failed refresh keeps the last good set.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM CA certificates the `jwks_url` server's certificate must chain to (in a pod:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt` or the `kube-root-ca.crt`
    /// ConfigMap). Set: only these are trusted. Absent: Mozilla's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A file holding a bearer token sent to `jwks_url` (the broker's own service-account
    /// token, when the API server serves the JWKS only to authenticated service accounts).
    /// Re-read at every fetch, since the kubelet rotates it. Absent: no `Authorization`.
    #[serde(default)]
    pub jwks_token_file: Option<PathBuf>,
    /// How often the keys at `jwks_url` are fetched again.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    pub jwks_refresh: Duration,
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}

/// The shortest `jwks_refresh`, and the least time between two fetches of the JWKS whatever
/// asks for them (the timer, or a token naming a key the broker does not know).
pub const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(10);

impl AuthConfig {
    /// Checks the section's own rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.kubernetes {
            Some(k) => k.validate(),
            None => Ok(()),
        }
    }
}

impl KubernetesConfig {
    /// Checks `[auth.kubernetes]` on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const KEY: &str = "auth.kubernetes";
        if !is_claim_value(&self.issuer) {
            return Err(invalid(
                format!("{KEY}.issuer"),
                "must be the cluster's service-account issuer: 1 to 1024 characters, no white space",
            ));
        }
        if self.audiences.is_empty() {
            return Err(invalid(
                format!("{KEY}.audiences"),
                "needs at least one audience: a token made for any audience would be accepted",
            ));
        }
        for (i, aud) in self.audiences.iter().enumerate() {
            if !is_claim_value(aud) {
                return Err(invalid(
                    format!("{KEY}.audiences[{i}]"),
                    "must be 1 to 1024 characters, no white space",
                ));
            }
            if self.audiences[..i].contains(aud) {
                return Err(invalid(
                    format!("{KEY}.audiences[{i}]"),
                    format!("\"{aud}\" is listed twice"),
                ));
            }
        }
        match (&self.jwks_file, &self.jwks_url) {
            (None, None) => {
                return Err(invalid(
                    KEY,
                    "needs jwks_file or jwks_url: the keys that tokens are verified with",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{KEY}.jwks_url"),
                    "not together with jwks_file: the keys come from one place",
                ))
            }
            (Some(path), None) => readable(&format!("{KEY}.jwks_file"), path)?,
            (None, Some(url)) => check_https_url(&format!("{KEY}.jwks_url"), url)?,
        }
        for (key, path) in [
            ("ca_file", &self.ca_file),
            ("jwks_token_file", &self.jwks_token_file),
        ] {
            if let Some(path) = path {
                if self.jwks_url.is_none() {
                    return Err(invalid(format!("{KEY}.{key}"), "only goes with jwks_url"));
                }
                readable(&format!("{KEY}.{key}"), path)?;
            }
        }
        if self.jwks_refresh < JWKS_MIN_INTERVAL || self.jwks_refresh > Duration::from_secs(86_400)
        {
            return Err(invalid(
                format!("{KEY}.jwks_refresh"),
                "must be at least 10s and at most 24h",
            ));
        }
        Ok(())
    }
}

/// A string claim value as a cluster names its issuer or an audience.
fn is_claim_value(s: &str) -> bool {
    !s.is_empty() && s.len() <= 1024 && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// An `https` URL with a host, no user info and no fragment.
fn check_https_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = value
        .parse()
        .map_err(|_| invalid(key, format!("\"{value}\" is not a URL")))?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    if uri.scheme_str() != Some("https")
        || authority.is_empty()
        || authority.contains('@')
        || value.contains('#')
    {
        return Err(invalid(
            key,
            format!("\"{value}\" must be an https URL with a host, no user info and no fragment"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(dir: &Path) -> KubernetesConfig {
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, "{\"keys\":[]}").unwrap();
        KubernetesConfig {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            audiences: vec!["token-broker".into()],
            jwks_file: Some(jwks),
            jwks_url: None,
            ca_file: None,
            jwks_token_file: None,
            jwks_refresh: default_jwks_refresh(),
        }
    }

    fn key_of(k: &KubernetesConfig) -> String {
        match k.validate().unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn each_rule_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        good(dir.path()).validate().unwrap();
        let with = |f: &dyn Fn(&mut KubernetesConfig)| {
            let mut k = good(dir.path());
            f(&mut k);
            key_of(&k)
        };
        assert_eq!(with(&|k| k.issuer.clear()), "auth.kubernetes.issuer");
        assert_eq!(with(&|k| k.audiences.clear()), "auth.kubernetes.audiences");
        assert_eq!(
            with(&|k| k.audiences.push("token-broker".into())),
            "auth.kubernetes.audiences[1]"
        );
        assert_eq!(
            with(&|k| k.audiences[0] = "a b".into()),
            "auth.kubernetes.audiences[0]"
        );
        assert_eq!(with(&|k| k.jwks_file = None), "auth.kubernetes");
        assert_eq!(
            with(&|k| k.jwks_url = Some("https://k8s.internal/openid/v1/jwks".into())),
            "auth.kubernetes.jwks_url"
        );
        assert_eq!(
            with(&|k| k.jwks_file = Some("/nonexistent/jwks.json".into())),
            "auth.kubernetes.jwks_file"
        );
        assert_eq!(
            with(&|k| k.ca_file = Some("/etc/hostname".into())),
            "auth.kubernetes.ca_file",
            "ca_file goes with jwks_url only"
        );
        assert_eq!(
            with(&|k| k.jwks_refresh = Duration::from_secs(1)),
            "auth.kubernetes.jwks_refresh"
        );
        for url in [
            "http://k8s.internal/jwks",
            "https://user:pw@k8s.internal/jwks",
            "https:///jwks",
            "not a url",
        ] {
            assert_eq!(
                with(&|k| {
                    k.jwks_file = None;
                    k.jwks_url = Some(url.into());
                }),
                "auth.kubernetes.jwks_url",
                "{url}"
            );
        }
    }

    #[test]
    fn a_url_source_takes_its_ca_and_token_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "x").unwrap();
        let mut k = good(dir.path());
        k.jwks_file = None;
        k.jwks_url = Some("https://kubernetes.default.svc/openid/v1/jwks".into());
        k.ca_file = Some(ca.clone());
        k.jwks_token_file = Some(ca);
        k.validate().unwrap();
        k.jwks_token_file = Some(dir.path().join("missing"));
        assert_eq!(key_of(&k), "auth.kubernetes.jwks_token_file");
    }
}
