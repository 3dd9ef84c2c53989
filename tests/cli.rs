//! The `token-broker` binary as operators run it: exit statuses, messages, start-up, shutdown
//! and what it prints. Every process started here is killed when its guard drops.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use token_broker::sandbox::{Fault, Sandbox, SandboxOptions};
use token_broker::secret::SecretDigest;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config_text(listen: u16, admin: u16, upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
shutdown_timeout = "5s"
[upstream]
account_url = "{upstream}"
web_url = "https://identity.truora.com"
timeout = "2s"
[cache]
max_entries = 1000
min_remaining = "15m"
[[clients]]
id = "checkout"
token_sha256 = "{}"
[[clients]]
id = "billing"
token_sha256 = "{}"
"#,
        SecretDigest::of(CHECKOUT_SECRET.as_bytes()).to_hex(),
        SecretDigest::of(BILLING_SECRET.as_bytes()).to_hex(),
    )
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("broker.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the binary to completion (bounded) and returns (status, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("TRUORA_API_KEY")
        .env_remove("TOKEN_BROKER_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Guard(cmd.spawn().unwrap());
    child.0.stdin.take().unwrap().write_all(stdin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            child
                .0
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), out, err);
        }
        assert!(Instant::now() < deadline, "{args:?} did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the process when dropped.
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A long-running broker process whose output is collected as it comes.
struct Running {
    child: Guard,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_command(Command::new(BIN), args, env)
    }

    /// The broker with at most `files` open file descriptors (`ulimit -n`).
    fn spawn_limited(files: u32, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("ulimit -n {files} && exec \"$0\" \"$@\""),
            BIN,
        ]);
        Self::spawn_command(cmd, args, env)
    }

    fn spawn_command(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Self {
        cmd.args(args)
            .env_remove("TRUORA_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Running {
            child: Guard(child),
            out,
            err,
        }
    }

    async fn wait_ready(&self, admin: SocketAddr) {
        let healthy = || async move {
            tokio::net::TcpStream::connect(admin).await.is_ok()
                && send(Method::GET, &format!("http://{admin}/healthz"), &[], "")
                    .await
                    .status
                    == StatusCode::OK
        };
        let what = || format!("broker not ready: {}", self.err.lock().unwrap());
        wait_for(
            Duration::from_secs(20),
            Duration::from_millis(50),
            healthy,
            what,
        )
        .await;
    }

    fn sigterm(&self) {
        self.signal("-TERM");
    }

    fn signal(&self, which: &str) {
        let status = Command::new("kill")
            .args([which, &self.child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "broker did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn output(&self) -> String {
        format!("{}{}", self.out.lock().unwrap(), self.err.lock().unwrap())
    }

    /// The output once `done` holds of it (read from the pipes within 5 s), or as it is then.
    async fn output_when(&self, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let output = self.output();
            if done(&output) || Instant::now() > deadline {
                return output;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn collect(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&buf);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    buf
}

#[test]
fn hash_secret_prints_the_sha256_without_the_trailing_newline() {
    let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let (code, out, _) = run(&["hash-secret"], &[], b"abc\n");
    assert_eq!((code, out.trim()), (0, expected));
    let (code, out, _) = run(&["hash-secret"], &[], b"abc");
    assert_eq!((code, out.trim()), (0, expected));
    let (code, _, err) = run(&["hash-secret"], &[], b"\n");
    assert_eq!(code, 64);
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &config_text(8080, 9090, "https://api.account.truora.com"),
    );
    let (code, out, err) = run(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("TRUORA_API_KEY", MASTER_KEY)],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"));
    assert!(!out.contains(MASTER_KEY) && !err.contains(MASTER_KEY));
}

#[test]
fn check_config_reads_the_path_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &config_text(8080, 9090, "https://api.account.truora.com"),
    );
    let (code, _, err) = run(
        &["check-config"],
        &[
            ("TRUORA_API_KEY", MASTER_KEY),
            ("TOKEN_BROKER_CONFIG", path.to_str().unwrap()),
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.example.toml");
    let (code, _, err) = run(
        &["check-config", "--config", example.to_str().unwrap()],
        &[("TRUORA_API_KEY", MASTER_KEY)],
        b"",
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn check_config_exits_64_naming_the_bad_key() {
    let good = config_text(8080, 9090, "https://api.account.truora.com");
    let cases = [
        (
            good.replace("timeout = \"2s\"", "timeout = \"2s\"\nretries = 3"),
            "retries",
        ),
        (
            good.replace("min_remaining = \"15m\"", "min_remaining = \"soon\""),
            "min_remaining",
        ),
        (
            good.replacen("token_sha256 = \"", "token_sha256 = \"zz", 1),
            "clients[0].token_sha256",
        ),
        (
            good.replace("https://api.account.truora.com", "not a url"),
            "upstream.account_url",
        ),
        (
            good.replace("max_entries = 1000", "max_entries = 0"),
            "cache.max_entries",
        ),
    ];
    for (text, key) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), &text);
        let (code, _, err) = run(
            &["check-config", "--config", path.to_str().unwrap()],
            &[("TRUORA_API_KEY", MASTER_KEY)],
            b"",
        );
        assert_eq!(code, 64, "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn a_parse_error_names_the_line_and_key_but_never_shows_the_line() {
    let good = config_text(8080, 9090, "https://api.account.truora.com");
    let password = "CANARY-redis-password-5d1e";
    for broken in [
        // A typo after the value: the line does not parse.
        format!("[cache.shared]\nurl = \"redis://:{password}@127.0.0.1:6379\" x\n"),
        // A string where a number belongs: the value of the wrong type.
        format!("[cache.shared]\nurl = \"redis://127.0.0.1:6379\"\ntimeout = \"{password}\"\n"),
    ] {
        let text = good.replacen("[[clients]]", &format!("{broken}[[clients]]"), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), &text);
        for command in ["check-config", "serve"] {
            let (code, out, err) = run(
                &[command, "--config", path.to_str().unwrap()],
                &[("TRUORA_API_KEY", MASTER_KEY)],
                b"",
            );
            assert_eq!(code, 64, "{command}: {err}");
            assert!(err.contains("line "), "{command}: {err}");
            assert!(err.contains("cache.shared."), "{command}: {err}");
            assert!(
                !err.contains(password) && !out.contains(password),
                "{command}: {err}"
            );
        }
    }
}

#[test]
fn a_secret_file_other_users_can_read_is_warned_about_not_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    std::fs::write(&key, MASTER_KEY).unwrap();
    let text = config_text(8080, 9090, "https://api.account.truora.com").replace(
        "timeout = \"2s\"",
        &format!("timeout = \"2s\"\napi_key_file = \"{}\"", key.display()),
    );
    let path = write_config(dir.path(), &text);
    for (mode, warned) in [(0o644, true), (0o640, true), (0o600, false), (0o400, false)] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let (code, _, err) = run(
            &["check-config", "--config", path.to_str().unwrap()],
            &[],
            b"",
        );
        assert_eq!(code, 0, "{mode:o}: {err}");
        assert_eq!(
            err.contains("upstream.api_key_file") && err.contains("readable by other users"),
            warned,
            "{mode:o}: {err}"
        );
        assert!(!err.contains(MASTER_KEY));
    }
}

#[test]
fn a_missing_master_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &config_text(8080, 9090, "https://api.account.truora.com"),
    );
    let (code, _, err) = run(
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
        b"",
    );
    assert_eq!(code, 64);
    assert!(err.contains("TRUORA_API_KEY"), "{err}");
    let (code, _, err) = run(&["serve", "--config", path.to_str().unwrap()], &[], b"");
    assert_eq!(code, 64, "{err}");
}

#[test]
fn a_missing_config_file_is_exit_64() {
    let (code, _, err) = run(
        &["check-config", "--config", "/nonexistent/broker.toml"],
        &[("TRUORA_API_KEY", MASTER_KEY)],
        b"",
    );
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent/broker.toml"), "{err}");
}

#[test]
fn serve_refuses_a_bad_config_before_binding_any_socket() {
    // Hold the port the config names: a broker that bound first would fail with "cannot
    // listen" (exit 1); one that validates first reports the bad key (exit 64).
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let text = config_text(port, free_port(), "https://api.account.truora.com").replacen(
        "token_sha256 = \"",
        "token_sha256 = \"x",
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &text);
    let (code, _, err) = run(
        &["serve", "--config", path.to_str().unwrap()],
        &[("TRUORA_API_KEY", MASTER_KEY)],
        b"",
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("clients[0].token_sha256"), "{err}");
    assert!(!err.contains("cannot listen"), "{err}");
}

/// Out of file descriptors, accepting fails: the broker backs off instead of spinning, says so
/// at most every 10 s, warned at start that its limit was too low for its caps, and answers
/// again as soon as descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_broker_backs_off_with_a_bounded_log_and_recovers() {
    let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
        .await
        .unwrap();
    let (listen, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config_text(listen, admin, &sandbox.url()));
    let broker = Running::spawn_limited(
        64,
        &["serve", "--config", path.to_str().unwrap()],
        &[("TRUORA_API_KEY", MASTER_KEY)],
    );
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    broker.wait_ready(admin_addr).await;
    assert!(
        broker.output().contains("the open-file limit is 64"),
        "no warning about the limit: {}",
        broker.output()
    );
    // Hold more connections than the process has descriptors left.
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", listen)).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failures = broker.output().matches("accept failed").count();
    assert!(
        (1..=2).contains(&failures),
        "{failures} accept-failure lines in 3 s:\n{}",
        broker.output()
    );
    drop(held);
    wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async move {
            tokio::net::TcpStream::connect(admin_addr).await.is_ok()
                && send(
                    Method::GET,
                    &format!("http://{admin_addr}/healthz"),
                    &[],
                    "",
                )
                .await
                .status
                    == StatusCode::OK
        },
        || "the admin listener did not answer again".to_owned(),
    )
    .await;
    let r = send(
        Method::POST,
        &format!("http://127.0.0.1:{listen}/v1/tokens"),
        &[
            ("authorization", &format!("Bearer {CHECKOUT_SECRET}")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        FORM,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_drains_in_flight_requests_on_sigterm_and_leaks_no_secret() {
    let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
        .await
        .unwrap();
    let (listen, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config_text(listen, admin, &sandbox.url()));
    let mut broker = Running::spawn(
        &["serve", "--config", path.to_str().unwrap()],
        &[("TRUORA_API_KEY", MASTER_KEY), ("RUST_LOG", "trace")],
    );
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    broker.wait_ready(admin_addr).await;
    let url = format!("http://127.0.0.1:{listen}/v1/tokens");
    let post = |secret: &'static str, form: String| {
        let url = url.clone();
        async move {
            send(
                Method::POST,
                &url,
                &[
                    ("authorization", &format!("Bearer {secret}")),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                &form,
            )
            .await
        }
    };

    // Exercise success and every failure path so that their log lines are written.
    assert_eq!(
        post(CHECKOUT_SECRET, FORM.into()).await.status,
        StatusCode::OK
    );
    for (i, fault) in [
        Fault::Status(401),
        Fault::Status(500),
        Fault::Body("x".into()),
    ]
    .into_iter()
    .enumerate()
    {
        sandbox.set_fault(Some(fault));
        let r = post(CHECKOUT_SECRET, FORM.replace("user-1", &format!("f{i}"))).await;
        assert!(r.status.is_server_error());
    }
    sandbox.set_fault(None);
    assert_eq!(
        post("wrong", FORM.into()).await.status,
        StatusCode::UNAUTHORIZED
    );

    // A slow mint in flight when SIGTERM arrives still completes.
    sandbox.set_options(|o| o.delay = Duration::from_millis(1500));
    let in_flight = tokio::spawn(post(CHECKOUT_SECRET, FORM.replace("user-1", "slow")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.sigterm();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(broker.exit_code().await, 0);

    // Every line is written by the time the process ends: the last one logged, and every
    // request's access line (which runtime workers write in batches), the slow one's included.
    let access = |o: &str| {
        o.lines()
            .filter(|l| l.contains(" access: request "))
            .count()
    };
    let stopped = |o: &str| o.lines().any(|l| l.ends_with(" stopped"));
    let output = broker.output_when(|o| stopped(o) && access(o) >= 6).await;
    assert!(stopped(&output), "{output}");
    assert_eq!(access(&output), 6, "{output}");
    assert!(output.contains("callers=2"), "{output}");
    assert!(output.contains(&format!("127.0.0.1:{listen}")), "{output}");
    assert_no_secret_in(&output);
    assert!(!output.contains("eyJ"), "a token in the logs");
    // Every mint has an audit line: caller, flow and a one-way user tag, never the user's id.
    let audit = output
        .lines()
        .find(|l| l.contains("token minted"))
        .expect("an audit line");
    assert!(
        audit.contains("caller=\"checkout\"") || audit.contains("caller=checkout"),
        "{audit}"
    );
    assert!(audit.contains("IPF0a1b2c"), "{audit}");
    assert!(audit.contains("user="), "{audit}");
    assert!(!output.contains("user-1"), "a user id in the logs");
    // New connections are refused once it has stopped.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", listen))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_turns_core_dumps_off_and_reloads_on_sighup() {
    let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
        .await
        .unwrap();
    let (listen, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(listen, admin, &sandbox.url());
    let path = write_config(dir.path(), &text);
    let broker = Running::spawn(
        &["serve", "--config", path.to_str().unwrap()],
        &[("TRUORA_API_KEY", MASTER_KEY)],
    );
    broker
        .wait_ready(SocketAddr::from(([127, 0, 0, 1], admin)))
        .await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", broker.child.0.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    assert_eq!(core.split_whitespace().nth(5), Some("0"), "{core}");

    let newcomer = "newcomer-secret-0123456789abcdef";
    let url = format!("http://127.0.0.1:{listen}/v1/tokens");
    let post = |secret: &str| {
        let url = url.clone();
        let auth = format!("Bearer {secret}");
        async move {
            send(
                Method::POST,
                &url,
                &[
                    ("authorization", auth.as_str()),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                FORM,
            )
            .await
        }
    };
    assert_eq!(post(newcomer).await.status, StatusCode::UNAUTHORIZED);
    let more = format!(
        "{text}\n[[clients]]\nid = \"newcomer\"\ntoken_sha256 = \"{}\"\n",
        SecretDigest::of(newcomer.as_bytes()).to_hex()
    );
    std::fs::write(&path, more).unwrap();
    broker.signal("-HUP");
    wait_for(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let answer = post(newcomer);
            async move { answer.await.status == StatusCode::OK }
        },
        || format!("SIGHUP did not reload: {}", broker.output()),
    )
    .await;
    // The log line is collected by a reader thread: give it a moment.
    wait_for(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || std::future::ready(broker.output().contains("configuration reloaded")),
        || format!("no reload log line: {}", broker.output()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_needs_nothing_else_and_prints_working_curl_commands() {
    let (listen, admin, sandbox, hooks) = (free_port(), free_port(), free_port(), free_port());
    let mut demo = Running::spawn(
        &[
            "demo",
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--sandbox-listen",
            &format!("127.0.0.1:{sandbox}"),
            "--webhook-listen",
            &format!("127.0.0.1:{hooks}"),
        ],
        &[],
    );
    demo.wait_ready(SocketAddr::from(([127, 0, 0, 1], admin)))
        .await;
    wait_for(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || std::future::ready(demo.out.lock().unwrap().contains("Ctrl-C")),
        || format!("no instructions: {}", demo.output()),
    )
    .await;
    let printed = demo.out.lock().unwrap().clone();
    assert!(printed.contains(&format!(
        "curl -s -X POST http://127.0.0.1:{listen}/v1/tokens"
    )));
    let url = format!("http://127.0.0.1:{listen}/v1/tokens");
    let headers = [
        ("authorization", "Bearer demo-secret"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let form = "country=CO&flow_id=IPF0123456789abcdef&redirect_url=https://example.com/done&account_id=demo-user-1";
    let first = send(Method::POST, &url, &headers, form).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let second = send(Method::POST, &url, &headers, form).await;
    assert_eq!(second.json()["cache"], "hit");
    assert_eq!(first.json()["api_key"], second.json()["api_key"]);
    // The sandbox's identity page answers the identity_url.
    let page = send(
        Method::GET,
        first.json()["identity_url"].as_str().unwrap(),
        &[],
        "",
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("Decline"), "{}", page.text());
    // Declining there ends the process: the sandbox delivers the signed webhook to the demo's
    // webhook listener, and the next request is a new process.
    let token = first.json()["api_key"].as_str().unwrap().to_owned();
    let finished = send(
        Method::POST,
        &format!("http://127.0.0.1:{sandbox}/sandbox/processes/finish"),
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("outcome=decline&token={token}"),
    )
    .await;
    assert_eq!(finished.status, StatusCode::OK, "{}", finished.text());
    assert_eq!(finished.json()["status"], "failure");
    assert_eq!(
        finished.json()["webhook"]["status"],
        200,
        "{}",
        finished.text()
    );
    let third = send(Method::POST, &url, &headers, form).await;
    assert_eq!(third.json()["cache"], "miss");
    assert_ne!(third.json()["api_key"], first.json()["api_key"]);
    assert!(printed.contains(&format!(
        "http://127.0.0.1:{sandbox}/sandbox/processes/finish"
    )));
    let throttled = send(
        Method::POST,
        &url,
        &headers,
        &form.replace("IPF0123456789abcdef", "IPFsandbox429"),
    )
    .await;
    assert_eq!(throttled.status, StatusCode::SERVICE_UNAVAILABLE);
    demo.sigterm();
    assert_eq!(demo.exit_code().await, 0);
}
