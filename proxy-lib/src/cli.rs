//! The command-line convention the three binaries share: sysexits exit codes, logging set up
//! from `--log-format plain|json` (or the binary's `*_LOG_FORMAT` variable) and `RUST_LOG`,
//! and stderr output that stays JSON when JSON was asked for: usage errors, fatal errors,
//! notices and panics included, so a log pipeline never gets a bare line.
//!
//! A `main` calls [`Logging::init`] with the raw arguments before clap parses them (the
//! format is read from the arguments and the environment), then reports through
//! [`usage_error`], [`say`] and [`fatal`] instead of printing to stderr itself.

use std::ffi::OsString;
use std::fmt::Display;
use std::sync::OnceLock;

/// Exit codes, from sysexits(3), the same in every binary (`rotator status` keeps its own
/// monitoring codes 0–3).
pub mod exit {
    /// The command ran and failed (a runtime failure).
    pub const FAILURE: u8 = 1;
    /// `EX_USAGE`: a bad flag or argument.
    pub const USAGE: u8 = 64;
    /// `EX_NOINPUT`: a named input file (the config file) is missing or unreadable.
    pub const NO_INPUT: u8 = 66;
    /// `EX_CONFIG`: the configuration is invalid (unknown key, wrong type, bad value).
    pub const CONFIG: u8 = 78;
}

/// How a binary writes its logs on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, every line.
    Json,
}

impl LogFormat {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "plain" => Some(Self::Plain),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// One binary's logging convention: its name and the environment variables it reads.
#[derive(Debug, Clone, Copy)]
pub struct Logging {
    /// The binary's name (prefix of plain-text error lines).
    pub bin: &'static str,
    /// The variable that sets the format when `--log-format` is not given
    /// (e.g. `ISSUER_LOG_FORMAT`).
    pub format_env: &'static str,
    /// The variables that set the level filter; the first one set wins (`RUST_LOG`, after a
    /// binary's own older name if it has one).
    pub level_env: &'static [&'static str],
    /// Deprecated flags that mean `--log-format json` (the issuer's `--log-json`).
    pub json_flags: &'static [&'static str],
}

/// The level when no level variable is set (or the one set does not parse).
pub const DEFAULT_LEVEL: &str = "info";

/// The binary name and format chosen by [`Logging::init`].
static ACTIVE: OnceLock<(&'static str, LogFormat)> = OnceLock::new();

impl Logging {
    /// The format asked for by the raw command line (`--log-format F`, `--log-format=F`, or
    /// one of [`Logging::json_flags`]), else by [`Logging::format_env`], else plain. Read
    /// before clap parses, so that a usage error is reported in the format asked for; a value
    /// clap will refuse counts as not given.
    pub fn format(&self, args: &[OsString], env: impl Fn(&str) -> Option<String>) -> LogFormat {
        let mut flag = None;
        let mut alias = false;
        let mut args = args.iter().skip(1).map(|a| a.to_str());
        while let Some(arg) = args.next() {
            let Some(arg) = arg else { continue };
            if arg == "--" {
                break;
            }
            if self.json_flags.contains(&arg) {
                alias = true;
            } else if arg == "--log-format" {
                flag = args.next().flatten().and_then(LogFormat::parse);
            } else if let Some(v) = arg.strip_prefix("--log-format=") {
                flag = LogFormat::parse(v);
            }
        }
        if alias {
            return LogFormat::Json;
        }
        flag.or_else(|| env(self.format_env).as_deref().and_then(LogFormat::parse))
            .unwrap_or_default()
    }

    /// Installs the process's log subscriber on stderr in the format [`Logging::format`]
    /// reads from `args` and the process environment, with the level filter from the first
    /// set variable of [`Logging::level_env`] (default `info`). With JSON, panics are logged
    /// as JSON too. Call once, first thing in `main`; returns the format.
    pub fn init(&self, args: &[OsString]) -> LogFormat {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let format = self.format(args, env);
        let level = self
            .level_env
            .iter()
            .find_map(|var| env(var).map(|value| (*var, value)));
        let (filter, refused) = match level {
            None => (tracing_subscriber::EnvFilter::new(DEFAULT_LEVEL), None),
            Some((var, value)) => match tracing_subscriber::EnvFilter::try_new(&value) {
                Ok(f) => (f, None),
                Err(e) => (
                    tracing_subscriber::EnvFilter::new(DEFAULT_LEVEL),
                    Some((var, e)),
                ),
            },
        };
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colours only on a terminal: journald and log files get plain text.
            .with_ansi(
                format == LogFormat::Plain && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            );
        let installed = match format {
            LogFormat::Plain => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
        if installed.is_ok() && format == LogFormat::Json {
            // The default hook would print a bare "thread 'main' panicked at" line.
            std::panic::set_hook(Box::new(|info| tracing::error!("{info}")));
        }
        let _ = ACTIVE.set((self.bin, format));
        if let Some((var, error)) = refused {
            tracing::warn!(%error, "{var} is not a valid level filter; logging at {DEFAULT_LEVEL}");
        }
        format
    }
}

/// The format [`Logging::init`] chose (plain when it was not called, e.g. in tests).
pub fn format() -> LogFormat {
    ACTIVE.get().map_or(LogFormat::Plain, |(_, f)| *f)
}

/// Reports a clap error and returns the exit code: `--help` and `--version` print on stdout
/// and give 0; anything else is a usage error (64), printed as clap renders it, or as one
/// JSON line in the JSON format.
pub fn usage_error(error: clap::Error) -> u8 {
    if !error.use_stderr() {
        let _ = error.print();
        return 0;
    }
    match format() {
        LogFormat::Plain => {
            let _ = error.print();
        }
        LogFormat::Json => {
            let text = error.render().to_string();
            let text = text.trim();
            tracing::error!("{}", text.strip_prefix("error: ").unwrap_or(text));
        }
    }
    exit::USAGE
}

/// A line for the operator on stderr (`wrote FILE`, `created token ...`): as it is in the
/// plain format, an info event in JSON. Never for what a script reads: that goes to stdout.
pub fn say(line: impl Display) {
    match format() {
        LogFormat::Plain => eprintln!("{line}"),
        LogFormat::Json => tracing::info!("{line}"),
    }
}

/// A fatal error, just before the binary exits non-zero: `BIN: error: ...` in the plain
/// format, an error event in JSON.
pub fn fatal(error: impl Display) {
    match ACTIVE.get() {
        Some((_, LogFormat::Json)) => tracing::error!("{error}"),
        Some((bin, LogFormat::Plain)) => eprintln!("{bin}: error: {error}"),
        None => eprintln!("error: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGGING: Logging = Logging {
        bin: "x",
        format_env: "X_LOG_FORMAT",
        level_env: &["RUST_LOG"],
        json_flags: &["--log-json"],
    };

    fn format(args: &[&str], env: Option<&str>) -> LogFormat {
        let args: Vec<OsString> = std::iter::once("x")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        LOGGING.format(&args, |name| {
            assert_eq!(name, "X_LOG_FORMAT");
            env.map(str::to_string)
        })
    }

    #[test]
    fn the_flag_wins_over_the_variable_and_plain_is_the_default() {
        use LogFormat::*;
        let cases: &[(&[&str], Option<&str>, LogFormat)] = &[
            (&[], None, Plain),
            (&[], Some("json"), Json),
            (&[], Some("xml"), Plain),
            (&["run", "--log-format", "json"], None, Json),
            (&["--log-format=json", "run"], None, Json),
            (&["--log-format", "plain"], Some("json"), Plain),
            (&["--log-format", "xml"], Some("json"), Json),
            (&["--log-format"], None, Plain),
            (
                &["--log-format", "json", "--log-format", "plain"],
                None,
                Plain,
            ),
            (&["serve", "--log-json"], None, Json),
            (&["--log-json", "--log-format", "plain"], None, Json),
            // After `--` nothing is a flag.
            (&["--", "--log-format", "json"], None, Plain),
        ];
        for (args, env, want) in cases {
            assert_eq!(format(args, *env), *want, "{args:?} {env:?}");
        }
    }
}
