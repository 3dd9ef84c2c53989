//! `[telemetry]`: traces of the broker's requests, exported over OTLP/HTTP to a collector. The
//! pipeline itself (`crate::telemetry`) is built from this struct by the composition root.

use serde::{Deserialize, Serialize};

use super::upstream::check_base_url;
use super::{invalid, ConfigError};

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OpenTelemetry collector's OTLP/HTTP base URL (`http://otel-collector:4318`); spans
    /// are posted as protobuf to `<otlp_endpoint>/v1/traces` (a URL already ending in
    /// `/v1/traces` is used as it is). Absent: no tracing at all, and nothing of it costs a
    /// request anything.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of every span's resource.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// The share of new traces recorded, 0 to 1 (1: every request). A request that carries a
    /// W3C `traceparent` follows its caller's decision instead (parent-based sampling).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Send a W3C `traceparent` to Truora on mints and pass-through calls, so that Truora's
    /// side can join the trace. Off: Truora sees no trace context, not even a caller's own.
    #[serde(default)]
    pub propagate_upstream: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service_name(),
            sample_ratio: default_sample_ratio(),
            propagate_upstream: false,
        }
    }
}

fn default_service_name() -> String {
    "token-broker".into()
}

fn default_sample_ratio() -> f64 {
    1.0
}

impl TelemetryConfig {
    /// Checks every key's rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.otlp_endpoint {
            check_base_url("telemetry.otlp_endpoint", endpoint)?;
        }
        let name = &self.service_name;
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err(invalid(
                "telemetry.service_name",
                "must be 1 to 255 characters, none of them a control character",
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                "must be a number from 0 to 1",
            ));
        }
        Ok(())
    }

    /// The URL spans are posted to, when tracing is on.
    pub fn traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.as_deref()?.trim_end_matches('/');
        Some(if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parsed(text: &str) -> Result<Config, ConfigError> {
        let c = Config::parse(text).map_err(|e| invalid("parse", e.to_string()))?;
        c.telemetry.validate()?;
        Ok(c)
    }

    fn key_of(text: &str) -> String {
        match parsed(text).unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn absent_means_no_tracing_with_the_documented_defaults() {
        let c = parsed("").unwrap();
        assert_eq!(c.telemetry, TelemetryConfig::default());
        assert_eq!(c.telemetry.traces_url(), None);
        assert_eq!(c.telemetry.service_name, "token-broker");
        assert!((c.telemetry.sample_ratio - 1.0).abs() < f64::EPSILON);
        assert!(!c.telemetry.propagate_upstream);
    }

    #[test]
    fn the_traces_path_is_added_to_a_base_url_once() {
        for (endpoint, url) in [
            (
                "http://otel-collector:4318",
                "http://otel-collector:4318/v1/traces",
            ),
            (
                "http://otel-collector:4318/",
                "http://otel-collector:4318/v1/traces",
            ),
            ("https://c.example/otlp", "https://c.example/otlp/v1/traces"),
            ("http://c:4318/v1/traces", "http://c:4318/v1/traces"),
        ] {
            let c = parsed(&format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n")).unwrap();
            assert_eq!(c.telemetry.traces_url().as_deref(), Some(url), "{endpoint}");
        }
    }

    #[test]
    fn each_bad_value_names_its_key() {
        for (text, key) in [
            (
                "otlp_endpoint = \"otel-collector:4318\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"ftp://c:4318\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"http://u:p@c:4318\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"http://c:4318/?x=1\"",
                "telemetry.otlp_endpoint",
            ),
            ("service_name = \"\"", "telemetry.service_name"),
            ("service_name = \"a\\nb\"", "telemetry.service_name"),
            ("sample_ratio = 1.5", "telemetry.sample_ratio"),
            ("sample_ratio = -0.1", "telemetry.sample_ratio"),
            ("sample_ratio = nan", "telemetry.sample_ratio"),
        ] {
            assert_eq!(key_of(&format!("[telemetry]\n{text}\n")), key, "{text}");
        }
        assert!(Config::parse("[telemetry]\nendpoint = \"http://c:4318\"\n").is_err());
        parsed("[telemetry]\nsample_ratio = 0\n").unwrap();
        parsed("[telemetry]\nsample_ratio = 0.25\nservice_name = \"tb-eu\"\n").unwrap();
    }
}
