//! The proxy's configuration: the TOML file, then the command line (one struct,
//! [`RawConfig`], declares both, with the same keys), validated once into [`Config`].
//! Every bad field is reported, not just the first.
//!
//! ```toml
//! certs = "/var/lib/mtls/certs"          # the rotator's dir (..data layout)
//! # trust_anchors = "/etc/mtls/ca.crt"   # default: the snapshot's own ca.crt
//! inbound = ["0.0.0.0:4143=127.0.0.1:5432"]
//! outbound = ["127.0.0.1:4140=db.example.net:4143@legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local"]
//! admin = "127.0.0.1:4191"
//! pidfile = "/run/mtls-proxy.pid"
//! allow_client = []                      # identities allowed inbound; empty = any in the mesh
//! connect_timeout = "5s"
//! handshake_timeout = "10s"
//! idle_timeout = "10m"
//! max_connections = 10000
//! max_pending_per_source = 16            # inbound handshakes in progress per source address
//! drain_timeout = "10s"
//! watch_interval = "5s"                  # "0s" = reload only on SIGHUP / POST /reload
//! # Linkerd inbound mode (see `proxy::linkerd`): listeners, and the app of each port
//! linkerd_inbound = ["0.0.0.0:4143", "10.0.0.5:8080"]   # LISTEN[=APP]
//! linkerd_app = ["8080=127.0.0.1:8080", "5432=127.0.0.1:5432"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};

pub use crate::cli::LogFormat;
use crate::config_file::{self, ConfigFileError, Env, FieldError, Layers, ProcessEnv, env_name};
use crate::identity::normalize_name;

/// The variable that sets `--log-format` when the flag is not given.
pub const LOG_FORMAT_ENV: &str = "MTLS_PROXY_LOG_FORMAT";

/// The binary's logging convention (the level comes from `RUST_LOG`).
pub const LOGGING: crate::cli::Logging = crate::cli::Logging {
    bin: "mtls-proxy",
    format_env: LOG_FORMAT_ENV,
    level_env: &["RUST_LOG"],
    json_flags: &[],
};

/// Default admin listen address (loopback).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:4191";
/// Default timeout for connecting to the app or an outbound target.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout for a TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle timeout: a connection with no bytes either way for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default limit of connections open at once (all listeners together).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default limit of inbound handshakes in progress per source (an IPv4 address or an IPv6
/// /64): enough for a burst of honest clients behind one address, far too few for one source
/// to hold the connection limit with sockets that never speak.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 16;
/// Default time open connections get to finish after SIGTERM before they are cut.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval of the `..data` change check (a cheap readlink), besides SIGHUP.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file is unreadable, not TOML, or has an unknown key or a value of the
    /// wrong type (the error names the file, the line and the key).
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// One or more fields are invalid; each problem is listed.
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// The exit code: 66 for an unreadable config file, 78 for an invalid configuration.
    /// (`mtls-proxy` exits 64 instead when no config file was given: the flags were bad.)
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::File(e) => e.exit_code(),
            Self::Invalid(_) => crate::cli::exit::CONFIG,
        }
    }
}

/// The raw layer, every key optional: one struct is both the TOML file's schema and the
/// command line's flags (`--idle-timeout` is `idle_timeout`), so a key cannot exist in one
/// and not the other. The flags are a layer over the file
/// ([`crate::config_file::Layers`]): a flag given replaces the file's key (a list replaces
/// the list).
// The doc comments below are clap's --help text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The rotator's cert dir (`..data` layout, or plain tls.crt/tls.key/ca.crt). Required
    /// (here or in --config); the proxy starts not ready if it holds no valid set yet.
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certs: Option<PathBuf>,
    /// Trust anchors (PEM) for peers, re-read at every reload [default: DIR's ca.crt].
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_anchors: Option<PathBuf>,
    /// Inbound listener (repeatable): terminate mTLS, forward to the app, e.g.
    /// 0.0.0.0:4143=127.0.0.1:8080. At least one --inbound or --outbound is required.
    #[arg(long, value_name = "LISTEN=APP")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<String>,
    /// Outbound listener (repeatable): plaintext in on a loopback LISTEN, mTLS out to
    /// HOST:PORT, whose cert must carry IDENTITY as a DNS SAN (sent as SNI too).
    #[arg(long, value_name = "LISTEN=HOST:PORT@IDENTITY")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    /// Admin HTTP address (/metrics, /live, /ready, POST /reload) [default: 127.0.0.1:4191].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// Allow a non-loopback admin address (this also opens POST /reload to the network)
    /// [default: loopback only].
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin_allow_remote: bool,
    /// Allow a non-loopback outbound (plaintext) listen address [default: loopback only].
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outbound_allow_remote: bool,
    /// Write the pid here at start (after the SIGHUP handler is installed); removed on exit
    /// [default: none].
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pidfile: Option<PathBuf>,
    /// Client identity allowed inbound (repeatable), matched exactly (ASCII case aside)
    /// against the client leaf's DNS SANs [default: any client that chains to the anchors].
    #[arg(long, value_name = "IDENTITY")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_client: Vec<String>,
    /// Timeout connecting to the app or target [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub connect_timeout: Option<Duration>,
    /// Timeout of a TLS handshake [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub handshake_timeout: Option<Duration>,
    /// Close a connection idle (no bytes either way) this long [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// Connections open at once, all listeners together [default: 10000].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Inbound TLS handshakes in progress per source address (an IPv4 address or an IPv6
    /// /64); a connection beyond it is closed at once, unanswered [default: 16].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_per_source: Option<usize>,
    /// Grace period for open connections after SIGTERM/SIGINT [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub drain_timeout: Option<Duration>,
    /// Check `DIR/..data` for a new version this often, besides SIGHUP; 0s = off [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub watch_interval: Option<Duration>,
    /// Linkerd inbound listener (repeatable): terminates mTLS as a Linkerd host does (SNI must
    /// be one of this host's identities; HTTP/2 with l5d-orig-proto is served and downgraded;
    /// ALPN transport.l5d.io/v1 with a transport header routes by its port), e.g.
    /// 0.0.0.0:4143 for opaque ports and HOST_IP:8080 for an HTTP port. Connections without a
    /// transport header go to =APP, or else to the --linkerd-app of the listener's port.
    #[arg(long, value_name = "LISTEN[=APP]")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub linkerd_inbound: Vec<String>,
    /// The app of a port in Linkerd inbound mode (repeatable): the port a client dials or its
    /// transport header names, e.g. 8080=127.0.0.1:8080.
    #[arg(long, value_name = "PORT=APP")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub linkerd_app: Vec<String>,
}

impl RawConfig {
    /// Parses TOML text; `path` names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Ok(config_file::parse(text, path)?)
    }

    /// Reads a TOML file. Blocks.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        Ok(config_file::load(path)?)
    }
}

/// An inbound listener: terminate mTLS on `listen`, forward to `app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The local app, `host:port`.
    pub app: String,
}

/// An outbound listener: accept plaintext on `listen`, originate mTLS to `target`, requiring
/// the server's certificate to carry `identity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Address to listen on (loopback unless explicitly allowed).
    pub listen: SocketAddr,
    /// The target, `host:port`.
    pub target: String,
    /// The identity (DNS SAN) the target's certificate must carry; also sent as SNI.
    pub identity: ServerName<'static>,
}

/// Timeouts and limits of the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connecting to the app or target.
    pub connect_timeout: Duration,
    /// Completing a TLS handshake.
    pub handshake_timeout: Duration,
    /// No bytes either way for this long closes the connection.
    pub idle_timeout: Duration,
    /// Connections open at once, all listeners together.
    pub max_connections: usize,
    /// Inbound handshakes in progress per source (an IPv4 address or an IPv6 /64); a
    /// connection beyond it is refused before any handshake.
    pub max_pending_per_source: usize,
    /// Grace period for open connections at shutdown.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_per_source: DEFAULT_MAX_PENDING_PER_SOURCE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Cert dir.
    pub certs: PathBuf,
    /// Separate anchors file, or `None` for the snapshot's `ca.crt`.
    pub trust_anchors: Option<PathBuf>,
    /// Inbound listeners.
    pub inbound: Vec<Inbound>,
    /// Outbound listeners.
    pub outbound: Vec<Outbound>,
    /// Admin listen address.
    pub admin: SocketAddr,
    /// Pidfile, written at start and removed on clean exit.
    pub pidfile: Option<PathBuf>,
    /// Allowed client identities (empty: any).
    pub allow_client: Vec<String>,
    /// Timeouts and limits.
    pub limits: Limits,
    /// `..data` change check interval; `None` = off.
    pub watch_interval: Option<Duration>,
    /// Linkerd inbound listeners and apps (off when it has no listener).
    pub linkerd: crate::proxy::linkerd::LinkerdInbound,
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let mut bad = Vec::new();
        let certs = raw.certs.clone().unwrap_or_else(|| {
            bad.push("certs: the certificate directory is required (--certs DIR)".into());
            PathBuf::new()
        });
        let inbound: Vec<Inbound> = raw
            .inbound
            .iter()
            .filter_map(|s| {
                parse_inbound(s)
                    .map_err(|e| bad.push(format!("inbound {s:?}: {e}")))
                    .ok()
            })
            .collect();
        let outbound: Vec<Outbound> = raw
            .outbound
            .iter()
            .filter_map(|s| {
                parse_outbound(s)
                    .map_err(|e| bad.push(format!("outbound {s:?}: {e}")))
                    .ok()
            })
            .collect();
        let linkerd = crate::proxy::linkerd::LinkerdInbound::parse(
            &raw.linkerd_inbound,
            &raw.linkerd_app,
            &mut bad,
        );
        if raw.inbound.is_empty() && raw.outbound.is_empty() && raw.linkerd_inbound.is_empty() {
            bad.push(
                "no listener: give at least one --inbound, --outbound or --linkerd-inbound".into(),
            );
        }
        if !raw.outbound_allow_remote {
            for o in &outbound {
                if !o.listen.ip().is_loopback() {
                    bad.push(format!(
                        "outbound listen address {} is not loopback: plaintext would be exposed \
                         to the network (set outbound_allow_remote = true to allow)",
                        o.listen
                    ));
                }
            }
        }
        let admin_text = raw.admin.as_deref().unwrap_or(DEFAULT_ADMIN);
        let admin = match admin_text.parse::<SocketAddr>() {
            Ok(a) => {
                if !a.ip().is_loopback() && !raw.admin_allow_remote {
                    bad.push(format!(
                        "admin address {a} is not loopback (set admin_allow_remote = true to allow \
                         POST /reload from the network)"
                    ));
                }
                a
            }
            Err(e) => {
                bad.push(format!("admin {admin_text:?}: {e} (want IP:PORT)"));
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        };
        let mut allow_client = Vec::new();
        for id in &raw.allow_client {
            match ServerName::try_from(id.trim()) {
                Ok(ServerName::DnsName(_)) => allow_client.push(normalize_name(id)),
                _ => bad.push(format!("allow_client {id:?}: not a DNS identity name")),
            }
        }
        let mut nonzero = |what: &str, d: Option<Duration>, default: Duration| {
            let d = d.unwrap_or(default);
            if d.is_zero() {
                bad.push(format!("{what}: must be greater than zero"));
            }
            d
        };
        let connect_timeout = nonzero(
            "connect_timeout",
            raw.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        );
        let handshake_timeout = nonzero(
            "handshake_timeout",
            raw.handshake_timeout,
            DEFAULT_HANDSHAKE_TIMEOUT,
        );
        let idle_timeout = nonzero("idle_timeout", raw.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        // The semaphore's limit; also keeps `acquire_many` at shutdown within u32.
        if max_connections == 0 || max_connections > 1_000_000 {
            bad.push(format!(
                "max_connections {max_connections}: must be between 1 and 1000000"
            ));
        }
        let max_pending_per_source = raw
            .max_pending_per_source
            .unwrap_or(DEFAULT_MAX_PENDING_PER_SOURCE);
        if max_pending_per_source == 0 {
            bad.push("max_pending_per_source 0: must be at least 1".into());
        }
        let drain_timeout = raw.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT);
        let watch_interval = match raw.watch_interval.unwrap_or(DEFAULT_WATCH_INTERVAL) {
            d if d.is_zero() => None,
            d => Some(d),
        };
        if !bad.is_empty() {
            return Err(ConfigError::Invalid(bad));
        }
        Ok(Config {
            certs,
            trust_anchors: raw.trust_anchors,
            inbound,
            outbound,
            admin,
            pidfile: raw.pidfile,
            allow_client,
            limits: Limits {
                connect_timeout,
                handshake_timeout,
                idle_timeout,
                max_connections,
                max_pending_per_source,
                drain_timeout,
            },
            watch_interval,
            linkerd,
        })
    }
}

fn parse_inbound(s: &str) -> Result<Inbound, String> {
    let (listen, app) = s
        .split_once('=')
        .ok_or("want LISTEN_IP:PORT=APP_HOST:PORT")?;
    Ok(Inbound {
        listen: parse_listen(listen)?,
        app: parse_host_port(app)?,
    })
}

fn parse_outbound(s: &str) -> Result<Outbound, String> {
    let (listen, rest) = s
        .split_once('=')
        .ok_or("want LISTEN_IP:PORT=HOST:PORT@IDENTITY")?;
    let (target, identity) = rest
        .rsplit_once('@')
        .ok_or("missing @IDENTITY after the target (want LISTEN_IP:PORT=HOST:PORT@IDENTITY)")?;
    let identity = match ServerName::try_from(normalize_name(identity)) {
        Ok(n @ ServerName::DnsName(_)) => n,
        _ => return Err(format!("identity {identity:?} is not a DNS name")),
    };
    Ok(Outbound {
        listen: parse_listen(listen)?,
        target: parse_host_port(target)?,
        identity,
    })
}

pub(crate) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|e| format!("listen address {s:?}: {e} (want IP:PORT)"))
}

pub(crate) fn parse_host_port(s: &str) -> Result<String, String> {
    let s = s.trim();
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    if host.is_empty() {
        return Err(format!("{s:?}: empty host"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: port must be 1..65535"))?;
    Ok(s.to_string())
}

/// `mtls-proxy` command line. Flags override the config file's keys.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "mtls-proxy",
    version,
    about = "mTLS proxy serving the rotator's certificates, reloaded without dropping connections"
)]
pub struct Args {
    /// TOML config file with the same keys as these flags, spelled with underscores
    /// (trust_anchors, allow_client, ...); flags given too override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The config keys given as flags.
    #[command(flatten)]
    pub flags: RawConfig,
    /// Log format on stderr; with json every line is a JSON object, errors included (the
    /// level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, env = LOG_FORMAT_ENV)]
    pub log_format: LogFormat,
}

/// Prefix of the proxy's config variables: every key can be set as `MTLS_PROXY_<KEY>`
/// (`MTLS_PROXY_CERTS`; a list as a TOML array, `MTLS_PROXY_INBOUND='["0.0.0.0:4143=127.0.0.1:5432"]'`).
pub const ENV_PREFIX: &str = "MTLS_PROXY_";

impl RawConfig {
    /// Every key: the flags' names with underscores.
    pub fn keys() -> Vec<String> {
        let cmd = <RawConfig as clap::Args>::augment_args(clap::Command::new("mtls-proxy"));
        cmd.get_arguments()
            .map(|a| a.get_id().as_str().to_string())
            .collect()
    }
}

impl Args {
    /// The raw layer: the config file (if any), then `MTLS_PROXY_*` variables of the
    /// process environment, then the flags; every unknown key and value of the wrong type is
    /// reported. Blocks (reads the file).
    pub fn into_raw(self) -> Result<RawConfig, ConfigError> {
        self.into_raw_with_env(&ProcessEnv)
    }

    /// [`Args::into_raw`] with the environment given.
    pub fn into_raw_with_env(self, env: &dyn Env) -> Result<RawConfig, ConfigError> {
        let mut layers = match &self.config {
            Some(path) => Layers::file(path)?,
            None => Layers::new(),
        };
        let keys = RawConfig::keys();
        layers.env(env, keys.iter().map(|k| (env_name(ENV_PREFIX, k), k)));
        let invalid = |errors: Vec<FieldError>| {
            ConfigError::Invalid(errors.iter().map(ToString::to_string).collect())
        };
        layers.flags(&self.flags).map_err(|e| invalid(vec![e]))?;
        match layers.extract::<RawConfig>() {
            (raw, errors) if errors.is_empty() => Ok(raw),
            (_, errors) => Err(invalid(errors)),
        }
    }

    /// The validated config. Blocks (reads the file).
    pub fn into_config(self) -> Result<Config, ConfigError> {
        Config::try_from(self.into_raw()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const ID: &str = "web.apps.serviceaccount.identity.linkerd.cluster.local";

    #[test]
    fn flags_parse_into_a_config_with_documented_defaults() {
        let args = Args::try_parse_from([
            "mtls-proxy",
            "--certs",
            "/certs",
            "--inbound",
            "0.0.0.0:4143=127.0.0.1:8080",
            "--outbound",
            &format!("127.0.0.1:4140=db.example:4143@{ID}"),
        ])
        .unwrap();
        let c = args.into_config().unwrap();
        assert_eq!(c.certs, PathBuf::from("/certs"));
        assert_eq!(c.inbound[0].listen, "0.0.0.0:4143".parse().unwrap());
        assert_eq!(c.inbound[0].app, "127.0.0.1:8080");
        assert_eq!(c.outbound[0].target, "db.example:4143");
        assert_eq!(c.outbound[0].identity.to_str(), ID);
        assert_eq!(c.admin, DEFAULT_ADMIN.parse().unwrap());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.watch_interval, Some(DEFAULT_WATCH_INTERVAL));
    }

    #[test]
    fn toml_file_has_the_same_keys_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            format!(
                "certs = \"/from-file\"\ninbound = [\"127.0.0.1:1=127.0.0.1:2\"]\n\
                 idle_timeout = \"30s\"\nmax_connections = 7\nallow_client = [\"{ID}\"]\n\
                 watch_interval = \"0s\"\n"
            ),
        )
        .unwrap();
        let args = Args::try_parse_from([
            "mtls-proxy",
            "--config",
            path.to_str().unwrap(),
            "--certs",
            "/from-flag",
        ])
        .unwrap();
        let c = args.into_config().unwrap();
        assert_eq!(c.certs, PathBuf::from("/from-flag"));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.max_connections, 7);
        assert_eq!(c.allow_client, vec![ID.to_string()]);
        assert_eq!(c.watch_interval, None);

        std::fs::write(&path, "certs = \"/x\"\nbogus = 1\n").unwrap();
        let err = RawConfig::read(&path).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn the_environment_sits_between_the_file_and_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, "certs = \"/from-file\"\nmax_connections = 7\n").unwrap();
        let args = Args::try_parse_from([
            "mtls-proxy",
            "--config",
            path.to_str().unwrap(),
            "--idle-timeout",
            "1s",
        ])
        .unwrap();
        let env = crate::config_file::MapEnv::from_pairs([
            ("MTLS_PROXY_MAX_CONNECTIONS", "8"),
            ("MTLS_PROXY_IDLE_TIMEOUT", "9s"),
            ("MTLS_PROXY_ADMIN_ALLOW_REMOTE", "true"),
            ("MTLS_PROXY_INBOUND", "[\"127.0.0.1:1=127.0.0.1:2\"]"),
        ]);
        let raw = args.into_raw_with_env(&env).unwrap();
        assert_eq!(raw.certs, Some(PathBuf::from("/from-file")));
        assert_eq!(raw.max_connections, Some(8));
        assert_eq!(raw.idle_timeout, Some(Duration::from_secs(1)));
        assert!(raw.admin_allow_remote);
        assert_eq!(raw.inbound, ["127.0.0.1:1=127.0.0.1:2"]);
        assert_eq!(RawConfig::keys().len(), 18);
    }

    #[test]
    fn file_errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mtls-proxy.toml");
        let file = path.display().to_string();
        for (text, key) in [
            ("bogus = 1\n", "bogus"),
            ("idle_timeout = \"soon\"\n", "idle_timeout"),
            ("max_connections = \"many\"\n", "max_connections"),
            ("inbound = \"0.0.0.0:1=127.0.0.1:2\"\n", "inbound"),
            ("admin_allow_remote = \"yes\"\n", "admin_allow_remote"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = RawConfig::read(&path).unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains(&format!("key `{key}`")), "{text:?}: {shown}");
            assert!(shown.contains(&file), "{text:?}: {shown}");
            assert_eq!(err.exit_code(), 78);
        }
        let err = RawConfig::read(&dir.path().join("missing.toml")).unwrap_err();
        assert_eq!(err.exit_code(), 66);
    }

    #[test]
    fn every_bad_field_is_reported() {
        let raw = RawConfig {
            inbound: vec!["nonsense".into()],
            outbound: vec![
                "127.0.0.1:4140=host:99999@id.example".into(),
                "0.0.0.0:4140=host:1@id.example".into(),
                "127.0.0.1:4141=host:1".into(),
            ],
            admin: Some("0.0.0.0:4191".into()),
            idle_timeout: Some(Duration::ZERO),
            max_connections: Some(0),
            ..RawConfig::default()
        };
        let Err(ConfigError::Invalid(problems)) = Config::try_from(raw) else {
            panic!("expected an invalid config");
        };
        let text = problems.join("\n");
        for want in [
            "certs",
            "inbound \"nonsense\"",
            "port must be 1..65535",
            "0.0.0.0:4140 is not loopback",
            "missing @IDENTITY",
            "admin address 0.0.0.0:4191 is not loopback",
            "idle_timeout",
            "max_connections 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(problems.len(), 8, "{text}");
    }
}
