//! Request ids: an incoming `X-Request-Id` is kept when it is 1 to 64 characters of
//! `A-Z a-z 0-9 . _ : -` (anything else could be a way to smuggle text into the logs, and 64
//! characters is room for a UUID or a W3C trace id but not for a token); otherwise the broker
//! makes one: a random per-process prefix and a counter, no system call per request. Either way
//! it is sent back on the response and written on the access line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use crate::secret::hex;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The longest incoming request id kept.
pub const MAX_REQUEST_ID_LEN: usize = 64;

fn prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let mut raw = [0u8; 6];
        if getrandom::fill(&mut raw).is_err() {
            // No randomness: the start time still tells processes apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            raw.copy_from_slice(&nanos.to_le_bytes()[..6]);
        }
        hex(&raw)
    })
}

/// True when `value` may be used as a request id as it came.
pub fn acceptable(value: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A made request id's bytes, owned by the header value: one allocation when made, none when
/// the value is cloned (the stack hands a clone down to the audit trail).
struct IdBytes {
    buf: [u8; 40],
    len: usize,
}

impl AsRef<[u8]> for IdBytes {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A new request id: `<12 hex digits of this process>-<counter>`.
pub fn generate() -> HeaderValue {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 40];
    let len = {
        let mut w = &mut buf[..];
        // 12 + 1 + at most 20 digits fits in 40 bytes.
        let _ = write!(w, "{}-{n}", prefix());
        40 - w.len()
    };
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(IdBytes { buf, len }))
        .unwrap_or(HeaderValue::from_static("-"))
}

/// The request's id: its own `X-Request-Id` when acceptable, else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if acceptable(v.as_bytes()) => v.clone(),
        _ => generate(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_incoming_id_is_kept() {
        let mut h = HeaderMap::new();
        for id in [
            "3f2c9a1e-7b4d-4c2a-9e1f-0a1b2c3d4e5f",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "req.42:a_b",
        ] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_static(id));
            assert_eq!(request_id(&h), id);
        }
    }

    #[test]
    fn an_unsafe_or_oversized_incoming_id_is_replaced() {
        let mut h = HeaderMap::new();
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        for bad in [
            "",
            "has space",
            "quote\"d",
            "user@example.com",
            "+573100000000",
            "a=b",
            long.as_str(),
        ] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&h);
            assert_ne!(id, bad);
            assert!(id.to_str().unwrap().starts_with(prefix()), "{id:?}");
        }
        assert!(acceptable("a".repeat(MAX_REQUEST_ID_LEN).as_bytes()));
    }

    #[test]
    fn a_made_id_is_cloned_without_copying_its_bytes() {
        let id = generate();
        let copy = id.clone();
        assert_eq!(id.as_bytes().as_ptr(), copy.as_bytes().as_ptr());
    }

    #[test]
    fn generated_ids_are_distinct_acceptable_and_share_the_process_prefix() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| request_id(&HeaderMap::new()).to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert!(acceptable(id.as_bytes()), "{id}");
            let (p, n) = id.split_once('-').unwrap();
            assert_eq!(p.len(), 12);
            assert_eq!(p, prefix());
            assert!(n.parse::<u64>().is_ok());
        }
    }
}
