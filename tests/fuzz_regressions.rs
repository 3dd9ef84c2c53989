//! Every input the fuzzers were seeded with or ever found a crash with (fuzz/seeds/<target>/,
//! fuzz/regressions/<target>/) runs through the same invariant the fuzz target checks, so a
//! fixed crash stays fixed without a fuzzer. `make fuzz` runs the fuzzers themselves.

use std::path::Path;

fn run_all(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                check(&std::fs::read(&path).unwrap());
                ran += 1;
            }
        }
    }
    assert!(ran > 0, "no seed or regression input for {target}");
}

#[test]
fn form_body_inputs_hold_the_invariants() {
    run_all("form_body", token_broker::invariants::form_body);
}

#[test]
fn json_body_inputs_hold_the_invariants() {
    run_all("json_body", token_broker::invariants::json_body);
}

#[test]
fn upstream_answer_inputs_hold_the_invariants() {
    run_all("upstream_answer", token_broker::invariants::upstream_answer);
}

#[test]
fn cache_key_inputs_hold_the_invariants() {
    run_all("cache_key", token_broker::invariants::cache_key);
}

#[test]
fn service_account_token_inputs_hold_the_invariants() {
    run_all(
        "service_account_token",
        token_broker::invariants::service_account_token,
    );
}

#[test]
fn webhook_delivery_inputs_hold_the_invariants() {
    run_all(
        "webhook_delivery",
        token_broker::invariants::webhook_delivery,
    );
}
