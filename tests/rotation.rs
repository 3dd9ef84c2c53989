//! Secrets that rotate by themselves (`server.watch_files`): files laid out as the kubelet lays
//! out a mounted Secret (each file a link through `..data` to a timestamped directory, rotated
//! by swapping `..data`), or rewritten in place as Vault Agent does, and a broker that is never
//! sent a signal.
//!
//! - the master key swapped is used by the next mint; an empty or broken one keeps the old key,
//!   and the metrics and the audit trail say why; a good one after it is applied;
//! - the TLS certificate swapped is what new connections are served;
//! - the webhook signing secret rewritten is what deliveries are checked with.
//!
//! Every wait is bounded (the watcher applies a change within about a second of quiet).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use token_broker::app::Broker as Server;
use token_broker::config::{Config, TlsConfig};
use token_broker::sandbox::{sign_hs256, Sandbox, SandboxOptions};

/// The longest a test waits for the watcher.
const WAIT: Duration = Duration::from_secs(20);
const ROTATED_KEY: &str = "CANARY-rotated-master-key-9d2e";

/// A directory laid out as the kubelet lays out a mounted Secret: `<name>` -> `..data/<name>`,
/// `..data` -> `..<n>`, the files in `..<n>`.
struct Mounted {
    dir: PathBuf,
    generation: u32,
}

impl Mounted {
    fn new(dir: &Path, files: &[(&str, &[u8])]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut m = Mounted {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        m.write_generation(files);
        std::os::unix::fs::symlink(m.current(), dir.join("..data")).unwrap();
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        m
    }

    fn current(&self) -> String {
        format!(
            "..2026_12_03_10_00_{:02}.{}",
            self.generation, self.generation
        )
    }

    fn write_generation(&mut self, files: &[(&str, &[u8])]) {
        self.generation += 1;
        let data = self.dir.join(self.current());
        std::fs::create_dir(&data).unwrap();
        for (name, content) in files {
            std::fs::write(data.join(name), content).unwrap();
        }
    }

    /// The kubelet's update: a new timestamped directory, `..data_tmp` pointing at it, renamed
    /// over `..data`, the old directory removed.
    fn swap(&mut self, files: &[(&str, &[u8])]) {
        let old = self.dir.join(self.current());
        self.write_generation(files);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(self.current(), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(old).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A broker started from a config file, reloaded by nothing but its watcher.
struct Watched {
    url: String,
    admin: String,
    webhooks: Option<String>,
    sandbox: Sandbox,
    audit: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watched {
    async fn start(dir: &Path, master_key: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let sandbox = Sandbox::start(SandboxOptions::new(master_key))
            .await
            .unwrap();
        let mut cfg = config(&sandbox.url());
        cfg.upstream.identity_url = sandbox.url();
        cfg.audit.file = Some(dir.join("audit.jsonl"));
        let key = dir.join("api-key");
        std::fs::write(&key, master_key).unwrap();
        cfg.upstream.api_key_file = Some(key);
        assert!(cfg.server.watch_files, "on by default");
        tweak(&mut cfg);
        let path = dir.join("broker.toml");
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let config = Config::load(&path).unwrap();
        let server = Server::from_config(&config, config.master_key().unwrap())
            .await
            .unwrap();
        server.reload_from(path, config.clone()).unwrap();
        let url = format!("http://{}", server.caller_addr().unwrap());
        let admin = format!("http://{}", server.admin_addr().unwrap());
        let webhooks = server.webhook_addr().map(|a| format!("http://{a}"));
        let task = tokio::spawn(server.run(std::future::pending()));
        Watched {
            url,
            admin,
            webhooks,
            sandbox,
            audit: config.audit.file.clone().unwrap(),
            task,
        }
    }

    async fn metric(&self, series: &str) -> f64 {
        let r = send(Method::GET, &format!("{}/metrics", self.admin), &[], "").await;
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.parse().unwrap())
    }

    /// Waits until `series` is at least `at_least`.
    async fn wait_for(&self, series: &str, at_least: f64) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(series).await;
            if now >= at_least {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{series} is {now}, not {at_least}, after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The audit trail's reload events so far.
    fn reloads(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["event"] == "reload")
            .collect()
    }

    /// A mint for a user never asked for before, so that it reaches Truora.
    async fn mint(&self, user: &str) -> Resp {
        post_tokens(&self.url, CHECKOUT_SECRET, &FORM.replace("user-1", user)).await
    }
}

fn changes(file: &str, result: &str) -> String {
    format!(r#"token_broker_secret_file_changes_total{{file="{file}",result="{result}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_swapped_like_a_kubernetes_secret_is_used_by_the_next_mint_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let mut secret = Mounted::new(
        &dir.path().join("truora"),
        &[("api-key", format!("{MASTER_KEY}\n").as_bytes())],
    );
    let b = Watched::start(dir.path(), MASTER_KEY, |c| {
        c.upstream.api_key_file = Some(secret.path("api-key"));
    })
    .await;
    assert_eq!(b.mint("before").await.status, StatusCode::OK);
    b.wait_for("token_broker_secret_files_watched", 1.0).await;

    // Truora now knows only the new key, and the Secret is updated.
    b.sandbox.set_options(|o| o.master_key = ROTATED_KEY.into());
    secret.swap(&[("api-key", format!("{ROTATED_KEY}\n").as_bytes())]);
    b.wait_for(&changes("upstream.api_key_file", "applied"), 1.0)
        .await;
    let r = b.mint("after").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(b.sandbox.received().last().unwrap().key_matched);
    assert_eq!(b.metric("token_broker_secret_files_pending").await, 0.0);
    let reloads = b.reloads();
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    assert_eq!(reloads[0]["trigger"], "watch");
    assert_eq!(reloads[0]["result"], "applied");
    assert_eq!(
        reloads[0]["files"],
        serde_json::json!(["upstream.api_key_file"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_broken_key_file_keeps_the_old_key_and_says_why_until_a_good_one_comes() {
    let dir = tempfile::tempdir().unwrap();
    let mut secret = Mounted::new(
        &dir.path().join("truora"),
        &[("api-key", MASTER_KEY.as_bytes())],
    );
    let b = Watched::start(dir.path(), MASTER_KEY, |c| {
        c.upstream.api_key_file = Some(secret.path("api-key"));
    })
    .await;
    b.wait_for("token_broker_secret_files_watched", 1.0).await;

    // Empty: refused, the old key is still the one sent.
    secret.swap(&[("api-key", b"  \n")]);
    b.wait_for(&changes("upstream.api_key_file", "refused"), 1.0)
        .await;
    b.wait_for("token_broker_secret_files_pending", 1.0).await;
    let r = b.mint("kept").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(b.sandbox.received().last().unwrap().key_matched);
    let reloads = b.reloads();
    assert_eq!(reloads.last().unwrap()["result"], "refused");
    let why = reloads.last().unwrap()["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        why.starts_with("upstream.api_key_file") && why.contains("empty"),
        "{why}"
    );

    // Removed in the middle of a hand-made rewrite: refused too, the old key still sent.
    std::fs::remove_file(secret.path("api-key")).unwrap();
    b.wait_for(&changes("upstream.api_key_file", "refused"), 2.0)
        .await;
    assert_eq!(b.mint("still-kept").await.status, StatusCode::OK);

    // A good key at last: applied, nothing pending.
    std::os::unix::fs::symlink("..data/api-key", secret.path("api-key")).unwrap();
    b.sandbox.set_options(|o| o.master_key = ROTATED_KEY.into());
    secret.swap(&[("api-key", ROTATED_KEY.as_bytes())]);
    b.wait_for(&changes("upstream.api_key_file", "applied"), 1.0)
        .await;
    assert_eq!(b.mint("rotated").await.status, StatusCode::OK);
    assert!(b.sandbox.received().last().unwrap().key_matched);
    b.wait_for("token_broker_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
    assert_eq!(b.metric("token_broker_secret_files_pending").await, 0.0);
}

/// A CA and server certificates for `localhost` / 127.0.0.1 it signs.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "rotation CA");
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    /// (certificate PEM, key PEM) for `localhost`, named `cn`.
    fn server(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The certificate a new TLS connection to `addr` is served.
async fn served_certificate(addr: &str, ca: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_certificate_swapped_in_place_is_served_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (old_cert, old_key) = pki.server("before");
    let (new_cert, new_key) = pki.server("after");
    let mut secret = Mounted::new(
        &dir.path().join("tls"),
        &[
            ("tls.crt", old_cert.as_bytes()),
            ("tls.key", old_key.as_bytes()),
        ],
    );
    let b = Watched::start(dir.path(), MASTER_KEY, |c| {
        c.server.tls = Some(TlsConfig {
            cert_file: secret.path("tls.crt"),
            key_file: secret.path("tls.key"),
            client_ca_file: None,
        });
    })
    .await;
    let addr = b.url.trim_start_matches("http://").to_owned();
    assert_eq!(
        served_certificate(&addr, &pki.ca.pem()).await,
        der(&old_cert)
    );
    b.wait_for("token_broker_secret_files_watched", 2.0).await;

    // A key that does not match the certificate: refused, the old pair still served.
    secret.swap(&[
        ("tls.crt", new_cert.as_bytes()),
        ("tls.key", old_key.as_bytes()),
    ]);
    b.wait_for(&changes("server.tls.cert_file", "refused"), 1.0)
        .await;
    assert_eq!(
        served_certificate(&addr, &pki.ca.pem()).await,
        der(&old_cert)
    );

    // The renewed pair: new connections get the new certificate.
    secret.swap(&[
        ("tls.crt", new_cert.as_bytes()),
        ("tls.key", new_key.as_bytes()),
    ]);
    b.wait_for(&changes("server.tls.key_file", "applied"), 1.0)
        .await;
    assert_eq!(
        served_certificate(&addr, &pki.ca.pem()).await,
        der(&new_cert)
    );
}

fn delivery(secret: &[u8]) -> String {
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    sign_hs256(
        secret,
        &format!(
            r#"{{"event":"identity_process_created","flow_id":"IPF0a1b2c","account_id":"user-1","process_id":"IDP1","iat":{iat}}}"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_signing_secret_rewritten_in_place_checks_the_next_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("vault");
    std::fs::create_dir(&secrets).unwrap();
    let signing = secrets.join("webhook-signing-secret");
    std::fs::write(&signing, "first-signing-secret").unwrap();
    let b = Watched::start(dir.path(), MASTER_KEY, |c| {
        with_webhooks(c);
        c.webhooks.as_mut().unwrap().signing_secret_file = Some(signing.clone());
    })
    .await;
    let deliver = |body: String| {
        let url = format!("{}/webhooks/truora", b.webhooks.as_ref().unwrap());
        async move {
            send(
                Method::POST,
                &url,
                &[("authorization", &format!("Bearer {WEBHOOK_SECRET}"))],
                &body,
            )
            .await
        }
    };
    assert_eq!(
        deliver(delivery(b"first-signing-secret")).await.status,
        StatusCode::OK
    );
    let r = deliver(delivery(b"second-signing-secret")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    b.wait_for("token_broker_secret_files_watched", 1.0).await;

    // As Vault Agent renders a template: a new file renamed over the old one.
    let rendered = secrets.join(".webhook-signing-secret.tmp");
    std::fs::write(&rendered, "second-signing-secret\n").unwrap();
    std::fs::rename(&rendered, &signing).unwrap();
    b.wait_for(&changes("webhooks.signing_secret_file", "applied"), 1.0)
        .await;
    assert_eq!(
        deliver(delivery(b"second-signing-secret")).await.status,
        StatusCode::OK
    );
    let r = deliver(delivery(b"first-signing-secret")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_files_off_a_changed_file_waits_for_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let mut secret = Mounted::new(
        &dir.path().join("truora"),
        &[("api-key", MASTER_KEY.as_bytes())],
    );
    let b = Watched::start(dir.path(), MASTER_KEY, |c| {
        c.upstream.api_key_file = Some(secret.path("api-key"));
        c.server.watch_files = false;
    })
    .await;
    secret.swap(&[("api-key", ROTATED_KEY.as_bytes())]);
    // Longer than the watcher would take.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(b.metric("token_broker_secret_files_watched").await, 0.0);
    assert_eq!(
        b.metric("token_broker_config_reloads_total{result=\"ok\"}")
            .await,
        0.0
    );
    assert_eq!(b.mint("old-key").await.status, StatusCode::OK);
    assert!(b.sandbox.received().last().unwrap().key_matched);
    let r = send(Method::POST, &format!("{}/admin/reload", b.admin), &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
}
