//! `[cache.shared]` against a real redis-server (Debian's package; .ci/run installs it): each test
//! starts its own on a free loopback port in a temporary directory, without persistence, and
//! stops it at the end. Two brokers in this process share that Redis and one sandbox Truora.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    config, free_port, post_tokens, send, wait_for, wait_for_port, with_webhooks, Process,
    CHECKOUT_SECRET, FORM, MASTER_KEY, WEBHOOK_SECRET,
};
use http::{Method, StatusCode};
use redis::AsyncCommands;
use token_broker::config::{Config, SharedCacheConfig};
use token_broker::issuance::TokenRequest;
use token_broker::sandbox::{sign_hs256, ClaimNames, Sandbox, SandboxOptions, WebhookTarget};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Every test as a whole is bounded by this.
const TEST_BOUND: Duration = Duration::from_secs(90);
const ENCRYPTION_KEY: &str = "3c1f0e5a9b7d2c4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e";

/// A redis-server of our own: loopback, a free port, a temporary directory, no persistence.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
}

impl Redis {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    async fn start_with(password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir,
            password: password.map(Into::into),
        };
        r.restart().await;
        r
    }

    /// (Re)starts the server on the same port.
    async fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): .ci/run installs it (apt-get install redis-server)")
        });
        self.child = Some(child);
        let this = &*self;
        let answers = || async move {
            match this.conn().await {
                Ok(mut c) => redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        };
        let what = || "redis-server did not come up".to_owned();
        wait_for(
            Duration::from_secs(10),
            Duration::from_millis(50),
            answers,
            what,
        )
        .await;
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(self.url().as_str())?;
        if let Some(pw) = &self.password {
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::other("connect timed out")))?
    }

    /// The `[cache.shared]` section for this server, its key in a file of `dir`.
    fn section(&self, dir: &Path) -> SharedCacheConfig {
        let key_file = dir.join("cache-key");
        std::fs::write(&key_file, format!("{ENCRYPTION_KEY}\n")).unwrap();
        let mut text = format!(
            "[cache.shared]\nurl = \"{}\"\nencryption_key_file = \"{}\"\ntimeout = \"200ms\"\nbreaker_cooldown = \"500ms\"\n",
            self.url(),
            key_file.display()
        );
        if let Some(pw) = &self.password {
            let pw_file = dir.join("redis-password");
            std::fs::write(&pw_file, format!("{pw}\n")).unwrap();
            text.push_str(&format!("password_file = \"{}\"\n", pw_file.display()));
        }
        text.push_str(&format!(
            "[[clients]]\nid = \"c\"\ntoken_sha256 = \"{}\"\n",
            "0".repeat(64)
        ));
        Config::parse(&text).unwrap().cache.shared.unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// A broker in this process with `[cache.shared]`.
struct Replica {
    url: String,
    admin: String,
    /// The webhook listener's base URL, with `[webhooks]`.
    webhooks: Option<String>,
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
        let common::Running {
            url,
            admin,
            webhooks,
            stop,
            task,
        } = common::Running::start(&cfg).await;
        Replica {
            url,
            admin,
            webhooks,
            stop: Some(stop),
            task,
        }
    }

    async fn tokens(&self, form: &str) -> common::Resp {
        post_tokens(&self.url, CHECKOUT_SECRET, form).await
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

/// A Redis, a sandbox Truora and two replicas sharing both.
struct Fleet {
    redis: Redis,
    sandbox: Sandbox,
    a: Replica,
    b: Replica,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(options: SandboxOptions, tweak: impl Fn(&mut Config)) -> Self {
        let redis = Redis::start().await;
        Self::with_redis(redis, options, tweak).await
    }

    async fn with_redis(
        redis: Redis,
        options: SandboxOptions,
        tweak: impl Fn(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::start(options).await.unwrap();
        let a = Replica::start(&sandbox.url(), redis.section(dir.path()), &tweak).await;
        let b = Replica::start(&sandbox.url(), redis.section(dir.path()), &tweak).await;
        Fleet {
            redis,
            sandbox,
            a,
            b,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        self.a.stop().await;
        self.b.stop().await;
        self.redis.stop().await;
    }
}

fn form_for(user: &str) -> String {
    FORM.replace("user-1", user)
}

/// The cache key of `form` for caller `checkout`, as the broker computes it.
fn cache_key(form: &str) -> [u8; 32] {
    let req = TokenRequest::from_form(form.as_bytes()).unwrap();
    token_broker::issuance::key::key("checkout", &req)
}

fn hex(bytes: &[u8]) -> String {
    token_broker::secret::hex(bytes)
}

fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in the scrape"))
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_BOUND, f)
        .await
        .expect("the test outlived its bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_identical_requests_across_two_replicas_make_one_upstream_call() {
    bounded(async {
        let mut options = SandboxOptions::new(MASTER_KEY);
        options.delay = Duration::from_millis(200);
        let fleet = Fleet::start(options, |_| {}).await;
        let mut tasks = Vec::new();
        for i in 0..500 {
            let url = if i % 2 == 0 {
                fleet.a.url.clone()
            } else {
                fleet.b.url.clone()
            };
            tasks.push(tokio::spawn(async move {
                post_tokens(&url, CHECKOUT_SECRET, FORM).await
            }));
        }
        let mut tokens = std::collections::BTreeSet::new();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            tokens.insert(r.json()["api_key"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            fleet.sandbox.calls(),
            1,
            "one upstream call for the whole fleet"
        );
        assert_eq!(tokens.len(), 1, "every request got the same token");
        // One replica minted under the lock; the other read the value from Redis.
        let (ma, mb) = (fleet.a.metrics().await, fleet.b.metrics().await);
        let acquired = r#"token_broker_shared_cache_lock_total{outcome="acquired"}"#;
        assert_eq!(value(&ma, acquired) + value(&mb, acquired), 1.0);
        let hits = r#"token_broker_shared_cache_lookups_total{result="hit"}"#;
        assert!(value(&ma, hits) + value(&mb, hits) >= 1.0);
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_hit_fills_the_local_tier_with_the_remaining_lifetime() {
    bounded(async {
        let fleet = Fleet::start(SandboxOptions::new(MASTER_KEY), |_| {}).await;
        let first = fleet.a.tokens(FORM).await;
        assert_eq!(first.header("x-cache"), "MISS");
        let key = format!("token-broker:tok:{}", hex(&cache_key(FORM)));
        let mut redis = fleet.redis.conn().await.unwrap();
        let pttl: i64 = redis.pttl(&key).await.unwrap();
        // The value dies with the token, never later.
        assert!(pttl > 0 && pttl <= 7_200_000, "PTTL {pttl}");

        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = fleet.b.tokens(FORM).await;
        assert_eq!(second.header("x-cache"), "HIT", "{}", second.text());
        let (j1, j2) = (first.json(), second.json());
        assert_eq!(j1["api_key"], j2["api_key"]);
        assert_eq!(j1["expires_at"], j2["expires_at"]);
        let (e1, e2) = (
            j1["expires_in"].as_u64().unwrap(),
            j2["expires_in"].as_u64().unwrap(),
        );
        assert!(
            e2 < e1 && e1 - e2 <= 2,
            "remaining lifetime kept: {e1} then {e2}"
        );

        // Now the value is gone from Redis: B answers from its own tier, with the same token.
        let _: () = redis.del(&key).await.unwrap();
        let third = fleet.b.tokens(FORM).await;
        assert_eq!(third.header("x-cache"), "HIT");
        assert_eq!(third.json()["api_key"], j1["api_key"]);
        assert!(third.json()["expires_in"].as_u64().unwrap() <= e2);
        assert_eq!(fleet.sandbox.calls(), 1);
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_too_close_to_its_expiry_is_not_served_from_redis() {
    bounded(async {
        let mut options = SandboxOptions::new(MASTER_KEY);
        // 20 minutes of life; replica B wants 25 left, A the default 15.
        options.token_lifetime = Duration::from_secs(20 * 60);
        let redis = Redis::start().await;
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::start(options).await.unwrap();
        let a = Replica::start(&sandbox.url(), redis.section(dir.path()), |_| {}).await;
        let b = Replica::start(&sandbox.url(), redis.section(dir.path()), |c| {
            c.cache.min_remaining = Duration::from_secs(25 * 60);
        })
        .await;
        let first = a.tokens(FORM).await;
        assert_eq!(first.status, StatusCode::OK);
        let second = b.tokens(FORM).await;
        assert_eq!(second.header("x-cache"), "MISS");
        assert_ne!(first.json()["api_key"], second.json()["api_key"]);
        assert_eq!(sandbox.calls(), 2);
        let stale = r#"token_broker_shared_cache_lookups_total{result="stale"}"#;
        assert!(value(&b.metrics().await, stale) >= 1.0);
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_left_by_a_dead_replica_delays_others_only_until_it_expires() {
    bounded(async {
        let fleet = Fleet::start(SandboxOptions::new(MASTER_KEY), |_| {}).await;
        // A replica took the lock and died: nobody will release it, it expires in 1.5 s.
        let lock = format!("token-broker:lock:{}", hex(&cache_key(FORM)));
        let mut redis = fleet.redis.conn().await.unwrap();
        let set: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg("dead-replica")
            .arg("NX")
            .arg("PX")
            .arg(1500)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(set.is_some());
        let started = Instant::now();
        let (ra, rb) = tokio::join!(fleet.a.tokens(FORM), fleet.b.tokens(FORM));
        let took = started.elapsed();
        assert_eq!(ra.status, StatusCode::OK, "{}", ra.text());
        assert_eq!(rb.status, StatusCode::OK, "{}", rb.text());
        assert!(
            took >= Duration::from_millis(1300),
            "they waited on the lock: {took:?}"
        );
        assert!(
            took < Duration::from_millis(3000),
            "not past its expiry: {took:?}"
        );
        assert_eq!(ra.json()["api_key"], rb.json()["api_key"]);
        assert_eq!(fleet.sandbox.calls(), 1, "one replica took over and minted");
        // The lock of a finished flight is released by its owner, not left to expire.
        let exists: bool = redis.exists(&lock).await.unwrap();
        assert!(!exists);
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_released_only_by_its_owner() {
    bounded(async {
        let mut options = SandboxOptions::new(MASTER_KEY);
        options.delay = Duration::from_millis(300);
        let fleet = Fleet::start(options, |c| {
            c.upstream.deadline = Duration::from_millis(800);
            c.upstream.timeout = Duration::from_millis(800);
            if let Some(s) = c.cache.shared.as_mut() {
                s.lock_ttl = Duration::from_secs(1);
            }
        })
        .await;
        let lock = format!("token-broker:lock:{}", hex(&cache_key(FORM)));
        let mut redis = fleet.redis.conn().await.unwrap();
        let pending = tokio::spawn({
            let url = fleet.a.url.clone();
            async move { post_tokens(&url, CHECKOUT_SECRET, FORM).await }
        });
        // While A mints, its lock is replaced by another owner's (as if it had expired and
        // been taken): A must not delete that one when it finishes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !redis.exists::<_, bool>(&lock).await.unwrap() {
            assert!(Instant::now() < deadline, "A never took the lock");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _: () = redis.set(&lock, "someone-else").await.unwrap();
        assert_eq!(pending.await.unwrap().status, StatusCode::OK);
        let owner: Option<String> = redis.get(&lock).await.unwrap();
        assert_eq!(owner.as_deref(), Some("someone-else"));
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_mid_run_costs_no_request_and_is_reconnected() {
    bounded(async {
        // Many users mint here: the global mint budget is not what is tested.
        let mut fleet = Fleet::start(SandboxOptions::new(MASTER_KEY), |c| {
            c.upstream.mint_rate = 100_000;
        })
        .await;
        let urls = (fleet.a.url.clone(), fleet.b.url.clone());
        let run = move |tag: &'static str, users: usize| {
            let (a, b) = urls.clone();
            async move {
                let mut tasks = Vec::new();
                for i in 0..users {
                    for url in [a.clone(), b.clone()] {
                        let form = form_for(&format!("{tag}-{i}"));
                        tasks.push(tokio::spawn(async move {
                            post_tokens(&url, CHECKOUT_SECRET, &form).await
                        }));
                    }
                }
                for t in tasks {
                    let r = t.await.unwrap();
                    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                }
            }
        };
        run("before", 20).await;
        let calls_before = fleet.sandbox.calls();
        assert_eq!(
            calls_before, 20,
            "shared: one mint per user for both replicas"
        );

        // Stop Redis while requests are running: each mint takes 100 ms, so the 40 users'
        // requests are still in flight when it goes.
        fleet
            .sandbox
            .set_options(|o| o.delay = Duration::from_millis(100));
        let load = tokio::spawn(run("during", 40));
        tokio::time::sleep(Duration::from_millis(30)).await;
        fleet.redis.stop().await;
        assert!(
            !load.is_finished(),
            "Redis went while requests were in flight"
        );
        load.await.unwrap();
        fleet.sandbox.set_options(|o| o.delay = Duration::ZERO);
        run("after", 20).await;
        run("before", 20).await;
        let scrape = fleet.a.metrics().await + &fleet.b.metrics().await;
        assert!(
            scrape.contains("token_broker_shared_cache_errors_total{"),
            "errors counted"
        );
        let ready = send(Method::GET, &format!("{}/readyz", fleet.a.admin), &[], "").await;
        assert_eq!(ready.status, StatusCode::OK, "still ready without Redis");

        // Redis comes back (empty): the replicas use it again by themselves.
        fleet.redis.restart().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in 0.. {
            let form = form_for(&format!("back-{i}"));
            assert_eq!(fleet.a.tokens(&form).await.status, StatusCode::OK);
            if fleet.b.tokens(&form).await.header("x-cache") == "HIT" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas never used Redis again"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_in_redis_are_sealed_and_bound_to_their_key() {
    bounded(async {
        let fleet = Fleet::start(SandboxOptions::new(MASTER_KEY), |_| {}).await;
        let (f1, f2) = (form_for("alice-42"), form_for("bob"));
        let t1 = fleet.a.tokens(&f1).await.json()["api_key"]
            .as_str()
            .unwrap()
            .to_owned();
        fleet.a.tokens(&f2).await;
        let mut redis = fleet.redis.conn().await.unwrap();
        let keys: Vec<String> = redis.keys("*").await.unwrap();
        let k1 = format!("token-broker:tok:{}", hex(&cache_key(&f1)));
        let k2 = format!("token-broker:tok:{}", hex(&cache_key(&f2)));
        assert!(keys.contains(&k1) && keys.contains(&k2), "{keys:?}");
        let mut everything = keys.join("\n");
        for k in &keys {
            let kind: String = redis::cmd("TYPE")
                .arg(k)
                .query_async(&mut redis)
                .await
                .unwrap();
            let raw: Vec<Vec<u8>> = if kind == "set" {
                redis.smembers(k).await.unwrap()
            } else if kind == "zset" {
                redis.zrange(k, 0, -1).await.unwrap()
            } else if kind == "hash" {
                redis.hvals(k).await.unwrap()
            } else {
                vec![redis.get(k).await.unwrap()]
            };
            for r in raw {
                everything.push_str(&String::from_utf8_lossy(&r));
            }
        }
        // No token, claim, user, caller or flow in clear, in keys or values.
        let payload = t1.split('.').nth(1).unwrap();
        for needle in [&t1[..], payload, "alice", "user-1", "checkout", "IPF0a1b2c"] {
            assert!(
                !everything.contains(needle),
                "{needle} is readable in Redis"
            );
        }
        assert!(!everything.contains(ENCRYPTION_KEY));

        // A value copied to another key does not open there: B does not serve it.
        let v1: Vec<u8> = redis.get(&k1).await.unwrap();
        let _: () = redis.set(&k2, v1).await.unwrap();
        let r = fleet.b.tokens(&f2).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_ne!(r.json()["api_key"].as_str().unwrap(), t1);
        assert_eq!(r.header("x-cache"), "MISS");
        let undecryptable = r#"token_broker_shared_cache_lookups_total{result="undecryptable"}"#;
        assert!(value(&fleet.b.metrics().await, undecryptable) >= 1.0);
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_redis_and_the_other_replica() {
    bounded(async {
        let fleet = Fleet::start(SandboxOptions::new(MASTER_KEY), |_| {}).await;
        let (u1, u2) = (form_for("u1"), form_for("u2"));
        let t1 = fleet.a.tokens(&u1).await.json()["api_key"].clone();
        let t2 = fleet.a.tokens(&u2).await.json()["api_key"].clone();
        // B holds both in its own tier now.
        assert_eq!(fleet.b.tokens(&u1).await.header("x-cache"), "HIT");
        assert_eq!(fleet.b.tokens(&u2).await.header("x-cache"), "HIT");

        let del = send(
            Method::DELETE,
            &format!("{}/v1/tokens?account_id=u1", fleet.a.url),
            &[("authorization", &format!("Bearer {CHECKOUT_SECRET}"))],
            "",
        )
        .await;
        assert_eq!(del.status, StatusCode::OK, "{}", del.text());
        assert_eq!(del.json()["invalidated"], 1);

        // B dropped u1 (from the message) and Redis no longer has it: B mints anew.
        let remote = r#"token_broker_shared_cache_invalidations_total{origin="remote"}"#;
        let b = &fleet.b;
        wait_for(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async move { value(&b.metrics().await, remote) >= 1.0 },
            || "B never heard of the invalidation".to_owned(),
        )
        .await;
        let again = fleet.b.tokens(&u1).await;
        assert_eq!(again.header("x-cache"), "MISS");
        assert_ne!(again.json()["api_key"], t1);
        // u2 was not named: still the same token everywhere.
        let other = fleet.b.tokens(&u2).await;
        assert_eq!(other.header("x-cache"), "HIT");
        assert_eq!(other.json()["api_key"], t2);
        assert_eq!(fleet.sandbox.calls(), 3);
        fleet.stop().await;
    })
    .await;
}

/// Truora's webhook reaches one replica; the process's token is gone from both, and the same
/// delivery retried to the other replica drops nothing of the user's new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_webhook_delivery_ends_the_process_on_every_replica_once() {
    bounded(async {
        let fleet = Fleet::start(SandboxOptions::new(MASTER_KEY), with_webhooks).await;
        let hooks = |r: &Replica| format!("{}/webhooks/truora", r.webhooks.as_deref().unwrap());
        fleet.sandbox.set_webhook(Some(WebhookTarget {
            url: hooks(&fleet.a),
            bearer: WEBHOOK_SECRET.into(),
            signing_secret: None,
            claims: ClaimNames::default(),
            event_in_query: false,
        }));
        let mine = form_for("u1");
        let old = fleet.a.tokens(&mine).await.json()["api_key"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(fleet.b.tokens(&mine).await.header("x-cache"), "HIT");
        let process = fleet.sandbox.process_of(&old).unwrap().process_id;
        let done = fleet.sandbox.finish(&old, false).await.unwrap().unwrap();
        assert_eq!(done.status, Some(200), "{done:?}");

        let remote = r#"token_broker_shared_cache_invalidations_total{origin="remote"}"#;
        let b = &fleet.b;
        wait_for(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async move { value(&b.metrics().await, remote) >= 1.0 },
            || "B never heard of the ended process".to_owned(),
        )
        .await;
        let on_b = fleet.b.tokens(&mine).await.json()["api_key"].clone();
        let on_a = fleet.a.tokens(&mine).await.json()["api_key"].clone();
        assert_ne!(on_b, old, "B served the ended process's token");
        assert_eq!(on_a, on_b, "one new process for the fleet");
        assert_eq!(fleet.sandbox.calls(), 2);

        // The same delivery retried, to the other replica: nothing of the new process goes.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "event": "identity_process_failed", "flow_id": "IPF0a1b2c", "account_id": "u1",
            "process_id": process, "iat": now,
        });
        let retried = send(
            Method::POST,
            &hooks(&fleet.b),
            &[("authorization", &format!("Bearer {WEBHOOK_SECRET}"))],
            &sign_hs256(b"any", &claims.to_string()),
        )
        .await;
        assert_eq!(retried.status, StatusCode::OK, "{}", retried.text());
        assert_eq!(retried.json()["invalidated"], 0);
        for r in [&fleet.a, &fleet.b] {
            let again = r.tokens(&mine).await;
            assert_eq!(
                (again.header("x-cache"), &again.json()["api_key"]),
                ("HIT", &on_b)
            );
        }
        fleet.stop().await;
    })
    .await;
}

/// A DELETE that runs while a mint is in flight wins, on both replicas: the token minted
/// meanwhile is handed to the request that waited for it, but neither Redis nor either replica
/// serves it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_during_an_in_flight_mint_sticks_on_every_replica() {
    bounded(async {
        let mut options = SandboxOptions::new(MASTER_KEY);
        options.delay = Duration::from_millis(600);
        let fleet = Fleet::start(options, |_| {}).await;
        for (deleting, name) in [
            (&fleet.a, "the minting replica"),
            (&fleet.b, "the other replica"),
        ] {
            let before = fleet.sandbox.calls();
            let url = fleet.a.url.clone();
            let in_flight =
                tokio::spawn(async move { post_tokens(&url, CHECKOUT_SECRET, FORM).await });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let del = send(
                Method::DELETE,
                &format!("{}/v1/tokens?account_id=user-1", deleting.url),
                &[("authorization", &format!("Bearer {CHECKOUT_SECRET}"))],
                "",
            )
            .await;
            assert_eq!(del.status, StatusCode::OK, "{name}: {}", del.text());
            let minted = in_flight.await.unwrap();
            assert_eq!(minted.status, StatusCode::OK);
            let old = minted.json()["api_key"].clone();
            for replica in [&fleet.a, &fleet.b] {
                let next = replica.tokens(FORM).await;
                assert_ne!(
                    next.json()["api_key"],
                    old,
                    "{name}: the invalidated token came back"
                );
            }
            assert_eq!(fleet.sandbox.calls(), before + 2, "{name}");
            let gone = send(
                Method::DELETE,
                &format!("{}/v1/tokens?account_id=user-1", fleet.a.url),
                &[("authorization", &format!("Bearer {CHECKOUT_SECRET}"))],
                "",
            )
            .await;
            assert_eq!(gone.status, StatusCode::OK);
        }
        fleet.stop().await;
    })
    .await;
}

/// The index of a caller's values holds the live ones: members leave when their value dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_of_a_callers_values_stays_near_the_live_values() {
    bounded(async {
        let mut options = SandboxOptions::new(MASTER_KEY);
        options.token_lifetime = Duration::from_secs(2);
        let fleet = Fleet::start(options, |c| {
            c.cache.min_remaining = Duration::from_millis(500)
        })
        .await;
        for i in 0..40 {
            let r = fleet.a.tokens(&form_for(&format!("short-{i}"))).await;
            assert_eq!(r.status, StatusCode::OK);
        }
        let mut redis = fleet.redis.conn().await.unwrap();
        let indexes: Vec<String> = redis.keys("token-broker:caller:*").await.unwrap();
        assert_eq!(indexes.len(), 1, "{indexes:?}");
        let size = |redis: &mut redis::aio::MultiplexedConnection| {
            let index = indexes[0].clone();
            let mut redis = redis.clone();
            async move { redis.zcard::<_, u64>(index).await.unwrap() }
        };
        assert_eq!(size(&mut redis).await, 40);
        // Every one of those values has died; five new ones are written.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        for i in 0..5 {
            fleet.a.tokens(&form_for(&format!("later-{i}"))).await;
        }
        assert_eq!(size(&mut redis).await, 5, "dead members were kept");
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_a_password_and_the_password_never_leaks() {
    bounded(async {
        let redis = Redis::start_with(Some("s3cret-redis-pw")).await;
        let fleet = Fleet::with_redis(redis, SandboxOptions::new(MASTER_KEY), |_| {}).await;
        let first = fleet.a.tokens(FORM).await;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(fleet.b.tokens(FORM).await.header("x-cache"), "HIT");
        let scrape = fleet.a.metrics().await;
        assert!(!scrape.contains("s3cret"));
        assert_eq!(
            value(
                &scrape,
                r#"token_broker_shared_cache_lookups_total{result="error"}"#
            ),
            0.0
        );
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shared_cache_series_is_documented() {
    bounded(async {
        let fleet = Fleet::start(SandboxOptions::new(MASTER_KEY), |_| {}).await;
        fleet.a.tokens(FORM).await;
        let scrape = fleet.a.metrics().await;
        let docs = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/observability.md"),
        )
        .unwrap();
        let mut ours = 0;
        for family in scrape.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split(' ').next().unwrap();
            ours += usize::from(name.starts_with("token_broker_shared_cache_"));
            assert!(
                docs.contains(&format!("| `{name}` |")),
                "{name} is not in the metrics tables of docs/observability.md"
            );
        }
        assert_eq!(ours, 12, "{scrape}");
        // And every shared-cache name the docs give is exported (the Python docs test leaves
        // these to this one, since they need a Redis).
        let exported: std::collections::BTreeSet<&str> = scrape
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
            .unwrap()
            .map(|p| p.unwrap().path())
            .collect();
        // The Grafana dashboard too: tests/observability.rs lets it name these series.
        pages.push(root.join("deploy/grafana/token-broker.json"));
        for page in pages {
            let text = std::fs::read_to_string(page).unwrap_or_default();
            let names = text
                .match_indices("token_broker_shared_cache_")
                .chain(text.match_indices("token_broker_fleet_"));
            for (i, _) in names {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let name = name.trim_end_matches('_');
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    exported.contains(base),
                    "{name} is named in the docs but not exported"
                );
            }
        }
        fleet.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_broker_processes_share_one_mint_and_survive_a_killed_lock_holder() {
    bounded(async {
        let mut redis = Redis::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut options = SandboxOptions::new(MASTER_KEY);
        options.delay = Duration::from_millis(300);
        let sandbox = Sandbox::start(options).await.unwrap();
        let mut cfg = config(&sandbox.url());
        cfg.upstream.timeout = Duration::from_secs(2);
        cfg.upstream.deadline = Duration::from_secs(2);
        let mut shared = redis.section(dir.path());
        shared.lock_ttl = Duration::from_secs(3);
        cfg.cache.shared = Some(shared);
        let mut a = Process::start(dir.path(), "a", cfg.clone()).await;
        let b = Process::start(dir.path(), "b", cfg).await;

        // 200 identical requests, alternating between the two processes: one mint.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let url = if i % 2 == 0 {
                a.url.clone()
            } else {
                b.url.clone()
            };
            tasks.push(tokio::spawn(async move {
                post_tokens(&url, CHECKOUT_SECRET, FORM).await
            }));
        }
        let mut tokens = std::collections::HashSet::new();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            tokens.insert(r.json()["api_key"].as_str().unwrap().to_owned());
        }
        assert_eq!(tokens.len(), 1);
        assert_eq!(sandbox.calls(), 1);

        // a takes the lock for a new user and is killed mid-mint: b waits at most for the
        // lock's expiry, then mints itself.
        sandbox.set_options(|o| o.delay = Duration::from_millis(1500));
        let user = form_for("killed-holder");
        let url = a.url.clone();
        let doomed = {
            let user = user.clone();
            tokio::spawn(async move { post_tokens(&url, CHECKOUT_SECRET, &user).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.child.start_kill().unwrap();
        let _ = a.child.wait().await;
        drop(doomed);
        sandbox.set_options(|o| o.delay = Duration::from_millis(50));
        let started = Instant::now();
        let r = post_tokens(&b.url, CHECKOUT_SECRET, &user).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        // It did wait for the dead holder's lock (so the lock was real)...
        assert!(
            started.elapsed() > Duration::from_secs(1),
            "b did not wait: {:?}",
            started.elapsed()
        );
        // ...but not past its expiry.
        assert!(
            started.elapsed() < Duration::from_secs(3) + Duration::from_millis(1500),
            "b waited {:?}",
            started.elapsed()
        );
        redis.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_through_redis_over_tls() {
    bounded(async {
        // A CA and a certificate for the Redis server, made here.
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "redis test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (ca_file, cert_file, key_file) = (
            write("ca.pem", ca.pem()),
            write("redis.pem", cert.pem()),
            write("redis.key", key.serialize_pem()),
        );
        // redis-server speaking TLS only, clients not asked for certificates.
        let port = free_port();
        let _redis = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&cert_file)
            .arg("--tls-key-file")
            .arg(&key_file)
            .arg("--tls-ca-cert-file")
            .arg(&ca_file)
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_for_port(
            port,
            Duration::from_secs(10),
            Duration::from_millis(50),
            || "redis-server (TLS) did not come up".to_owned(),
        )
        .await;

        let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY)).await.unwrap();
        let key_file = write("cache-key", format!("{ENCRYPTION_KEY}\n"));
        let section = || {
            let text = format!(
                "[cache.shared]\nurl = \"rediss://localhost:{port}\"\nca_file = \"{}\"\nencryption_key_file = \"{}\"\ntimeout = \"2s\"\n[[clients]]\nid = \"c\"\ntoken_sha256 = \"{}\"\n",
                ca_file.display(),
                key_file.display(),
                "0".repeat(64)
            );
            Config::parse(&text).unwrap().cache.shared.unwrap()
        };
        let a = Replica::start(&sandbox.url(), section(), |_| {}).await;
        let b = Replica::start(&sandbox.url(), section(), |_| {}).await;
        let first = a.tokens(FORM).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text());
        // b has never seen this user: its hit can only have come from Redis, over TLS.
        let second = b.tokens(FORM).await;
        assert_eq!(second.header("x-cache"), "HIT", "{}", second.text());
        assert_eq!(second.json()["api_key"], first.json()["api_key"]);
        assert_eq!(sandbox.calls(), 1);
        a.stop().await;
        b.stop().await;
    })
    .await;
}
