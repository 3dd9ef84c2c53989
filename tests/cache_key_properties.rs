//! Properties of the cache key (proptest): the same for any order of the fields; different
//! whenever the caller, the user or any forwarded field differs; and no two distinct requests
//! collide however their values are split between fields (no delimiter tricks).

use proptest::prelude::*;
use token_broker::issuance::key::key;
use token_broker::issuance::TokenRequest;
use token_broker::truora::COUNTRIES;

/// A request as (name, value) pairs; the small alphabets make near-collisions likely.
fn fields() -> impl Strategy<Value = Vec<(String, String)>> {
    let value = "[a-c=&.,_-]{1,6}";
    let meta_name = "[a-c_-]{1,4}";
    (
        prop::sample::select(COUNTRIES.to_vec()),
        "[a-c0-2_-]{1,6}",
        "[a-c]{1,4}",
        proptest::option::of("[a-c0-2._-]{1,6}"),
        proptest::option::of("[a-c]{1,3}"),
        proptest::option::of(prop::sample::select(vec!["passport", "pep", "national-id"])),
        prop::collection::btree_map(meta_name, value, 0..4),
    )
        .prop_map(|(country, flow, host, account, email, doc, meta)| {
            let mut f = vec![
                ("country".to_owned(), country.to_owned()),
                ("flow_id".to_owned(), flow),
                (
                    "redirect_url".to_owned(),
                    format!("https://{host}.example/x"),
                ),
            ];
            if let Some(a) = account {
                f.push(("account_id".into(), a));
            }
            if let Some(e) = email {
                f.push(("emails".into(), format!("{e}@example.com")));
            }
            if let Some(d) = doc {
                f.push(("document_type".into(), d.to_owned()));
            }
            for (k, v) in meta {
                f.push((format!("start_variables.metadata.{k}"), v));
            }
            f
        })
}

fn encode(fields: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        s.append_pair(k, v);
    }
    s.finish()
}

fn key_of(caller: &str, fields: &[(String, String)]) -> [u8; 32] {
    let body = encode(fields);
    let req = TokenRequest::from_form(body.as_bytes()).expect("generated requests are valid");
    key(caller, &req)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_key_is_the_same_for_any_field_order(
        (original, shuffled) in fields().prop_flat_map(|f| (Just(f.clone()), Just(f).prop_shuffle()))
    ) {
        prop_assert_eq!(key_of("c", &original), key_of("c", &shuffled));
    }

    #[test]
    fn another_caller_never_shares_a_key(f in fields(), a in "[a-z]{1,5}", b in "[a-z]{1,5}") {
        prop_assume!(a != b);
        prop_assert_ne!(key_of(&a, &f), key_of(&b, &f));
    }

    #[test]
    fn changing_any_one_field_changes_the_key(
        f in fields(),
        which in any::<prop::sample::Index>(),
        suffix in "[a-c]{1,2}",
    ) {
        let mut g = f.clone();
        let i = which.index(g.len());
        let (name, value) = g[i].clone();
        g[i].1 = match name.as_str() {
            "country" => COUNTRIES.iter().find(|c| **c != value).unwrap().to_string(),
            "document_type" => if value == "pep" { "passport".into() } else { "pep".into() },
            "redirect_url" => value.replace(".example", &format!("{suffix}.example")),
            "emails" => format!("{suffix}{value}"),
            _ => format!("{value}{suffix}"),
        };
        prop_assert_ne!(key_of("c", &f), key_of("c", &g));
    }

    #[test]
    fn distinct_requests_never_collide(a in fields(), b in fields()) {
        let (ba, bb) = (encode(&a), encode(&b));
        let ra = TokenRequest::from_form(ba.as_bytes()).unwrap();
        let rb = TokenRequest::from_form(bb.as_bytes()).unwrap();
        prop_assert_eq!(ra == rb, key("c", &ra) == key("c", &rb));
    }
}
