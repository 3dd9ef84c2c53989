//! The answer's bytes: `POST /v1/tokens` in the broker's JSON shape, `POST /v1/api-keys` in
//! Truora's. Copied together from the entry's ready parts into a buffer allocated at its final
//! size, rather than serialised with serde_json: a hit then escapes and formats nothing, which
//! halves the core's cost of a hit (docs/performance.md); tests hold the bytes to serde_json's.

use std::sync::Arc;
use std::time::Instant;

use crate::cache::Entry;
use crate::metrics::CacheOutcome;
use crate::truora::MINTED_MESSAGE;

/// A token to answer with.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The token and its ready answer bytes.
    pub entry: Arc<Entry>,
    /// Where it came from: a hit, or a token minted for this request or an identical one.
    pub cache: CacheOutcome,
}

impl Issued {
    /// The `POST /v1/tokens` answer: `{"api_key","expires_at","identity_url","cache","expires_in"}`.
    ///
    /// Copied together from the entry's parts, into a buffer allocated at its final size, so
    /// turning it into `Bytes` needs no second allocation.
    pub fn tokens_body(&self, now: Instant) -> Vec<u8> {
        const API_KEY: &[u8] = b"{\"api_key\":\"";
        const EXPIRES_AT: &[u8] = b"\",\"expires_at\":\"";
        const IDENTITY_URL: &[u8] = b"\",\"identity_url\":\"";
        const CACHE: &[u8] = b"\",\"cache\":\"";
        let e = &self.entry;
        let status: &[u8] = if self.cache.is_hit() {
            b"hit\",\"expires_in\":"
        } else {
            b"miss\",\"expires_in\":"
        };
        let mut digits = [0u8; 20];
        let expires_in = Self::decimal(e.remaining(now).as_secs(), &mut digits);
        let (at, prefix) = (e.expires_at_text(), e.identity_prefix());
        e.with_escaped_token(|json, url| {
            joined(&[
                API_KEY,
                json,
                EXPIRES_AT,
                at,
                IDENTITY_URL,
                prefix,
                url,
                CACHE,
                status,
                expires_in,
                b"}",
            ])
        })
    }

    /// `n` in decimal digits, written at the end of `buf`.
    fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return &buf[start..];
            }
        }
    }

    /// The `POST /v1/api-keys` answer, Truora's shape: `{"api_key","message"}`, allocated at
    /// its final size.
    pub fn dropin_body(&self) -> Vec<u8> {
        const API_KEY: &[u8] = b"{\"api_key\":\"";
        const MESSAGE: &[u8] = b"\",\"message\":\"";
        self.entry.with_escaped_token(|json, _| {
            joined(&[API_KEY, json, MESSAGE, MINTED_MESSAGE.as_bytes(), b"\"}"])
        })
    }
}

/// `parts` one after the other, in a buffer allocated at its final size (so `Bytes::from` takes
/// it without another allocation).
fn joined(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}
