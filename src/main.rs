//! The `token-broker` binary: everything lives in the library so tests and benches share it.
#![forbid(unsafe_code)]

/// mimalloc rather than the system allocator: less CPU per cache hit under load and less
/// memory per cached token (docs/performance.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    token_broker::cli::main()
}
