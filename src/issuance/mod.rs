//! The issuance core: from a validated request of an authenticated caller to the bytes of the
//! answer. It knows nothing of HTTP servers (no hyper, no tower, no wire types), so it is
//! benchmarked and fuzzed without sockets; the HTTP side turns requests into calls on it and
//! its results back into responses.
//!
//! - [`request`] and [`parse`]: the caller's form or JSON body (read by `json`), parsed once and
//!   validated into a [`TokenRequest`]; the `DELETE /v1/tokens` query into an
//!   [`InvalidationFilter`].
//! - [`policy`]: what each caller may ask for.
//! - [`key`]: which requests share a token.
//! - [`issuer`]: lookup, single flight, minting through the upstream guard; [`fleet`]: the same
//!   with the shared tier, and the guard's limits shared by the fleet.
//! - [`invalidate`]: dropping cached tokens everywhere, for each [`crate::cache::Reason`].
//! - [`answer`]: the answer's bytes.

pub mod answer;
pub mod fleet;
pub mod invalidate;
pub mod issuer;
mod json;
pub mod key;
pub mod parse;
pub mod policy;
pub mod request;

pub use answer::Issued;
pub use fleet::fleet_limits;
pub use invalidate::Ended;
pub use issuer::{Issuer, IssuerSettings};
pub use parse::{invalidation_filter, InvalidationFilter};
pub use policy::CallerPolicy;
pub use request::{Field, TokenRequest};
