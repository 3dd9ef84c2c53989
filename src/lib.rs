//! `token-broker`: holds Truora's master API key alone and hands short-lived Web Integration
//! Tokens to authenticated internal callers, reusing a token for the same caller, user, flow and
//! parameters until it nears expiry.
//!
//! The modules read as the architecture. Imports run one way, from the composition root down;
//! `tests/architecture.rs` holds the code to it:
//!
//! | room | what it owns |
//! | --- | --- |
//! | [`app`] | The composition root: loading and checking the config, building the broker, reload, the command line, the demo. The only room that knows every other. |
//! | [`server`] | The HTTP side: listeners and TLS, the tower stack, the caller API's handlers, the admin router and status page. |
//! | [`auth`] | Who the caller is: the auth layer and the configured callers. |
//! | [`passthrough`] | Callers reaching Truora's other endpoints through the broker, key injected; results that say a process ended end its tokens. |
//! | [`webhooks`] | Truora's webhook deliveries: checked (bearer secret, signature, age, claims) and turned into the end of a process's tokens. |
//! | [`issuance`] | The core: request parsing and validation, caller policy, cache key, issuer (lookup, single flight, minting), answer bytes. No HTTP. |
//! | [`cache`] | The token cache: the local tier and the Redis tier (store, lock, sealing). |
//! | [`upstream`] | Truora as the broker calls it: the client, and the guard (throttle window, breaker, concurrency cap, budgets, retries). |
//! | [`sandbox`] | An embedded imitation of Truora, for the demo, the tests and the benches only. |
//! | [`invariants`] | What must hold for any input: the fuzz targets' checks. |
//!
//! The leaves, which import nothing of the broker's but other leaves:
//!
//! | leaf | what it owns |
//! | --- | --- |
//! | [`wire`] | The wire types: route, bodies, response helpers, framing and body checks. |
//! | [`truora`] | Truora's vocabulary: header and path names, countries, document types, key type, grant, token lifetime. |
//! | [`config`] | The TOML file as plain serde structs, validated per section. |
//! | [`breaker`] | The circuit breaker, for Truora and for Redis. |
//! | [`rate`] | Token buckets, alone or one per key: mint budgets, the `DELETE` rate. |
//! | [`error`] | One error type, whose kind gives the HTTP status. |
//! | [`secret`] | Redacting, zeroizing holders for the master key and caller secrets; hex. |
//! | [`logging`] | Log format and filter, the access line, batched writes to stderr. |
//! | [`metrics`] | The Prometheus registry, every series, and their bounded label sets. |
//! | [`telemetry`] | Traces: the request span and its children, their own dispatcher, OTLP/HTTP export, trace context in and out. |
//! | [`audit`] | The audit trail: its events, the keyed user tags, the JSON-lines file and its writer. |
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod app;
pub mod audit;
pub mod auth;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod error;
pub mod invariants;
pub mod issuance;
pub mod logging;
pub mod metrics;
pub mod passthrough;
pub mod rate;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod truora;
pub mod upstream;
pub mod webhooks;
pub mod wire;
