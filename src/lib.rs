//! `token-broker`: holds Truora's master API key alone and hands short-lived Web Integration
//! Tokens to authenticated internal callers, reusing a token for the same caller, user, flow and
//! parameters until it nears expiry.
//!
//! The modules read as the architecture, outside in:
//!
//! - [`cli`]: the command line (`serve`, `demo`, `check-config`, `hash-secret`).
//! - [`config`]: the TOML file as serde structs, validated before any socket is bound.
//! - [`server`]: listeners, the tower stack every caller request goes through, the admin endpoints.
//! - [`reload`]: rotation without restart (SIGHUP, `POST /admin/reload`): callers, master key, certificates.
//! - [`tls`]: the caller listener's rustls configuration (TLS 1.2+, optional client certificates).
//! - [`auth`]: who the caller is (bearer secret and/or client certificate -> configured client).
//! - [`passthrough`]: callers reaching Truora's other endpoints through the broker, key injected.
//! - [`policy`]: what each caller may ask for (flows, countries, redirect hosts, drop-in).
//! - [`request`]: the caller's form or JSON body, parsed once and validated into a [`request::TokenRequest`].
//! - [`issuance`]: the core. Cache lookup, single-flight minting, response bytes. Knows nothing of hyper.
//! - [`cache`]: the in-process token cache and its expiry policy.
//! - [`shared_cache`]: the optional Redis tier shared by replicas, and the fleet-wide minting lock.
//! - [`resilience`]: what guards a miss: budgets, concurrency cap, throttle window, breaker, retries.
//! - [`upstream`]: the call to Truora's `POST /v1/api-keys` and the reading of its answer.
//! - [`token`]: reading a minted token's JWT claims for its lifetime.
//! - [`metrics`]: the Prometheus registry and every series the broker exports.
//! - [`access`]: request ids and the access log line of every caller request.
//! - [`logging`]: log format and filter, and the buffer that writes lines to stderr in batches.
//! - [`status`]: the HTML status page on the admin listener.
//! - [`error`]: one error type, whose kind gives the HTTP status.
//! - [`secret`]: redacting, zeroizing holders for the master key and caller secrets.
//! - [`invariants`]: what must hold for any input; the fuzz targets and their regression tests.
//! - [`sandbox`]: an embedded imitation of Truora for `demo` and the tests.
#![forbid(unsafe_code)]

pub mod access;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod invariants;
pub mod issuance;
pub mod logging;
pub mod metrics;
pub mod passthrough;
pub mod policy;
pub mod reload;
pub mod request;
pub mod resilience;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod shared_cache;
pub mod status;
pub mod tls;
pub mod token;
pub mod upstream;
