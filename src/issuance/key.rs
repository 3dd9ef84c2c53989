//! Which requests share a token: the cache key is the SHA-256 of a length-prefixed canonical
//! encoding of the caller's id and every forwarded field. So field order does not matter, no two
//! distinct requests collide by delimiter tricks, different callers never share an entry, and no
//! raw user data is held as a key.

use sha2::{Digest, Sha256};

use super::request::{Field, TokenRequest};
use crate::cache::CacheKey;

/// Builds the cache key of a caller's request.
pub fn key(caller: &str, req: &TokenRequest<'_>) -> CacheKey {
    fn put(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u32).to_be_bytes());
        h.update(bytes);
    }
    let mut h = Sha256::new();
    h.update(b"token-broker/cache-key/v1\0");
    put(&mut h, caller.as_bytes());
    req.visit(|field| match field {
        Field::One(name, value) => {
            h.update([1]);
            put(&mut h, name.as_bytes());
            put(&mut h, value.as_bytes());
        }
        Field::List(name, values) => {
            h.update([2]);
            put(&mut h, name.as_bytes());
            h.update((values.len() as u32).to_be_bytes());
            for v in values {
                put(&mut h, v.as_bytes());
            }
        }
        Field::Metadata(name, value) => {
            h.update([3]);
            put(&mut h, name.as_bytes());
            put(&mut h, value.as_bytes());
        }
    });
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuance::request::owned_form as req;

    const BASE: &str = "country=CO&flow_id=IPF1&redirect_url=https://a.example&account_id=u1";

    #[test]
    fn field_order_does_not_change_the_key() {
        let a = req(BASE);
        let b = req("account_id=u1&redirect_url=https://a.example&flow_id=IPF1&country=CO");
        assert_eq!(key("c", &a), key("c", &b));
    }

    #[test]
    fn another_caller_user_or_field_changes_the_key() {
        let base = key("c", &req(BASE));
        assert_ne!(base, key("d", &req(BASE)));
        assert_ne!(base, key("c", &req(&BASE.replace("u1", "u2"))));
        assert_ne!(base, key("c", &req(&BASE.replace("IPF1", "IPF2"))));
        assert_ne!(base, key("c", &req(&BASE.replace("CO", "BR"))));
        assert_ne!(
            base,
            key("c", &req(&format!("{BASE}&document_type=passport")))
        );
        let hub_a = key("c", &req(&format!("{BASE}&billing_hub=hub-a")));
        assert_ne!(base, hub_a);
        assert_ne!(hub_a, key("c", &req(&format!("{BASE}&billing_hub=hub-b"))));
    }

    #[test]
    fn delimiter_tricks_do_not_collide() {
        // The same bytes split differently between two metadata fields.
        let a = req(&format!(
            "{BASE}&start_variables.metadata.a=1b&start_variables.metadata.c=2"
        ));
        let b = req(&format!(
            "{BASE}&start_variables.metadata.a=1&start_variables.metadata.bc=2"
        ));
        assert_ne!(key("c", &a), key("c", &b));
        // One email with a comma-like join versus two emails.
        let one = req(&format!("{BASE}&emails=a@x.com"));
        let two = req(&format!("{BASE}&emails=a@x.com&emails=b@x.com"));
        assert_ne!(key("c", &one), key("c", &two));
    }
}
