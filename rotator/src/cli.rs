//! The command line (clap derive) and the one entry point the binary calls.
// The doc comments below are clap's --help text, written for a terminal, not for rustdoc.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use proxy_lib::clock::{SharedClock, SystemClock, rfc3339};
use proxy_lib::identity::Identity;

use crate::client::GrpcIssuer;
use crate::config::{self, Config, ConfigError, Env};
use crate::daemon::{self, LoopOptions};
use crate::metrics::Metrics;
use crate::notify::{self, Systemd};
use crate::reload::Hooks;
use crate::renew::{Outcome, Rotator};
use crate::status::{self, Report};

/// Exit code for usage errors (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for an unusable configuration (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// Exit code when a cycle failed.
pub const EXIT_FAILURE: u8 = 1;

/// Keeps a short-lived mesh identity on disk and rotates it atomically.
///
/// Every config key can also be set from the environment as ROTATOR_<KEY> (e.g.
/// ROTATOR_IDENTITY, ROTATOR_BACKOFF_MAX), and Linkerd's LINKERD2_PROXY_IDENTITY_* names
/// are accepted with Linkerd's meaning.
#[derive(Debug, Parser)]
#[command(name = "rotator", version, about, long_about)]
pub struct Cli {
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
  metrics.listen      default none; ip:port for /metrics, /live, /ready
Logging: ROTATOR_LOG (default info), ROTATOR_LOG_FORMAT=json.";

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
    /// (prints "not due until <time>"), 1 when it failed, 78 when the config is unusable.
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
    /// 2 CRITICAL (missing, expired, invalid), 3 UNKNOWN (e.g. unusable config).
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
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    let clock: SharedClock = Arc::new(SystemClock);
    match cli.command {
        Command::Run { config } => with_config(config, env, |c| run(c, clock, env)),
        Command::Rotate { config, force } => with_config(config, env, |c| rotate(c, clock, force)),
        Command::Status { config, json } => {
            let report = match config::load(config.config.as_deref(), env) {
                Ok(c) => status::report(&c, clock.now()),
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
                    eprintln!("rotator: --identity: {e}");
                    return EXIT_USAGE;
                }
            };
            match crate::bootstrap::write(&dir, &id) {
                Ok((k, c)) => {
                    eprintln!("wrote {} and {}", k.display(), c.display());
                    0
                }
                Err(e) => {
                    eprintln!("rotator: {e}");
                    EXIT_FAILURE
                }
            }
        }
    }
}

fn with_config(arg: ConfigArg, env: &dyn Env, f: impl FnOnce(Config) -> u8) -> u8 {
    match config::load(arg.config.as_deref(), env) {
        Ok(c) => f(c),
        Err(e) => {
            eprintln!("rotator: {e}");
            if matches!(e, ConfigError::Read { .. }) {
                EXIT_USAGE
            } else {
                EXIT_CONFIG
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Builds the gRPC client for `config`: TLS verified against the configured anchors (re-read
/// on every call), or plaintext when configured.
pub fn issuer_for(config: &Config) -> GrpcIssuer {
    if config.plaintext {
        return GrpcIssuer::plaintext(config.issuer_addr.clone(), config.timeout);
    }
    GrpcIssuer::tls_reloading(
        config.issuer_addr.clone(),
        config.issuer_name.clone(),
        config.trust_anchors.clone(),
        config.timeout,
    )
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
            eprintln!("rotator: rotation failed: {e}");
            EXIT_FAILURE
        }
    }
}

fn run(config: Config, clock: SharedClock, env: &dyn Env) -> u8 {
    let rt = runtime();
    let watchdog = notify::watchdog_interval(env);
    rt.block_on(async move {
        let (handle, controls) = daemon::controls();
        if let Err(e) = crate::signals::install(handle.clone()) {
            eprintln!("rotator: cannot install signal handlers: {e}");
            return EXIT_FAILURE;
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
    let mut server = None;
    if let Some(addr) = config.metrics_listen {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("rotator: cannot listen on {addr} for metrics: {e}");
                return EXIT_FAILURE;
            }
        };
        tracing::info!(%addr, "serving metrics");
        let mut stop = controls.shutdown.clone();
        let router = metrics.router();
        server = Some(tokio::spawn(async move {
            let _ = proxy_lib::admin::serve(listener, router, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        }));
    }
    let hooks = Hooks::new(config.reload.clone(), config.dir.clone());
    tracing::info!(identity = %config.identity, dir = %config.dir.display(), "rotator started");
    let rotator = Rotator::new(config, clock, issuer, hooks, metrics);
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
