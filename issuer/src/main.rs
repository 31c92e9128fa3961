//! The `issuer` binary: parse the command line, start logging, run the library.

use std::process::ExitCode;

use clap::Parser;
use issuer::cli::{Cli, EXIT_USAGE};

fn main() -> ExitCode {
    proxy_lib::install_crypto_provider();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    issuer::cli::run(cli)
}
