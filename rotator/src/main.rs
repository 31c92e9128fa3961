//! The `rotator` binary: logging, then the library's command line.

use std::ffi::OsString;

fn main() -> std::process::ExitCode {
    proxy_lib::install_crypto_provider();
    let args: Vec<OsString> = std::env::args_os().collect();
    rotator::cli::LOGGING.init(&args);
    std::process::ExitCode::from(rotator::cli::main(args, &rotator::config::ProcessEnv))
}
