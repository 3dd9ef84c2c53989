//! `[cache.shared]` on the Redis that platform teams run, against real servers from Debian's
//! redis-server package (tests/install-deps.sh installs it, with redis-cli): a three-master
//! Redis Cluster, a primary with a replica behind a Sentinel, and a standalone Redis for the
//! fleet limits and the key rotation. Every server is started here on free loopback ports in a
//! temporary directory, without persistence, and killed at the end (also when a test fails:
//! `kill_on_drop`). Every wait is bounded.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, free_port, post_tokens, send, wait_for, CHECKOUT_SECRET, FORM, MASTER_KEY};
use http::{Method, StatusCode};
use token_broker::app::Broker as Server;
use token_broker::cache::{Filter, Reason};
use token_broker::config::{Config, SharedCacheConfig};
use token_broker::issuance::{Issuer, TokenRequest};
use token_broker::sandbox::{Fault, Sandbox, SandboxOptions};
use token_broker::secret::MasterKey;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Every test as a whole is bounded by this.
const TEST_BOUND: Duration = Duration::from_secs(120);
const OLD_KEY: &str = "3c1f0e5a9b7d2c4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e";
const NEW_KEY: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9";
const FLOW: &str = "IPF0a1b2c";

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_BOUND, f)
        .await
        .expect("the test outlived its bound");
}

/// A redis-server (or sentinel) of our own, killed when dropped.
struct Node {
    child: Option<Child>,
    port: u16,
    /// Its `requirepass`, if any.
    password: Option<String>,
}

impl Node {
    /// Starts `redis-server` on `port` with `args` after the common ones, in `dir`.
    async fn start(dir: &Path, port: u16, args: &[&str]) -> Self {
        Self::start_with(dir, port, args, None).await
    }

    /// [`Node::start`] with a password (`requirepass`, and `masterauth` for its replication).
    async fn start_with(dir: &Path, port: u16, args: &[&str], password: Option<&str>) -> Self {
        let dir = dir.join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .args(password.map_or(vec![], |pw| vec!["--requirepass", pw, "--masterauth", pw]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): tests/install-deps.sh installs it")
            });
        let node = Node {
            child: Some(child),
            port,
            password: password.map(Into::into),
        };
        node.wait_up().await;
        node
    }

    /// Starts a sentinel on `port` monitoring the primary on `primary` as `mymaster`, with
    /// its own password and the data nodes'.
    async fn sentinel(dir: &Path, port: u16, primary: u16, own: &str, data: &str) -> Self {
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nrequirepass {own}\n\
                 sentinel monitor mymaster 127.0.0.1 {primary} 1\nsentinel auth-pass mymaster {data}\n\
                 sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let node = Node {
            child: Some(child),
            port,
            password: Some(own.into()),
        };
        node.wait_up().await;
        node
    }

    async fn wait_up(&self) {
        let port = self.port;
        wait_for(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async move { self.query::<String>(&redis::cmd("PING")).await.is_ok() },
            || format!("redis-server on {port} did not come up"),
        )
        .await;
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }
}

impl Node {
    /// One command to this node itself (no cluster routing), within 2 s.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        query_as(self.port, self.password.as_deref(), cmd).await
    }
}

/// One command to the node on `port` itself (no cluster routing), within 2 s.
async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    query_as(port, None, cmd).await
}

async fn query_as<T: redis::FromRedisValue>(
    port: u16,
    password: Option<&str>,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    let auth = password.map_or(String::new(), |pw| format!(":{pw}@"));
    let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}"))?;
    let timed_out = || redis::RedisError::from(std::io::Error::other("timed out"));
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| timed_out())??;
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
        .await
        .map_err(|_| timed_out())?
}

/// Three masters, no replicas, made one cluster with redis-cli.
async fn cluster(dir: &Path) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let (port, bus) = (free_port(), free_port());
        let conf = dir.join(format!("nodes-{port}.conf"));
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus.to_string(),
            "--cluster-config-file",
            conf.to_str().unwrap(),
            "--cluster-node-timeout",
            "2000",
        ];
        nodes.push(Node::start(dir, port, &args).await);
    }
    let mut create = Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port));
    }
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("redis-cli --cluster create took over 30 s")
    .unwrap_or_else(|e| {
        panic!("cannot run redis-cli ({e}): tests/install-deps.sh installs redis-tools")
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in &nodes {
        let port = n.port;
        wait_for(
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async move {
                query::<String>(port, redis::cmd("CLUSTER").arg("INFO"))
                    .await
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            },
            || format!("the cluster never became ok on {port}"),
        )
        .await;
    }
    nodes
}

/// A broker in this process, with its issuer at hand.
struct Replica {
    url: String,
    admin: String,
    issuer: Arc<Issuer>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn start(
        upstream: &str,
        shared: SharedCacheConfig,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut cfg = config(upstream);
        cfg.cache.shared = Some(shared);
        tweak(&mut cfg);
        cfg.validate().unwrap();
        let server = Server::from_config(&cfg, MasterKey::new(MASTER_KEY).unwrap())
            .await
            .unwrap();
        let issuer = Arc::clone(&server.state().issuer);
        let url = format!("http://{}", server.caller_addr().unwrap());
        let admin = format!("http://{}", server.admin_addr().unwrap());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Replica {
            url,
            admin,
            issuer,
            stop: Some(stop),
            task,
        }
    }

    async fn tokens(&self, form: &str) -> common::Resp {
        post_tokens(&self.url, CHECKOUT_SECRET, form).await
    }

    async fn delete(&self, query: &str) -> common::Resp {
        send(
            Method::DELETE,
            &format!("{}/v1/tokens?{query}", self.url),
            &[("authorization", &format!("Bearer {CHECKOUT_SECRET}"))],
            "",
        )
        .await
    }

    async fn metrics(&self) -> String {
        send(Method::GET, &format!("{}/metrics", self.admin), &[], "")
            .await
            .text()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `[cache.shared]` section: `body` plus the key files and short timeouts.
fn section(dir: &Path, body: &str, key: &str, previous: &[&str]) -> SharedCacheConfig {
    let write = |name: String, hex: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        path.display().to_string()
    };
    let current = write(format!("key-{}", &key[..8]), key);
    let previous: Vec<String> = previous
        .iter()
        .map(|k| format!("\"{}\"", write(format!("key-{}", &k[..8]), k)))
        .collect();
    let text = format!(
        "[cache.shared]\n{body}\nencryption_key_file = \"{current}\"\nprevious_encryption_key_files = [{}]\n\
         timeout = \"300ms\"\nbreaker_cooldown = \"500ms\"\n[[clients]]\nid = \"c\"\ntoken_sha256 = \"{}\"\n",
        previous.join(", "),
        "0".repeat(64)
    );
    Config::parse(&text).unwrap().cache.shared.unwrap()
}

fn form_for(user: &str) -> String {
    FORM.replace("user-1", user)
}

fn cache_key_hex(form: &str) -> String {
    let req = TokenRequest::from_form(form.as_bytes()).unwrap();
    token_broker::secret::hex(&token_broker::issuance::key::key("checkout", &req))
}

fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in the scrape"))
}

const REMOTE: &str = r#"token_broker_shared_cache_invalidations_total{origin="remote"}"#;

async fn remote_invalidations(r: &Replica) -> f64 {
    value(&r.metrics().await, REMOTE)
}

/// Waits until `r` has applied an invalidation from another replica since it counted `before`.
async fn hears(r: &Replica, before: f64) {
    wait_for(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async move { remote_invalidations(r).await > before },
        || "the other replica never heard of the invalidation".to_owned(),
    )
    .await;
}

async fn all_ok(replicas: &[&Replica], forms: Vec<String>) -> Vec<common::Resp> {
    let mut tasks = Vec::new();
    for (i, form) in forms.into_iter().enumerate() {
        let url = replicas[i % replicas.len()].url.clone();
        tasks.push(tokio::spawn(async move {
            post_tokens(&url, CHECKOUT_SECRET, &form).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        out.push(r);
    }
    out
}

/// One cluster for the whole of its checks: one mint for 500 requests, keys on every master,
/// invalidations (a caller's DELETE, and a drop by flow and user across callers) on both
/// replicas, a DELETE during a mint in flight, and the topology series.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_shares_one_mint_spreads_keys_and_invalidates_everywhere() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let nodes = cluster(dir.path()).await;
        let seeds: Vec<String> = nodes
            .iter()
            .take(2)
            .map(|n| format!("\"redis://127.0.0.1:{}\"", n.port))
            .collect();
        let body = format!("mode = \"cluster\"\nnodes = [{}]", seeds.join(", "));
        let mut options = SandboxOptions::new(MASTER_KEY);
        options.delay = Duration::from_millis(200);
        let sandbox = Sandbox::start(options).await.unwrap();
        let tweak = |c: &mut Config| c.upstream.mint_rate = 100_000;
        let a = Replica::start(
            &sandbox.url(),
            section(dir.path(), &body, OLD_KEY, &[]),
            tweak,
        )
        .await;
        let b = Replica::start(
            &sandbox.url(),
            section(dir.path(), &body, OLD_KEY, &[]),
            tweak,
        )
        .await;

        // 500 identical requests across both replicas: one upstream mint.
        let answers = all_ok(&[&a, &b], vec![FORM.to_owned(); 500]).await;
        let tokens: std::collections::BTreeSet<_> = answers
            .iter()
            .map(|r| r.json()["api_key"].clone().to_string())
            .collect();
        assert_eq!(tokens.len(), 1);
        assert_eq!(sandbox.calls(), 1, "one upstream call for the whole fleet");

        // Many users' tokens land on all three masters (the value's hash tag is its key).
        sandbox.set_options(|o| o.delay = Duration::ZERO);
        all_ok(
            &[&a, &b],
            (0..60).map(|i| form_for(&format!("spread-{i}"))).collect(),
        )
        .await;
        for n in &nodes {
            let keys: Vec<String> = query(n.port, redis::cmd("KEYS").arg("token-broker:tok:{*}"))
                .await
                .unwrap();
            assert!(
                keys.len() >= 3,
                "master {} holds {} values",
                n.port,
                keys.len()
            );
        }
        // The value and its lock share a slot, and so do the invalidation log's keys.
        let port = nodes[0].port;
        let slot = |key: String| async move {
            query::<i64>(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
                .await
                .unwrap()
        };
        let member = cache_key_hex(FORM);
        assert_eq!(
            slot(format!("token-broker:tok:{{{member}}}")).await,
            slot(format!("token-broker:lock:{{{member}}}")).await
        );

        // A caller's DELETE reaches Redis and the other replica.
        let u = form_for("deleted-by-caller");
        let t1 = a.tokens(&u).await.json()["api_key"].clone();
        assert_eq!(b.tokens(&u).await.header("x-cache"), "HIT");
        let heard = remote_invalidations(&b).await;
        let del = a.delete("account_id=deleted-by-caller").await;
        assert_eq!(del.status, StatusCode::OK, "{}", del.text());
        assert_eq!(del.json()["invalidated"], 1);
        hears(&b, heard).await;
        let again = b.tokens(&u).await;
        assert_eq!(again.header("x-cache"), "MISS", "{}", again.text());
        assert_ne!(again.json()["api_key"], t1);

        // A drop by flow and user across callers (the process-lifecycle webhook's): both
        // replicas, and Redis, forget the user's token.
        let w = form_for("dropped-by-webhook");
        let t2 = a.tokens(&w).await.json()["api_key"].clone();
        assert_eq!(b.tokens(&w).await.header("x-cache"), "HIT");
        let filter = Filter::of(None, Some(FLOW), Some("dropped-by-webhook"));
        let heard = remote_invalidations(&a).await;
        let dropped = b
            .issuer
            .invalidate_everywhere(&filter, Reason::Webhook)
            .await
            .unwrap();
        assert_eq!(dropped.tokens, 1);
        hears(&a, heard).await;
        for r in [&a, &b] {
            let next = r.tokens(&w).await;
            assert_ne!(next.json()["api_key"], t2, "the dropped token came back");
        }

        // A DELETE while a mint is in flight wins on both replicas.
        sandbox.set_options(|o| o.delay = Duration::from_millis(600));
        let f = form_for("in-flight");
        let url = a.url.clone();
        let in_flight = {
            let f = f.clone();
            tokio::spawn(async move { post_tokens(&url, CHECKOUT_SECRET, &f).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            b.delete("account_id=in-flight").await.status,
            StatusCode::OK
        );
        let old = in_flight.await.unwrap().json()["api_key"].clone();
        sandbox.set_options(|o| o.delay = Duration::ZERO);
        for r in [&a, &b] {
            assert_ne!(
                r.tokens(&f).await.json()["api_key"],
                old,
                "the deleted token came back"
            );
        }

        // The series say cluster, three masters and every slot served.
        let scrape = a.metrics().await;
        assert_eq!(
            value(&scrape, r#"token_broker_shared_cache_mode{mode="cluster"}"#),
            1.0
        );
        assert_eq!(
            value(
                &scrape,
                r#"token_broker_shared_cache_nodes{role="primary"}"#
            ),
            3.0
        );
        assert_eq!(
            value(&scrape, "token_broker_shared_cache_cluster_slots"),
            16384.0
        );
        assert_eq!(
            value(
                &scrape,
                r#"token_broker_shared_cache_lookups_total{result="error"}"#
            ),
            0.0
        );
        a.stop().await;
        b.stop().await;
        drop(nodes);
    })
    .await;
}

/// A primary, its replica and a sentinel: the primary is killed while requests run. No request
/// fails (Redis failing means minting without it), and once Sentinel has promoted the replica,
/// the brokers follow it by themselves: a token minted on one is a shared hit on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_brokers_follow_a_sentinel_failover_and_no_request_fails() {
    bounded(async {
        // The data nodes and the sentinel each have a password of their own.
        const DATA_PW: &str = "data-node-pw-4f1c";
        const SENTINEL_PW: &str = "sentinel-pw-9b2e";
        let dir = tempfile::tempdir().unwrap();
        let mut primary = Node::start_with(dir.path(), free_port(), &[], Some(DATA_PW)).await;
        let primary_port = primary.port.to_string();
        let replica = Node::start_with(
            dir.path(),
            free_port(),
            &["--replicaof", "127.0.0.1", &primary_port],
            Some(DATA_PW),
        )
        .await;
        let sentinel =
            Node::sentinel(dir.path(), free_port(), primary.port, SENTINEL_PW, DATA_PW).await;
        // The sentinel knows the replica before the primary goes.
        let (sentinel_ref, primary_ref) = (&sentinel, &primary);
        wait_for(
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async move {
                let info: String = primary_ref
                    .query(redis::cmd("INFO").arg("replication"))
                    .await
                    .unwrap_or_default();
                let replicas: Vec<redis::Value> = sentinel_ref
                    .query(redis::cmd("SENTINEL").arg("REPLICAS").arg("mymaster"))
                    .await
                    .unwrap_or_default();
                info.contains("connected_slaves:1") && !replicas.is_empty()
            },
            || "the replica never synced, or the sentinel never saw it".to_owned(),
        )
        .await;

        let secret = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{text}\n")).unwrap();
            path.display().to_string()
        };
        let body = format!(
            "mode = \"sentinel\"\nnodes = [\"redis://127.0.0.1:{}\"]\nsentinel_master = \"mymaster\"\n\
             password_file = \"{}\"\nsentinel_password_file = \"{}\"",
            sentinel.port,
            secret("data-pw", DATA_PW),
            secret("sentinel-pw", SENTINEL_PW)
        );
        let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY)).await.unwrap();
        let tweak = |c: &mut Config| c.upstream.mint_rate = 100_000;
        let a = Replica::start(&sandbox.url(), section(dir.path(), &body, OLD_KEY, &[]), tweak).await;
        let b = Replica::start(&sandbox.url(), section(dir.path(), &body, OLD_KEY, &[]), tweak).await;
        let first = a.tokens(&form_for("before")).await;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(b.tokens(&form_for("before")).await.header("x-cache"), "HIT");
        assert!(a.issuer.shared().unwrap().primary().unwrap().ends_with(&primary_port));

        // Requests keep coming while the primary is killed: every one is answered 200.
        let urls = (a.url.clone(), b.url.clone());
        let load = tokio::spawn(async move {
            let mut answered = 0;
            for i in 0..60 {
                let form = form_for(&format!("during-{i}"));
                for url in [&urls.0, &urls.1] {
                    let r = post_tokens(url, CHECKOUT_SECRET, &form).await;
                    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                    answered += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answered
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        primary.kill().await;
        assert_eq!(load.await.unwrap(), 120, "no request failed");

        // Sentinel promotes the replica...
        let replica_port = replica.port.to_string();
        let rp = replica_port.clone();
        wait_for(
            Duration::from_secs(30),
            Duration::from_millis(200),
            || {
                let rp = rp.clone();
                async move {
                    let addr: Vec<String> = sentinel_ref
                        .query(
                            redis::cmd("SENTINEL")
                                .arg("GET-MASTER-ADDR-BY-NAME")
                                .arg("mymaster"),
                        )
                        .await
                        .unwrap_or_default();
                    addr.get(1) == Some(&rp)
                }
            },
            || "Sentinel never promoted the replica".to_owned(),
        )
        .await;
        // ...and the brokers share through it again by themselves.
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0.. {
            let form = form_for(&format!("after-{i}"));
            assert_eq!(a.tokens(&form).await.status, StatusCode::OK);
            let r = b.tokens(&form).await;
            assert_eq!(r.status, StatusCode::OK);
            if r.header("x-cache") == "HIT" {
                break;
            }
            assert!(Instant::now() < deadline, "the brokers never shared through the new primary");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(a.issuer.shared().unwrap().primary().unwrap().ends_with(&replica_port));
        let changes = "token_broker_shared_cache_topology_changes_total";
        assert!(value(&a.metrics().await, changes) + value(&b.metrics().await, changes) >= 1.0);
        let scrape = a.metrics().await + &b.metrics().await;
        assert_eq!(
            value(&scrape, r#"token_broker_shared_cache_mode{mode="sentinel"}"#),
            1.0
        );
        assert!(!scrape.contains(DATA_PW) && !scrape.contains(SENTINEL_PW));
        a.stop().await;
        b.stop().await;
        drop((replica, sentinel));
    })
    .await;
}

/// A standalone Redis for the fleet limits and the key rotation.
async fn standalone(dir: &Path) -> (Node, String) {
    let node = Node::start(dir, free_port(), &[]).await;
    let body = format!("url = \"redis://127.0.0.1:{}\"", node.port);
    (node, body)
}

/// The same burst of distinct misses sent to two replicas gets no more upstream mints than one
/// replica alone would allow (`upstream.mint_rate` a second, bursts of one second's worth);
/// with Redis gone, each replica applies its own budget and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mint_budget_holds_for_the_fleet_and_falls_back_to_local_without_redis() {
    bounded(async {
        const RATE: u32 = 3;
        let dir = tempfile::tempdir().unwrap();
        let (mut redis, body) = standalone(dir.path()).await;
        let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
            .await
            .unwrap();
        let tweak = |c: &mut Config| c.upstream.mint_rate = RATE;
        let a = Replica::start(
            &sandbox.url(),
            section(dir.path(), &body, OLD_KEY, &[]),
            tweak,
        )
        .await;
        let b = Replica::start(
            &sandbox.url(),
            section(dir.path(), &body, OLD_KEY, &[]),
            tweak,
        )
        .await;

        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..20 {
            for r in [&a, &b] {
                let (url, form) = (r.url.clone(), form_for(&format!("burst-{i}")));
                tasks.push(tokio::spawn(async move {
                    post_tokens(&url, CHECKOUT_SECRET, &form).await
                }));
            }
        }
        let mut refused = 0;
        for t in tasks {
            let r = t.await.unwrap();
            if r.status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(r.json()["error"], "mint_budget_exceeded");
                assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
                refused += 1;
            } else {
                assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            }
        }
        let took = started.elapsed().as_secs_f64();
        // One replica alone allows its burst and what refills while the burst lasts; two
        // replicas each with their own budget would allow twice the burst.
        let one_alone = f64::from(RATE) + (f64::from(RATE) * took).ceil();
        let mints = sandbox.calls() as f64;
        assert!(
            mints >= 1.0 && mints <= one_alone,
            "{mints} mints, one replica allows {one_alone} in {took:.2}s"
        );
        assert!(refused >= 1);
        let decided =
            r#"token_broker_fleet_limit_decisions_total{result="global_budget",source="redis"}"#;
        assert!(value(&a.metrics().await, decided) + value(&b.metrics().await, decided) >= 1.0);
        assert_eq!(
            value(&a.metrics().await, "token_broker_fleet_limits_fallback"),
            0.0
        );

        // Redis gone: the local budget applies (a mint still goes through) and the metric says so.
        redis.kill().await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = a.tokens(&form_for("without-redis")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let scrape = a.metrics().await;
        assert_eq!(value(&scrape, "token_broker_fleet_limits_fallback"), 1.0);
        assert!(
            value(
                &scrape,
                r#"token_broker_fleet_limit_decisions_total{result="allowed",source="local"}"#
            ) >= 1.0
        );
        a.stop().await;
        b.stop().await;
    })
    .await;
}

/// A 429 with `Retry-After` seen by one replica makes the other answer 503 with `Retry-After`
/// without calling Truora: the window is in Redis for every mint, and published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_seen_by_one_replica_throttles_the_other_without_a_call() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (_redis, body) = standalone(dir.path()).await;
        let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
            .await
            .unwrap();
        let a = Replica::start(
            &sandbox.url(),
            section(dir.path(), &body, OLD_KEY, &[]),
            |_| {},
        )
        .await;
        let b = Replica::start(
            &sandbox.url(),
            section(dir.path(), &body, OLD_KEY, &[]),
            |_| {},
        )
        .await;
        sandbox.fail_next(Fault::Throttle(30), 1);
        let r = a.tokens(&form_for("first")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert_eq!(r.json()["error"], "upstream_throttled");
        assert_eq!(sandbox.calls(), 1);

        let r = b.tokens(&form_for("second")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert_eq!(r.json()["error"], "upstream_throttled");
        let left: u64 = r.header("retry-after").parse().unwrap();
        assert!((20..=30).contains(&left), "Retry-After: {left}");
        assert_eq!(sandbox.calls(), 1, "the other replica did not call Truora");

        // The published window reaches B's own guard too (its /readyz and gauge say so).
        wait_for(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async {
                value(
                    &b.metrics().await,
                    r#"token_broker_fleet_throttle_windows_total{origin="remote"}"#,
                ) >= 1.0
            },
            || "B never heard of A's throttle window".to_owned(),
        )
        .await;
        assert!(
            value(
                &b.metrics().await,
                "token_broker_upstream_throttle_remaining_seconds"
            ) > 20.0
        );
        assert_eq!(
            value(
                &a.metrics().await,
                r#"token_broker_fleet_throttle_windows_total{origin="local"}"#
            ),
            1.0
        );
        a.stop().await;
        b.stop().await;
    })
    .await;
}

/// A token sealed under the old key is served by a replica started with the new key and the
/// old one as previous, with no mint; it is sealed again under the new key; and invalidations
/// still find what was written under the old key's tags, on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_rotation_serves_old_values_without_a_mint_and_keeps_invalidating() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (_redis, body) = standalone(dir.path()).await;
        let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
            .await
            .unwrap();
        let url = sandbox.url();
        let old = Replica::start(&url, section(dir.path(), &body, OLD_KEY, &[]), |_| {}).await;
        let (u, v) = (form_for("rotated"), form_for("deleted-across"));
        let t = old.tokens(&u).await.json()["api_key"].clone();
        old.tokens(&v).await;
        assert_eq!(sandbox.calls(), 2);

        let rotating = Replica::start(
            &url,
            section(dir.path(), &body, NEW_KEY, &[OLD_KEY]),
            |_| {},
        )
        .await;
        let r = rotating.tokens(&u).await;
        assert_eq!(r.header("x-cache"), "HIT", "{}", r.text());
        assert_eq!(r.json()["api_key"], t);
        assert_eq!(sandbox.calls(), 2, "no mint");
        assert_eq!(
            value(
                &rotating.metrics().await,
                "token_broker_shared_cache_reseals_total"
            ),
            1.0
        );

        // Sealed again under the new key: a replica holding only the new key reads it too.
        let new = Replica::start(&url, section(dir.path(), &body, NEW_KEY, &[]), |_| {}).await;
        let r = new.tokens(&u).await;
        assert_eq!(r.header("x-cache"), "HIT", "{}", r.text());
        assert_eq!(r.json()["api_key"], t);
        assert_eq!(sandbox.calls(), 2);

        // The value of `v` was written (and indexed) under the old key alone: a DELETE on the
        // rotating replica still finds it in Redis, and the replica on the old key alone drops
        // its own copy (the message is sent under both keys).
        assert_eq!(old.tokens(&v).await.header("x-cache"), "HIT");
        let heard = remote_invalidations(&old).await;
        let del = rotating.delete("account_id=deleted-across").await;
        assert_eq!(del.status, StatusCode::OK, "{}", del.text());
        assert_eq!(
            del.json()["invalidated"],
            1,
            "found under the old key's index"
        );
        hears(&old, heard).await;
        let calls = sandbox.calls();
        assert_eq!(old.tokens(&v).await.header("x-cache"), "MISS");
        assert_eq!(sandbox.calls(), calls + 1);

        // And an invalidation from the replica on the old key alone wins on the rotating one:
        // recorded under the old key's tags, checked under every key's.
        assert_eq!(rotating.tokens(&u).await.header("x-cache"), "HIT");
        let heard = remote_invalidations(&rotating).await;
        assert_eq!(
            old.delete("account_id=rotated").await.status,
            StatusCode::OK
        );
        hears(&rotating, heard).await;
        let r = rotating.tokens(&u).await;
        assert_ne!(r.json()["api_key"], t, "the invalidated token came back");
        for r in [old, rotating, new] {
            r.stop().await;
        }
    })
    .await;
}
