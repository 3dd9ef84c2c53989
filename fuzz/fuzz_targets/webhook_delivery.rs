//! Fuzz target: `token_broker::invariants::webhook_delivery` (see that function for what must
//! hold).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    token_broker::invariants::webhook_delivery(data);
});
