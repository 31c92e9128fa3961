//! The `issuer` binary: start logging, parse the command line, run the library.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use issuer::cli::{Cli, LOGGING};

fn main() -> ExitCode {
    proxy_lib::install_crypto_provider();
    let args: Vec<OsString> = std::env::args_os().collect();
    LOGGING.init(&args);
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => return ExitCode::from(proxy_lib::cli::usage_error(e)),
    };
    if cli.log_json {
        tracing::warn!("--log-json is deprecated: use --log-format json");
    }
    issuer::cli::run(cli)
}
