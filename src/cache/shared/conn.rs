//! How the tier reaches Redis in each `cache.shared.mode`, with the redis crate's own support
//! for each: no routing of ours.
//!
//! - **standalone**: one reconnecting [`ConnectionManager`] to `url`.
//! - **cluster**: one [`ClusterConnection`] from the seeds in `nodes`, made on first use. The
//!   client keeps the slot map, follows `MOVED` and `ASK`, and refreshes the map when the
//!   topology changes (a replica promoted after its master was lost). Multi-key `MGET` and `DEL`
//!   are split by slot by the client; every script's keys share a slot (see the key names in
//!   [`super::SharedTier`]).
//! - **sentinel**: the sentinels in `nodes` name the primary of `sentinel_master`; the broker
//!   keeps one multiplexed connection to it, and forgets it on any error or timeout, so the next
//!   call asks the sentinels again: after a failover it follows the new primary by itself.
//!
//! Invalidation messages: in every mode a plain pub/sub connection (Redis Cluster propagates
//! `PUBLISH` to every node, so any node will do; with Sentinel, the current primary).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use prometheus::IntCounter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection, PubSub};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    RedisResult, TlsCertificates, TlsMode,
};
use tokio::sync::OnceCell;
use zeroize::Zeroizing;

use super::TierError;
use crate::config::{redacted_url, SharedCacheConfig, SharedMode};

/// The connection of one mode.
pub(super) enum Conn {
    Standalone(Box<Standalone>),
    Cluster(Box<Cluster>),
    Sentinel(Box<Sentinel>),
}

/// The standalone mode's client and connection.
pub(super) struct Standalone {
    client: Client,
    manager: ConnectionManager,
}

/// The cluster mode's client, its connection once made, and the seeds.
pub(super) struct Cluster {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
    /// One client per seed, for the pub/sub connection.
    seeds: Vec<Client>,
}

/// The Sentinel mode's state: the sentinels, and the primary they named last.
pub(super) struct Sentinel {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the primary and its generation, until a call on it fails.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    /// `host:port` of the primary the sentinels named last.
    primary: Mutex<Option<String>>,
    config: AsyncConnectionConfig,
    /// Counts each change of primary this replica followed.
    changes: IntCounter,
    master: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each value is replaced whole in one step: a panic elsewhere cannot leave it half-made.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a node's URL becomes, with the password of its kind of node set.
fn info(
    url: &str,
    password: Option<&Zeroizing<String>>,
    shown: &str,
) -> Result<ConnectionInfo, TierError> {
    let mut info = url
        .into_connection_info()
        .map_err(|e| client_error(shown, &e))?;
    if let Some(password) = password {
        let settings = info
            .redis_settings()
            .clone()
            .set_password(password.as_str());
        info = info.set_redis_settings(settings);
    }
    Ok(info)
}

fn client_error(shown: &str, e: &redis::RedisError) -> TierError {
    TierError::Client {
        shown: shown.to_owned(),
        reason: e.category().to_string(),
    }
}

fn certificates(pem: &Option<Vec<u8>>) -> Option<TlsCertificates> {
    pem.as_ref().map(|pem| TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.clone()),
    })
}

fn open(info: ConnectionInfo, pem: &Option<Vec<u8>>, shown: &str) -> Result<Client, TierError> {
    match certificates(pem) {
        Some(certs) => Client::build_with_tls(info, certs),
        None => Client::open(info),
    }
    .map_err(|e| client_error(shown, &e))
}

impl Conn {
    /// The connection for a validated `[cache.shared]`, and how log lines name Redis. Nothing
    /// is connected yet. `ca` is the PEM of `ca_file`; `changes` counts the primaries followed.
    pub(super) fn new(
        cfg: &SharedCacheConfig,
        password: Option<&Zeroizing<String>>,
        sentinel_password: Option<&Zeroizing<String>>,
        ca: Option<Vec<u8>>,
        changes: IntCounter,
    ) -> Result<(Self, String), TierError> {
        let nodes_shown = || {
            cfg.nodes
                .iter()
                .map(|n| redacted_url(n))
                .collect::<Vec<_>>()
                .join(",")
        };
        match cfg.mode {
            SharedMode::Standalone => {
                let url = cfg.url.as_deref().unwrap_or_default();
                let shown = redacted_url(url);
                let client = open(info(url, password, &shown)?, &ca, &shown)?;
                let manager = client
                    .get_connection_manager_lazy(
                        ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(cfg.timeout))
                            .set_response_timeout(Some(cfg.timeout))
                            .set_number_of_retries(1)
                            .set_max_delay(std::time::Duration::from_secs(1)),
                    )
                    .map_err(|e| client_error(&shown, &e))?;
                Ok((
                    Conn::Standalone(Box::new(Standalone { client, manager })),
                    shown,
                ))
            }
            SharedMode::Cluster => {
                let shown = format!("cluster {}", nodes_shown());
                let infos = cfg
                    .nodes
                    .iter()
                    .map(|n| info(n, password, &shown))
                    .collect::<Result<Vec<_>, _>>()?;
                let seeds = infos
                    .iter()
                    .map(|i| open(i.clone(), &ca, &shown))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut builder = ClusterClientBuilder::new(infos)
                    .connection_timeout(cfg.timeout)
                    .response_timeout(cfg.timeout)
                    .retries(3)
                    .min_retry_wait(20)
                    .max_retry_wait(200);
                if let Some(certs) = certificates(&ca) {
                    builder = builder.certs(certs);
                }
                let client = builder.build().map_err(|e| client_error(&shown, &e))?;
                Ok((
                    Conn::Cluster(Box::new(Cluster {
                        client,
                        conn: OnceCell::new(),
                        seeds,
                    })),
                    shown,
                ))
            }
            SharedMode::Sentinel => {
                let master = cfg.sentinel_master.clone().unwrap_or_default();
                let shown = format!("sentinel master {master} via {}", nodes_shown());
                let infos = cfg
                    .nodes
                    .iter()
                    .map(|n| info(n, None, &shown))
                    .collect::<Result<Vec<_>, _>>()?;
                let tls = infos
                    .first()
                    .is_some_and(|i| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. }))
                    .then_some(TlsMode::Secure);
                let mut builder = SentinelClientBuilder::new(
                    infos.iter().map(|i| i.addr().clone()),
                    &master,
                    SentinelServerType::Master,
                )
                .map_err(|e| client_error(&shown, &e))?;
                if let Some(user) = infos.first().and_then(|i| i.redis_settings().username()) {
                    builder = builder.set_client_to_sentinel_username(user);
                }
                if let Some(pw) = sentinel_password {
                    builder = builder.set_client_to_sentinel_password(pw.as_str());
                }
                if let Some(pw) = password {
                    builder = builder.set_client_to_redis_password(pw.as_str());
                }
                if let Some(mode) = tls {
                    builder = builder.set_client_to_redis_tls_mode(mode);
                    if let Some(certs) = certificates(&ca) {
                        builder = builder
                            .set_client_to_sentinel_certificates(certs.clone())
                            .set_client_to_redis_certificates(certs);
                    }
                }
                let sentinels = builder.build().map_err(|e| client_error(&shown, &e))?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(cfg.timeout))
                    .set_response_timeout(Some(cfg.timeout));
                Ok((
                    Conn::Sentinel(Box::new(Sentinel {
                        sentinels: tokio::sync::Mutex::new(sentinels),
                        current: Mutex::new(None),
                        generation: AtomicU64::new(0),
                        primary: Mutex::new(None),
                        config,
                        changes,
                        master,
                    })),
                    shown,
                ))
            }
        }
    }

    /// One command, on the node the mode says.
    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Standalone(s) => cmd.query_async(&mut s.manager.clone()).await,
            Conn::Cluster(c) => {
                let mut conn = c
                    .conn
                    .get_or_try_init(|| c.client.get_async_connection())
                    .await?
                    .clone();
                cmd.query_async(&mut conn).await
            }
            Conn::Sentinel(s) => s.query(cmd).await,
        }
    }

    /// A call that did not answer in time: with Sentinel, the primary is asked for again.
    pub(super) fn timed_out(&self) {
        if let Conn::Sentinel(s) = self {
            s.forget(None);
        }
    }

    /// A pub/sub connection; `attempt` picks the seed to try in cluster mode.
    pub(super) async fn pubsub(&self, attempt: usize) -> RedisResult<PubSub> {
        match self {
            Conn::Standalone(s) => s.client.get_async_pubsub().await,
            Conn::Cluster(c) => match c.seeds.get(attempt % c.seeds.len().max(1)) {
                Some(seed) => seed.get_async_pubsub().await,
                None => Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "no seed nodes",
                ))),
            },
            Conn::Sentinel(s) => {
                let client = s.resolve().await?;
                client.get_async_pubsub().await
            }
        }
    }

    /// The mode's name, for the metrics.
    pub(super) fn mode(&self) -> SharedMode {
        match self {
            Conn::Standalone(_) => SharedMode::Standalone,
            Conn::Cluster(_) => SharedMode::Cluster,
            Conn::Sentinel(_) => SharedMode::Sentinel,
        }
    }
}

impl Sentinel {
    /// The client of the primary the sentinels name now; counts and logs a change of primary.
    async fn resolve(&self) -> RedisResult<Client> {
        let client = self.sentinels.lock().await.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let mut primary = lock(&self.primary);
        if primary.as_deref() != Some(addr.as_str()) {
            if primary.is_some() {
                self.changes.inc();
                tracing::warn!(master = %self.master, primary = %addr, "Sentinel names a new primary: following it");
            }
            *primary = Some(addr);
        }
        Ok(client)
    }

    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = lock(&self.current).clone() {
            return Ok(current);
        }
        let client = self.resolve().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *lock(&self.current) = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        let (generation, mut conn) = self.connection().await?;
        let result = cmd.query_async(&mut conn).await;
        if result.is_err() {
            // A dropped connection, a READONLY from a demoted primary, or anything else: ask
            // the sentinels again next time (cheap, and never wrong).
            self.forget(Some(generation));
        }
        result
    }

    /// Forgets the connection (only of `generation`, when given, so a newer one stays).
    fn forget(&self, generation: Option<u64>) {
        let mut current = lock(&self.current);
        if generation.is_none_or(|g| current.as_ref().is_some_and(|(c, _)| *c == g)) {
            *current = None;
        }
    }

    /// `host:port` of the primary followed now.
    pub(super) fn primary(&self) -> Option<String> {
        lock(&self.primary).clone()
    }
}

impl Conn {
    /// With Sentinel, the primary followed now.
    pub(super) fn primary(&self) -> Option<String> {
        match self {
            Conn::Sentinel(s) => s.primary(),
            _ => None,
        }
    }

    /// With Sentinel, forgets the connection (the node it reaches is no longer the primary).
    pub(super) fn demoted(&self) {
        if let Conn::Sentinel(s) = self {
            s.forget(None);
        }
    }
}

/// Reads a `CLUSTER SLOTS` answer: (the masters' addresses, how many replicas, slots covered).
pub(super) fn cluster_slots(
    value: &redis::Value,
) -> Option<(std::collections::BTreeSet<String>, usize, u64)> {
    let redis::Value::Array(ranges) = value else {
        return None;
    };
    let mut masters = std::collections::BTreeSet::new();
    let mut replicas = std::collections::BTreeSet::new();
    let mut slots = 0u64;
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            return None;
        };
        let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
            (parts.first(), parts.get(1))
        else {
            return None;
        };
        slots += u64::try_from(end - start + 1).unwrap_or(0);
        for (i, node) in parts.iter().skip(2).enumerate() {
            let redis::Value::Array(node) = node else {
                return None;
            };
            let addr = format!("{:?}:{:?}", node.first(), node.get(1));
            if i == 0 {
                masters.insert(addr);
            } else {
                replicas.insert(addr);
            }
        }
    }
    Some((masters, replicas.len(), slots))
}

/// Reads a `ROLE` answer: `Some(replicas)` from a primary, `None` from anything else.
pub(super) fn primary_role(value: &redis::Value) -> Option<usize> {
    let redis::Value::Array(parts) = value else {
        return None;
    };
    let role = match parts.first() {
        Some(redis::Value::BulkString(b)) => b.as_slice(),
        Some(redis::Value::SimpleString(s)) => s.as_bytes(),
        _ => return None,
    };
    if role != b"master" {
        return None;
    }
    match parts.get(2) {
        Some(redis::Value::Array(replicas)) => Some(replicas.len()),
        _ => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn cluster_slots_are_counted_by_master_and_replica() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
            ])
        };
        let answer = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(7000),
                node(7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node(7001)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node(7002)]),
        ]);
        let (masters, replicas, slots) = cluster_slots(&answer).unwrap();
        assert_eq!((masters.len(), replicas, slots), (3, 1, 16384));
        assert_eq!(cluster_slots(&Value::Nil), None);
    }

    #[test]
    fn a_role_answer_tells_a_primary_and_its_replicas() {
        let primary = Value::Array(vec![
            Value::BulkString(b"master".to_vec()),
            Value::Int(10),
            Value::Array(vec![Value::Array(vec![]), Value::Array(vec![])]),
        ]);
        assert_eq!(primary_role(&primary), Some(2));
        let replica = Value::Array(vec![Value::BulkString(b"slave".to_vec())]);
        assert_eq!(primary_role(&replica), None);
    }
}
