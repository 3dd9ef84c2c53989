//! TLS for the caller listener (the rustls server configuration built from `[server.tls]`) and
//! for the webhook listener (`[webhooks.tls]`, certificate and key only).
//!
//! TLS 1.2 and 1.3 only (rustls offers nothing older), ALPN for HTTP/2 and HTTP/1.1, and, when
//! `client_ca_file` is set, client certificates verified against that CA. Certificates stay
//! optional at the handshake, because callers that authenticate by bearer secret alone need not
//! have one; the auth layer then requires one from each caller configured with `tls_san`.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, TlsConfig, WebhookTlsConfig};

/// The caller listener's rustls configuration, swapped by a reload (new connections get the
/// new certificate; open ones keep theirs).
pub type SharedTls = Arc<arc_swap::ArcSwap<ServerConfig>>;

fn invalid(key: &str, reason: String) -> ConfigError {
    ConfigError::invalid(key, reason)
}

fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            invalid(
                key,
                format!("cannot read certificates from {}: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// The rustls configuration for `[server.tls]`, read from its files now.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    server_config_at("server.tls", tls)
}

/// The rustls configuration for `[webhooks.tls]` (no client certificates), read from its files
/// now.
pub fn webhook_config(tls: &WebhookTlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    let tls = TlsConfig {
        cert_file: tls.cert_file.clone(),
        key_file: tls.key_file.clone(),
        client_ca_file: None,
    };
    server_config_at("webhooks.tls", &tls)
}

/// The rustls configuration of a TLS section (`section` names it in errors).
fn server_config_at(section: &str, tls: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&format!("{section}.cert_file"), &tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| {
        invalid(
            &format!("{section}.key_file"),
            format!(
                "cannot read a private key from {}: {e}",
                tls.key_file.display()
            ),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid(section, e.to_string()))?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("server.tls.client_ca_file", path)? {
                roots.add(cert).map_err(|e| {
                    invalid(
                        "server.tls.client_ca_file",
                        format!("{}: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| invalid("server.tls.client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        invalid(
            &format!("{section}.key_file"),
            format!("does not match {section}.cert_file: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
