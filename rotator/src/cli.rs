//! The command line (clap derive) and the one entry point the binary calls.
// The doc comments below are clap's --help text, written for a terminal, not for rustdoc.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use proxy_lib::cli::{LogFormat, Logging, exit, fatal, say};
use proxy_lib::clock::{SharedClock, SystemClock, rfc3339};
use proxy_lib::identity::Identity;

use crate::client::GrpcIssuer;
use crate::config::{self, Config, Env};
use crate::daemon::{self, LoopOptions};
use crate::metrics::Metrics;
use crate::notify::{self, Systemd};
use crate::reload::Hooks;
use crate::renew::{Outcome, Rotator};
use crate::status::{self, Report};

/// The variable that sets `--log-format` when the flag is not given.
pub const LOG_FORMAT_ENV: &str = "ROTATOR_LOG_FORMAT";

/// The binary's logging convention: the level comes from `RUST_LOG`, or from `ROTATOR_LOG`
/// (the older name, kept as an alias; being the rotator's own, it wins when both are set).
pub const LOGGING: Logging = Logging {
    bin: "rotator",
    format_env: LOG_FORMAT_ENV,
    level_env: &["ROTATOR_LOG", "RUST_LOG"],
    json_flags: &[],
};

/// Keeps a short-lived mesh identity on disk and rotates it atomically.
///
/// Every config key can also be set from the environment as ROTATOR_<KEY> (e.g.
/// ROTATOR_IDENTITY, ROTATOR_BACKOFF_MAX), and Linkerd's LINKERD2_PROXY_IDENTITY_* names
/// are accepted with Linkerd's meaning.
///
/// Exit codes: 0 done, 1 failed, 64 bad flag or argument, 66 the config file is missing or
/// unreadable, 78 invalid configuration; `status` exits with its monitoring codes instead
/// (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, which includes a missing or invalid config).
#[derive(Debug, Parser)]
#[command(name = "rotator", version, about, long_about)]
pub struct Cli {
    /// Log format on stderr; with json every line is a JSON object, errors and notices
    /// included (the level comes from RUST_LOG, or ROTATOR_LOG which wins; default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = LOG_FORMAT_ENV)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The config keys, their environment names and defaults (shown under `--help`).
pub const CONFIG_HELP: &str = "\
Config keys (rotator.toml; environment ROTATOR_<KEY>, dots as underscores):
  identity            required; <sa>.<ns>.serviceaccount.identity.linkerd.<td>
                      (also LINKERD2_PROXY_IDENTITY_LOCAL_NAME)
  dir                 required; the cert dir (also LINKERD2_PROXY_IDENTITY_DIR)
  trust_anchors       required; PEM file or PEM text (also LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS)
  token_file          required; re-read on every attempt (also LINKERD2_PROXY_IDENTITY_TOKEN_FILE)
  issuer_addr         required; host:port (also LINKERD2_PROXY_IDENTITY_SVC_ADDR)
  issuer_name         default linkerd-identity.linkerd.serviceaccount.identity.linkerd.<td>
                      (also LINKERD2_PROXY_IDENTITY_SVC_NAME)
  plaintext           default false (true for a loopback LINKERD2_PROXY_IDENTITY_SVC_ADDR);
                      only for a loopback issuer_addr
  timeout             default 10s; one Certify call
  renew_at            default 0.7 of the lifetime left when received
  jitter              default 0.1 (renew between 0.6 and 0.8)
  margin              default 0.05 of the lifetime: never sleep past notAfter minus it
  clock_skew          default 20s (notBefore backdating assumed for a cert found on disk)
  backoff.min         default 1s
  backoff.max         default 5m
  schedule            default none; cron (5-field crontab, Sunday = 0 or 7; or 6/7-field), UTC
  key_group           default none (key 0600); a group name or gid makes it 0640 for that group
  reload.pidfile      default none; signal this pid after a rotation ...
  reload.process_name ... if /proc/<pid>/comm (or exe) is this name (required with pidfile)
  reload.signal       default HUP (HUP, USR1, USR2)
  reload.http         default none; URL to POST after a rotation
  reload.exec         default none; argv to run after a rotation (env ROTATOR_CERT_DIR)
  reload.timeout      default 10s (http and exec hooks)
  verify.addr         default none; TLS listener that must serve the new cert
  verify.server_name  default the identity
  verify.attempts     default 3 reload+verify attempts
  verify.delay        default 500ms between a reload and its check
  metrics.listen      default none; ip:port for /metrics, /live, /ready, /status (which
                      `status` asks first)
Logging: level from RUST_LOG (or ROTATOR_LOG, which wins), default info; --log-format json
(or ROTATOR_LOG_FORMAT=json) makes every line on stderr JSON.";

/// The config file option shared by run, rotate and status.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The rotator.toml to read [default: none: configure through the environment only].
    #[arg(long, value_name = "FILE", env = "ROTATOR_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as a daemon: renew at 70 % (± 10 % jitter) of each cert's life, on SIGHUP, or on
    /// the cron `schedule`; SIGTERM stops it between swaps. Supports systemd Type=notify.
    #[command(after_help = CONFIG_HELP)]
    Run {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
    },
    /// Run one renewal cycle (the daemon's code path) and exit: 0 when rotated or not due
    /// (prints "not due until <time>"), 1 when it failed, 66 when the config file cannot be
    /// read, 78 when the config is invalid.
    #[command(after_help = CONFIG_HELP)]
    Rotate {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// Rotate even when the cert is not due [default: off].
        #[arg(long)]
        force: bool,
    },
    /// Report on the cert dir. Exit 0 OK, 1 WARNING (renewal overdue or failing),
    /// 2 CRITICAL (missing, expired, invalid), 3 UNKNOWN (e.g. a missing or invalid config:
    /// these monitoring codes replace 66 and 78 here; a bad flag is still 64).
    #[command(after_help = CONFIG_HELP)]
    Status {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// Print the report as one JSON object [default: text].
        #[arg(long)]
        json: bool,
    },
    /// Write key.p8 (PKCS#8 DER, P-256, 0600) and csr.der (CN and one DNS SAN = the
    /// identity) for a real linkerd2-proxy's LINKERD2_PROXY_IDENTITY_DIR. Never overwrites.
    LinkerdBootstrap {
        /// The directory to write to (created if missing) [required].
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The identity, <sa>.<ns>.serviceaccount.identity.linkerd.<trust-domain> [required].
        #[arg(long, value_name = "ID")]
        identity: String,
    },
}

/// Parses `args` and runs the command; returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>, env: &dyn Env) -> u8 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => return proxy_lib::cli::usage_error(e),
    };
    let clock: SharedClock = Arc::new(SystemClock);
    match cli.command {
        Command::Run { config } => with_config(config, env, |c| run(c, clock, env)),
        Command::Rotate { config, force } => with_config(config, env, |c| rotate(c, clock, force)),
        Command::Status { config, json } => {
            let report = match config::load(config.config.as_deref(), env) {
                Ok(c) => status::query(&c, clock.now()),
                Err(e) => Report::unknown(e.to_string()),
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serializes")
                );
            } else {
                print!("{}", report.text());
            }
            report.status.exit_code()
        }
        Command::LinkerdBootstrap { dir, identity } => {
            let id = match Identity::parse(&identity) {
                Ok(id) => id,
                Err(e) => {
                    fatal(format_args!("--identity: {e}"));
                    return exit::USAGE;
                }
            };
            match crate::bootstrap::write(&dir, &id) {
                Ok((k, c)) => {
                    say(format_args!("wrote {} and {}", k.display(), c.display()));
                    0
                }
                Err(e) => {
                    fatal(e);
                    exit::FAILURE
                }
            }
        }
    }
}

fn with_config(arg: ConfigArg, env: &dyn Env, f: impl FnOnce(Config) -> u8) -> u8 {
    match config::load(arg.config.as_deref(), env) {
        Ok(c) => f(c),
        Err(e) => {
            fatal(&e);
            e.exit_code()
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Builds the gRPC client for `config`: TLS verified against the anchors the host trusts
/// (the signed bundle installed in the cert dir, else the configured anchors; re-read
/// on every call), or plaintext when configured; from `source_addr` when set.
pub fn issuer_for(config: &Config) -> GrpcIssuer {
    let issuer = if config.plaintext {
        GrpcIssuer::plaintext(config.issuer_addr.clone(), config.timeout)
    } else {
        GrpcIssuer::tls_trusting(
            config.issuer_addr.clone(),
            config.issuer_name.clone(),
            config.dir.clone(),
            config.trust_anchors.clone(),
            config.timeout,
        )
    };
    issuer.with_source(config.source_addr)
}

fn rotate(config: Config, clock: SharedClock, force: bool) -> u8 {
    let issuer = issuer_for(&config);
    let hooks = Hooks::new(config.reload.clone(), config.dir.clone());
    let mut r = Rotator::new(config, clock, issuer, hooks, Metrics::new());
    let result = runtime().block_on(r.cycle(force));
    match result {
        Ok(Outcome::NotDue { until }) => {
            println!("not due until {}", rfc3339(until));
            0
        }
        Ok(Outcome::Reloaded { serial, next }) => {
            let verified = if r.config().verify.is_some() {
                " and verified"
            } else {
                ""
            };
            println!(
                "reloaded{verified}: serial {serial}, installed by an earlier run; next renewal at {}",
                rfc3339(next)
            );
            0
        }
        Ok(Outcome::Rotated {
            serial,
            sha256,
            not_after,
            next,
        }) => {
            println!(
                "rotated: serial {serial} sha256 {sha256} valid until {}; next renewal at {}",
                rfc3339(not_after),
                rfc3339(next)
            );
            0
        }
        Err(e) => {
            fatal(format_args!("rotation failed: {e}"));
            exit::FAILURE
        }
    }
}

fn run(config: Config, clock: SharedClock, env: &dyn Env) -> u8 {
    let rt = runtime();
    let watchdog = notify::watchdog_interval(env);
    rt.block_on(async move {
        let (handle, controls) = daemon::controls();
        if let Err(e) = crate::signals::install(handle.clone()) {
            fatal(format_args!("cannot install signal handlers: {e}"));
            return exit::FAILURE;
        }
        let issuer = issuer_for(&config);
        run_with(config, clock, issuer, handle, controls, watchdog).await
    })
}

async fn run_with(
    config: Config,
    clock: SharedClock,
    issuer: GrpcIssuer,
    handle: daemon::Handle,
    controls: daemon::Controls,
    watchdog: Option<std::time::Duration>,
) -> u8 {
    let metrics = Metrics::new();
    let hooks = Hooks::new(config.reload.clone(), config.dir.clone());
    let metrics_listen = config.metrics_listen;
    tracing::info!(identity = %config.identity, dir = %config.dir.display(), "rotator started");
    let rotator = Rotator::new(config, clock, issuer, hooks, metrics.clone());
    let mut server = None;
    if let Some(addr) = metrics_listen {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                fatal(format_args!("cannot listen on {addr} for metrics: {e}"));
                return exit::FAILURE;
            }
        };
        tracing::info!(%addr, "serving metrics");
        let mut stop = controls.shutdown.clone();
        let router = metrics.router().merge(rotator.status_source().router());
        server = Some(tokio::spawn(async move {
            let _ = proxy_lib::admin::serve(listener, router, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        }));
    }
    daemon::run(
        rotator,
        Arc::new(Systemd),
        controls,
        LoopOptions {
            watchdog,
            seed: None,
        },
    )
    .await;
    handle.shutdown();
    if let Some(s) = server {
        let _ = s.await;
    }
    0
}
