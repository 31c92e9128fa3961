//! The `issuer` command line: `init`, `ca new-issuer|show|sign-bundle`, `token create|list|revoke`,
//! `revoke`, `workload register|list|remove`, `serve`. Each subcommand
//! turns its flags into library calls; `main.rs` only parses and maps the exit code.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use proxy_lib::cli::{LogFormat, Logging, fatal, say};
use proxy_lib::clock::{SharedClock, SystemClock};
use proxy_lib::identity::TrustDomain;

use crate::config::{Config, Overrides};
use crate::error::{Error, Result};
use crate::tokens::IpNet;

mod token;
pub mod workload;

/// The variable that sets `--log-format` when the flag is not given.
pub const LOG_FORMAT_ENV: &str = "ISSUER_LOG_FORMAT";

/// The binary's logging convention (the level comes from `RUST_LOG`; `--log-json` is the
/// deprecated spelling of `--log-format json`).
pub const LOGGING: Logging = Logging {
    bin: "issuer",
    format_env: LOG_FORMAT_ENV,
    level_env: &["RUST_LOG"],
    json_flags: &["--log-json"],
};

/// Signs short-lived workload certificates over Linkerd's identity API.
///
/// Configuration: issuer.toml, then ISSUER_<KEY> variables (dots as underscores, e.g.
/// ISSUER_LIMITS_MAX_REQUEST_BYTES), then flags; each replaces the keys it sets.
///
/// Exit codes: 0 done, 1 failed, 64 bad flag or argument, 66 a named input file (the config
/// file, or a CA file at start) is missing or unreadable, 78 invalid configuration.
#[derive(Debug, Parser)]
#[command(name = "issuer", version, about, long_about)]
pub struct Cli {
    /// Log format on stderr; with json every line is a JSON object, errors and notices
    /// included (the level comes from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = LOG_FORMAT_ENV)]
    pub log_format: LogFormat,
    /// Deprecated: --log-format json.
    #[arg(long, global = true, hide = true)]
    pub log_json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a trust anchor and issuer CA in DIR (or take the cluster's trust with
    /// --trust-anchors), with an issuer.toml naming them.
    Init(InitArgs),
    /// Manage the issuer CA: sign a new issuer pair, show the chain and its expiries.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Manage bootstrap tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke an identity: renewal by certificate is refused for every certificate of it
    /// issued before now, and its tokens created before now stop working (a token created
    /// afterwards bootstraps it again).
    Revoke(RevokeArgs),
    /// Register hosts as Linkerd ExternalWorkloads, each with a bootstrap token bound to its
    /// identity and address; list and remove them.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Serve the Certify API.
    Serve(ServeArgs),
}

/// Where the configuration is.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ConfigArgs {
    /// Short for `--config DIR/issuer.toml`.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// The config file path.
    pub fn path(&self) -> PathBuf {
        match (&self.config, &self.dir) {
            (Some(c), _) => c.clone(),
            (None, Some(d)) => Config::path_in_dir(d),
            (None, None) => PathBuf::from(crate::config::CONFIG_FILE),
        }
    }
}

/// `issuer init`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("trust_issuer").args(["issuer_cert", "anchor_key"])))]
pub struct InitArgs {
    /// Directory to create the CA in.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Trust domain.
    #[arg(long, default_value = proxy_lib::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: TrustDomain,
    /// The control-plane namespace in Linkerd names (`identity.<ns>.<trust-domain>`).
    #[arg(long, value_name = "NS", default_value = crate::ca::ops::DEFAULT_CONTROL_PLANE_NAMESPACE)]
    pub control_plane_namespace: String,
    /// Validity of the trust anchor (a new anchor only).
    #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration, conflicts_with = "trust_anchors")]
    pub anchor_validity: Duration,
    /// Validity of the issuer certificate init signs (capped at the anchor's notAfter).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration, conflicts_with = "issuer_cert")]
    pub issuer_validity: Duration,
    /// Use the cluster's trust anchors (a PEM bundle; several roots during an anchor
    /// rotation) instead of minting a new anchor; needs --issuer-cert/--issuer-key or
    /// --anchor-key.
    #[arg(long, value_name = "FILE", requires = "trust_issuer")]
    pub trust_anchors: Option<PathBuf>,
    /// With --trust-anchors: the issuer certificate, then any intermediates up to the anchor
    /// (Linkerd's `linkerd-identity-issuer` Secret crt.pem/tls.crt, cert-manager, step).
    #[arg(long, value_name = "FILE", requires_all = ["trust_anchors", "issuer_key"])]
    pub issuer_cert: Option<PathBuf>,
    /// The issuer certificate's key (PKCS#8 or SEC1 `EC PRIVATE KEY`, PEM or DER).
    #[arg(long, value_name = "FILE", requires = "issuer_cert")]
    pub issuer_key: Option<PathBuf>,
    /// With --trust-anchors: the key of one of the anchors; init signs a new issuer under
    /// it. Read only, never copied into DIR.
    #[arg(long, value_name = "FILE", requires = "trust_anchors")]
    pub anchor_key: Option<PathBuf>,
    /// Give the files the issuer service reads (all but anchor.key) to USER, and to GROUP if
    /// given (e.g. `--owner issuer`, the service's user). Needs root.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub owner: Option<crate::init::Owner>,
}

/// `issuer ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Sign a new issuer pair with an anchor's (or an intermediate's) key and replace
    /// issuer.crt and issuer.key atomically; the running issuer picks it up by itself.
    NewIssuer(CaNewIssuerArgs),
    /// Print the issuer chain and the anchors (subjects, SHA-256 fingerprints, expiries);
    /// exits 1 when the pair does not load or a link has less than `[ca] warn_before` left.
    Show(CaShowArgs),
    /// Sign a trust bundle offline with an anchor's key, for hosts to accept it: writes
    /// OUT/ca.crt.sig and OUT/ca.crt. Published in the issuer's CA dir, the running issuer
    /// serves it to hosts (see README, "Rotating the trust anchor").
    SignBundle(CaSignBundleArgs),
}

/// `issuer ca sign-bundle`.
#[derive(Debug, Args)]
pub struct CaSignBundleArgs {
    /// The key of an anchor in the bundle that the hosts trust now (ECDSA P-256); read only.
    #[arg(long, value_name = "FILE")]
    pub anchor_key: PathBuf,
    /// The new anchor set, PEM (every root hosts should trust, in order).
    #[arg(long, value_name = "FILE")]
    pub bundle: PathBuf,
    /// Where to write ca.crt and ca.crt.sig (the issuer's CA dir publishes them).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
    /// The bundle's sequence: above every earlier bundle's, hosts refuse a lower one
    /// [default: the current Unix time in seconds].
    #[arg(long, value_name = "N")]
    pub sequence: Option<u64>,
    /// Also print, on stdout, the trust-roots ConfigMap NAME holding the bundle
    /// (`ca-bundle.crt`) and its signature (`ca-bundle.crt.sig`), as YAML for
    /// `kubectl apply -f -` (the issuer's `[ca] source = "kubernetes"` serves it signed).
    #[arg(long, value_name = "NAME")]
    pub configmap: Option<String>,
    /// The ConfigMap's namespace (with --configmap).
    #[arg(long, value_name = "NS", default_value = crate::kubernetes::DEFAULT_NAMESPACE, requires = "configmap")]
    pub namespace: String,
}

/// `issuer ca new-issuer`.
#[derive(Debug, Args)]
pub struct CaNewIssuerArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: ConfigArgs,
    /// The key of an anchor in ca.crt (or of an intermediate in issuer.crt); read only.
    #[arg(long, value_name = "FILE")]
    pub anchor_key: PathBuf,
    /// Validity of the new issuer certificate (capped at the signer's notAfter).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub lifetime: Duration,
}

/// `issuer ca show`.
#[derive(Debug, Args)]
pub struct CaShowArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: ConfigArgs,
}

/// `issuer token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for one identity; prints it alone on stdout (or writes it to --out).
    Create(TokenCreateArgs),
    /// List tokens (never the tokens themselves).
    List(TokenListArgs),
    /// Revoke tokens by id.
    Revoke(TokenRevokeArgs),
}

/// Where the token records are: the store the configuration names, or Kubernetes.
#[derive(Debug, Args)]
#[group(id = "token_store", required = true, multiple = true)]
pub struct TokenStoreArgs {
    /// Short for `--config DIR/issuer.toml`.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub dir: Option<PathBuf>,
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Keep the records in Kubernetes Secrets (the kubeconfig as kubectl finds it, or the
    /// in-cluster config), as every issuer replica with `[auth] store = "kubernetes"` reads
    /// them. Implied by that setting in the configuration.
    #[arg(long)]
    pub kubernetes: bool,
    /// Namespace of the token Secrets [default: `[auth] namespace` in the configuration,
    /// else its `[ca] namespace`, else linkerd].
    #[arg(long, requires = "kubernetes")]
    pub namespace: Option<String>,
}

/// `issuer token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: TokenStoreArgs,
    /// The identity the token may request.
    #[arg(long)]
    pub identity: String,
    /// Time to live (default: until revoked).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// A source address or CIDR network the token may be used from (repeatable). It also
    /// binds renewal by certificate: while any non-revoked token of the identity (used-up
    /// ones included) restricts addresses, the identity renews only from inside the union of
    /// those networks.
    #[arg(long = "allow-ip", value_name = "IP[/PREFIX]")]
    pub allow_ip: Vec<IpNet>,
    /// Write the token to FILE (created 0600) instead of stdout. Refuses an existing FILE
    /// unless --force.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// With --out: replace an existing FILE atomically (a host's `token_file` is re-read on
    /// every renewal, so the new token is used from the next attempt on).
    #[arg(long, requires = "out")]
    pub force: bool,
    /// How many distinct keys the token may certify (default: no limit). The token is bound
    /// to each key it certifies: a request with a bound key stays valid (a restart reusing
    /// its key, a retry), any other key is refused once the uses are spent.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: Option<u32>,
}

/// `issuer revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: TokenStoreArgs,
    /// The identity to revoke.
    #[arg(long)]
    pub identity: String,
    /// Why (kept with the revocation).
    #[arg(long)]
    pub reason: Option<String>,
}

/// `issuer token list`.
#[derive(Debug, Args)]
pub struct TokenListArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: TokenStoreArgs,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `issuer token revoke`.
#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: TokenStoreArgs,
    /// Ids of the tokens to revoke (see `token list`).
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// `issuer workload ...`.
#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Create (or update) the ExternalWorkload of a host, and with --service the headless
    /// Service selecting it, then a bootstrap token bound to its identity and address:
    /// printed alone on stdout, or written to --out.
    Register(WorkloadRegisterArgs),
    /// List the ExternalWorkloads with their identity, address, active tokens and last
    /// issuance (the `meshcerts.io/last-issued` annotation the issuer keeps; `never`).
    List(WorkloadListArgs),
    /// Delete a host's ExternalWorkload (and the Service register created) and revoke every
    /// token of its identity.
    Remove(WorkloadRemoveArgs),
}

/// Where a `workload` subcommand keeps the tokens (the ExternalWorkloads always go to the
/// cluster of the kubeconfig as kubectl finds it, or the in-cluster config).
#[derive(Debug, Args)]
#[group(id = "workload_token_store", required = true, multiple = true)]
pub struct WorkloadStoreArgs {
    /// Short for `--config DIR/issuer.toml`: its token store (file or Kubernetes).
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub dir: Option<PathBuf>,
    /// The configuration file naming the token store.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Keep the token records in Kubernetes Secrets.
    #[arg(long)]
    pub kubernetes: bool,
    /// Namespace of the token Secrets [default: `[auth] namespace` in the configuration,
    /// else linkerd].
    #[arg(long, value_name = "NS", requires = "kubernetes")]
    pub token_namespace: Option<String>,
}

impl WorkloadStoreArgs {
    fn token_store(&self) -> TokenStoreArgs {
        TokenStoreArgs {
            dir: self.dir.clone(),
            config: self.config.clone(),
            kubernetes: self.kubernetes,
            namespace: self.token_namespace.clone(),
        }
    }
}

/// `issuer workload register`.
#[derive(Debug, Args)]
pub struct WorkloadRegisterArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub store: WorkloadStoreArgs,
    /// The ExternalWorkload's name.
    #[arg(long)]
    pub name: String,
    /// Its namespace (also the namespace of its identity).
    #[arg(long, value_name = "NS")]
    pub namespace: String,
    /// The host's address, the one it connects to the issuer from (`workloadIPs`).
    #[arg(long)]
    pub ip: std::net::IpAddr,
    /// A port the host serves, `PORT[:NAME]` (repeatable).
    #[arg(long = "port", value_name = "PORT[:NAME]")]
    pub ports: Vec<crate::cli::workload::PortArg>,
    /// Also create the headless Service NAME selecting the workload (Linkerd 2.15+).
    #[arg(long, value_name = "NAME", requires = "ports")]
    pub service: Option<String>,
    /// Labels of the ExternalWorkload, which the Service selects (`k=v`, repeatable or
    /// comma-separated) [default: app=NAME].
    #[arg(long, value_name = "K=V", value_delimiter = ',')]
    pub labels: Vec<crate::cli::workload::LabelArg>,
    /// The service-account name of the identity [default: --name].
    #[arg(long, value_name = "SA")]
    pub service_account: Option<String>,
    /// Register even though a ServiceAccount of that name exists in the namespace (the host
    /// then shares the identity, and the Linkerd policies, of the pods that use it).
    #[arg(long)]
    pub allow_existing_service_account: bool,
    /// How many distinct keys the bootstrap token may certify. The rotator renews by its
    /// current certificate after its first one, so one is enough; a host that re-bootstraps
    /// with the same key (a restart, a retry) does not spend another.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: u32,
    /// Write the token to FILE (created 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// With --out: replace an existing FILE atomically.
    #[arg(long, requires = "out")]
    pub force: bool,
}

/// `issuer workload list`.
#[derive(Debug, Args)]
pub struct WorkloadListArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub store: WorkloadStoreArgs,
    /// Only this namespace [default: all].
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `issuer workload remove`.
#[derive(Debug, Args)]
pub struct WorkloadRemoveArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub store: WorkloadStoreArgs,
    /// The ExternalWorkload's name.
    #[arg(long)]
    pub name: String,
    /// Its namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: String,
    /// The service-account name of the identity whose tokens are revoked [default: --name].
    #[arg(long, value_name = "SA")]
    pub service_account: Option<String>,
}

/// `issuer serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: ConfigArgs,
    /// gRPC listen address [default: `listen` in the config, else 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin listen address (/metrics, /live, /ready) [default: `admin` in the config, else
    /// 127.0.0.1:9990].
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Leaf lifetime [default: `lifetime` in the config, else 24h].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lifetime: Option<Duration>,
    /// Shortest leaf the issuer will mint: when the issuer cert has less than this left,
    /// Certify answers UNAVAILABLE [default: `min_lifetime` in the config, else 1h].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_lifetime: Option<Duration>,
    /// notBefore backdating of each leaf [default: `clock_skew` in the config, else 20s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub clock_skew: Option<Duration>,
    /// Serve without TLS (loopback addresses only) [default: `plaintext` in the config, else
    /// off].
    #[arg(long)]
    pub plaintext: bool,
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            fatal(&e);
            ExitCode::from(e.exit_code())
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    match cli.command {
        Command::Init(a) => init(a, clock),
        Command::Ca(CaCommand::NewIssuer(a)) => ca_new_issuer(a, clock),
        Command::Ca(CaCommand::Show(a)) => ca_show(a, clock),
        Command::Ca(CaCommand::SignBundle(a)) => ca_sign_bundle(a, clock),
        Command::Token(TokenCommand::Create(a)) => token::create(a, clock),
        Command::Token(TokenCommand::List(a)) => token::list(a, clock),
        Command::Token(TokenCommand::Revoke(a)) => token::revoke(a, clock),
        Command::Revoke(a) => token::revoke_identity(a, clock),
        Command::Workload(WorkloadCommand::Register(a)) => workload::register(a, clock),
        Command::Workload(WorkloadCommand::List(a)) => workload::list(a, clock),
        Command::Workload(WorkloadCommand::Remove(a)) => workload::remove(a, clock),
        Command::Serve(a) => serve(a, clock),
    }
}

fn init(a: InitArgs, clock: SharedClock) -> Result<()> {
    use crate::init::{Trust, TrustIssuer};
    let trust = match (a.trust_anchors, a.issuer_cert, a.issuer_key, a.anchor_key) {
        (None, None, None, None) => None,
        (Some(anchors), Some(cert), Some(key), None) => Some(Trust {
            anchors,
            issuer: TrustIssuer::Pair { cert, key },
        }),
        (Some(anchors), None, None, Some(key)) => Some(Trust {
            anchors,
            issuer: TrustIssuer::AnchorKey(key),
        }),
        _ => {
            return Err(Error::Config {
                path: "<flags>".into(),
                problems: vec![
                    "--trust-anchors takes either --issuer-cert and --issuer-key, or \
                     --anchor-key"
                        .into(),
                ],
            });
        }
    };
    let opts = crate::init::InitOptions {
        dir: a.dir,
        trust_domain: a.trust_domain,
        control_plane_namespace: a.control_plane_namespace,
        anchor_validity: a.anchor_validity,
        issuer_validity: a.issuer_validity,
        owner: a.owner,
        trust,
    };
    let out = crate::init::run_at(&opts, clock.now())?;
    for f in &out.files {
        say(format_args!("wrote {}", f.display()));
    }
    let anchor_key = opts.dir.join(crate::init::ANCHOR_KEY_FILE);
    if out
        .files
        .iter()
        .any(|f| f.ends_with(crate::init::ANCHOR_KEY_FILE))
    {
        say(format_args!(
            "keep {} offline: it is only needed to sign the next issuer certificate",
            anchor_key.display()
        ));
    }
    Ok(())
}

fn ca_new_issuer(a: CaNewIssuerArgs, clock: SharedClock) -> Result<()> {
    let cfg = Config::load(&a.config.path(), &Overrides::default())?;
    if a.lifetime < Duration::from_secs(60) {
        return Err(Error::Config {
            path: "<flags>".into(),
            problems: vec!["--lifetime must be at least 1m".into()],
        });
    }
    let cn = crate::ca::ops::issuer_common_name(
        &cfg.ca_control_plane_namespace,
        cfg.policy.trust_domain.as_str(),
    );
    let now = clock.now();
    let keep = crate::renewal::retirement_keep(
        cfg.policy.lifetime,
        cfg.limits.max_lifetime,
        cfg.policy.clock_skew,
    );
    let out = crate::ca::ops::new_issuer(
        &cfg.ca_files,
        &a.anchor_key,
        &cn,
        a.lifetime,
        now,
        Some(keep),
    )?;
    for f in &out.files {
        say(format_args!("wrote {}", f.display()));
    }
    say(format_args!(
        "new issuer {} (serial {}) valid until {}, {} in issuer.crt; a running issuer loads it \
         within seconds (or on SIGHUP)",
        out.subject,
        out.serial,
        proxy_lib::clock::rfc3339(out.window.not_after),
        proxy_lib::human::count(out.chain_len as u64, "certificate"),
    ));
    if out.window.not_after < now + a.lifetime {
        say(format_args!(
            "note: the validity was capped at the signing certificate's notAfter"
        ));
    }
    Ok(())
}

fn ca_sign_bundle(a: CaSignBundleArgs, clock: SharedClock) -> Result<()> {
    let s = crate::bundle::sign_bundle(&a.anchor_key, &a.bundle, &a.out, a.sequence, clock.now())?;
    for f in &s.files {
        say(format_args!("wrote {}", f.display()));
    }
    say(format_args!(
        "signed {} at sequence {} with the key of anchor {} (bundle fingerprint {})",
        proxy_lib::human::count(s.count as u64, "anchor"),
        s.sequence,
        proxy_lib::trust_bundle::short(&s.signer),
        proxy_lib::trust_bundle::short(&s.fingerprint),
    ));
    if let Some(name) = &a.configmap {
        // Exactly the bytes just written, so the ConfigMap and the files agree.
        let read = |p: &std::path::Path| -> Result<String> {
            std::fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let sig = read(&a.out.join(proxy_lib::trust_bundle::SIG_FILE))?;
        let anchors = read(&a.out.join(proxy_lib::trust_bundle::BUNDLE_FILE))?;
        let yaml = crate::kubernetes::ca::trust_roots_yaml(&a.namespace, name, &anchors, &sig);
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(yaml.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|source| Error::Io {
                path: "<stdout>".into(),
                source,
            })?;
    }
    Ok(())
}

fn ca_show(a: CaShowArgs, clock: SharedClock) -> Result<()> {
    let cfg = Config::load(&a.config.path(), &Overrides::default())?;
    let report = crate::ca::ops::show(&cfg.ca_files, clock.now(), cfg.ca_warn_before);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(report.text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| Error::Io {
            path: "<stdout>".into(),
            source,
        })?;
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(Error::CaCheck(report.problems.join("; ")))
    }
}

fn serve(a: ServeArgs, clock: SharedClock) -> Result<()> {
    let overrides = Overrides {
        listen: a.listen,
        admin: a.admin,
        lifetime: a.lifetime,
        min_lifetime: a.min_lifetime,
        clock_skew: a.clock_skew,
        plaintext: a.plaintext,
    };
    let cfg = Config::load(&a.config.path(), &overrides)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Server(format!("runtime: {e}")))?;
    rt.block_on(async move {
        let listener = crate::server::bind(cfg.listen).await?;
        let admin = crate::server::bind(cfg.admin).await?;
        crate::server::serve(cfg, listener, Some(admin), clock, shutdown_signal()).await
    })
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot install the SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
