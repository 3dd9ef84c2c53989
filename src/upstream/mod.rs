//! Truora, as the broker calls it for a miss: the client that mints ([`client`]) and the guard
//! around every call ([`guard`]: throttle window, breaker, concurrency cap, mint budgets,
//! retries within a deadline), whose budgets and throttle window may be shared by the fleet
//! ([`fleet`]).
//!
//! The issuance core sees only the [`Mint`] trait, so it is benchmarked and fuzzed with a fake
//! that needs no sockets.

use std::future::Future;
use std::pin::Pin;

use crate::error::UpstreamError;

pub mod budget;
pub mod client;
pub mod fleet;
pub mod guard;

pub use client::{
    parse_retry_after, pooled_client, read_answer, ClientError, TruoraClient, MAX_RETRY_AFTER,
};
pub use fleet::{FleetFuture, FleetLimits, FleetVerdict};
pub use guard::{Guard, GuardSettings, Snapshot, ThrottleWindow};

/// A future the [`Mint`] trait returns.
pub type MintFuture = Pin<Box<dyn Future<Output = Result<String, UpstreamError>> + Send>>;

/// Something that turns an upstream form into a freshly minted token.
pub trait Mint: Send + Sync + 'static {
    /// Mints one token from the form body Truora's `POST /v1/api-keys` takes.
    fn mint(&self, form: String) -> MintFuture;
}
