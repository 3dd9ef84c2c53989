//! The `token-broker` binary: everything lives in the library so tests and benches share it.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    token_broker::app::cli::main()
}
