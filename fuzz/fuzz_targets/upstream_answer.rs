//! Fuzz target: `token_broker::invariants::upstream_answer` (see that function for what must hold).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    token_broker::invariants::upstream_answer(data);
});
