//! The `token-broker` binary: everything lives in the library so tests and benches share it.
#![forbid(unsafe_code)]

/// mimalloc rather than glibc's malloc: measured in docs/performance.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    token_broker::app::cli::main()
}
