//! The `rotator` binary: logging, then the library's command line.

fn main() -> std::process::ExitCode {
    proxy_lib::install_crypto_provider();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROTATOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var("ROTATOR_LOG_FORMAT").is_ok_and(|v| v == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
    std::process::ExitCode::from(rotator::cli::main(
        std::env::args_os(),
        &rotator::config::ProcessEnv,
    ))
}
