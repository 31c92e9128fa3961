//! `mtls-proxy`: starts logging, parses the command line and runs [`proxy_lib::proxy::run`].

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use proxy_lib::cli::{self, exit};
use proxy_lib::proxy::config::LOGGING;
use proxy_lib::proxy::{Args, ConfigError};

fn main() -> ExitCode {
    proxy_lib::install_crypto_provider();
    let argv: Vec<OsString> = std::env::args_os().collect();
    LOGGING.init(&argv);
    let args = match Args::try_parse_from(&argv) {
        Ok(a) => a,
        Err(e) => return ExitCode::from(cli::usage_error(e)),
    };
    let from_file = args.config.is_some();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            cli::fatal(&e);
            return ExitCode::from(match e {
                // Without a config file every value came from a flag: a usage error.
                ConfigError::Invalid(_) if !from_file => exit::USAGE,
                e => e.exit_code(),
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            cli::fatal(format_args!("cannot start the async runtime: {e}"));
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(proxy_lib::proxy::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "mtls-proxy failed");
            ExitCode::from(exit::FAILURE)
        }
    }
}
