//! The rotator's configuration: `rotator.toml` and environment overrides read as raw strings,
//! then validated into [`Config`] in one pass that reports every bad field, not just the first.
//!
//! Every key of the file can be set from the environment as `ROTATOR_<KEY>` (dots become
//! underscores: `backoff.max` is `ROTATOR_BACKOFF_MAX`). Linkerd's variable names are accepted
//! too, with Linkerd's meaning (see [`LINKERD_ENV`]). Precedence: `ROTATOR_*`, then
//! `LINKERD2_PROXY_IDENTITY_*`, then the file, then the defaults below.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_lib::config_file::{self, ConfigFileError};
use proxy_lib::identity::{Identity, TrustDomain};
use proxy_lib::verify::TrustAnchors;

use crate::schedule::{CronSchedule, Policy};

/// Default fraction of the lifetime after which a cert is renewed.
pub const DEFAULT_RENEW_AT: f64 = 0.7;
/// Default jitter, as a fraction of the lifetime, added to or taken from the renewal point.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Default first retry delay after a failed renewal.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Default cap on the retry delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Default safety margin before notAfter, as a fraction of the lifetime.
pub const DEFAULT_MARGIN: f64 = 0.05;
/// Default clock-skew allowance (the issuer backdates notBefore by this much).
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(20);
/// Default timeout of one Certify call (connect + TLS + request).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout of a reload hook (exec and HTTP).
pub const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of reload+verify attempts before the verify step reports failure.
pub const DEFAULT_VERIFY_ATTEMPTS: u32 = 3;
/// Default pause between a reload and the verify handshake.
pub const DEFAULT_VERIFY_DELAY: Duration = Duration::from_millis(500);
/// Default signal sent to the pid in `reload.pidfile`.
pub const DEFAULT_RELOAD_SIGNAL: &str = "HUP";

/// Prefix of the rotator's own environment variables.
pub const ENV_PREFIX: &str = "ROTATOR_";

/// Linkerd's variable for the identity service address; a loopback value means plaintext.
const LINKERD_SVC_ADDR: &str = "LINKERD2_PROXY_IDENTITY_SVC_ADDR";

/// Linkerd's environment variables and the key each one sets.
pub const LINKERD_ENV: &[(&str, &str)] = &[
    ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", "identity"),
    (LINKERD_SVC_ADDR, "issuer_addr"),
    ("LINKERD2_PROXY_IDENTITY_SVC_NAME", "issuer_name"),
    ("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", "token_file"),
    ("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", "trust_anchors"),
    ("LINKERD2_PROXY_IDENTITY_DIR", "dir"),
];

/// Every key the config knows, with a one-line description (used in errors and docs).
pub const KEYS: &[(&str, &str)] = &[
    (
        "identity",
        "the identity to keep, <sa>.<ns>.serviceaccount.identity.linkerd.<td>",
    ),
    ("dir", "the cert dir (..data layout)"),
    (
        "trust_anchors",
        "anchor bundle: a PEM file path, or PEM text",
    ),
    (
        "token_file",
        "file holding the bootstrap token (re-read on every attempt)",
    ),
    ("issuer_addr", "host:port of the issuer"),
    ("issuer_name", "TLS server name of the issuer"),
    ("plaintext", "talk to a loopback issuer without TLS"),
    ("timeout", "timeout of one Certify call"),
    ("renew_at", "fraction of the lifetime after which to renew"),
    ("jitter", "jitter as a fraction of the lifetime"),
    (
        "margin",
        "never sleep past notAfter minus this fraction of the lifetime",
    ),
    (
        "clock_skew",
        "notBefore backdating assumed for a cert found on disk",
    ),
    ("backoff.min", "first retry delay"),
    ("backoff.max", "retry delay cap"),
    (
        "schedule",
        "cron expression (5-field crontab or the cron crate's 6/7-field form), UTC",
    ),
    (
        "key_group",
        "group (name or gid) that may read tls.key (mode 0640)",
    ),
    ("reload.signal", "signal sent to the pid in reload.pidfile"),
    ("reload.pidfile", "pidfile of the process to signal"),
    (
        "reload.process_name",
        "expected name of that process (/proc/<pid>/comm or exe)",
    ),
    ("reload.http", "URL to POST after a rotation"),
    ("reload.exec", "argv to run after a rotation"),
    ("reload.timeout", "timeout of the exec and HTTP hooks"),
    (
        "verify.addr",
        "host:port of the TLS listener that must serve the new cert",
    ),
    (
        "verify.server_name",
        "server name to verify the listener with",
    ),
    (
        "verify.attempts",
        "reload+verify attempts before reporting failure",
    ),
    (
        "verify.delay",
        "pause between a reload and its verify handshake",
    ),
    (
        "metrics.listen",
        "address of the /metrics, /live, /ready endpoint",
    ),
];

/// A source of environment variables; the real one reads the process environment, tests
/// use a map so they never mutate the process environment.
pub trait Env {
    /// The value of `name`, if set (and valid UTF-8).
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A map-backed environment for tests.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(pub HashMap<String, String>);

impl MapEnv {
    /// An environment holding the given pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl Env for MapEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// One bad field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The key (`backoff.max`), or the file for errors about the file itself.
    pub key: String,
    /// What was wrong.
    pub message: String,
}

/// Why a configuration was refused: every problem found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file is unreadable or not valid TOML (the error names the file and line).
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// One or more fields are missing or invalid.
    #[error("invalid configuration:{}", list(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// The exit code of `run` and `rotate`: 66 for an unreadable config file, 78 for an
    /// invalid configuration. (`status` reports either as 3 UNKNOWN.)
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::File(e) => e.exit_code(),
            Self::Invalid(_) => proxy_lib::cli::exit::CONFIG,
        }
    }
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("\n  - {}: {}", e.key, e.message))
        .collect()
}

/// A raw value from the file or the environment.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    /// Text (every environment value starts as text).
    Str(String),
    /// A TOML number.
    Num(f64),
    /// A TOML boolean.
    Bool(bool),
    /// A TOML array of strings.
    List(Vec<String>),
}

impl fmt::Display for RawValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawValue::Str(s) => write!(f, "{s:?}"),
            RawValue::Num(n) => write!(f, "{n}"),
            RawValue::Bool(b) => write!(f, "{b}"),
            RawValue::List(l) => write!(f, "{l:?}"),
        }
    }
}

/// The unvalidated configuration: known keys to raw values, with where each came from.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    values: BTreeMap<&'static str, (RawValue, String)>,
    errors: Vec<FieldError>,
}

impl RawConfig {
    /// Parses TOML text. Unknown keys and values of the wrong shape are recorded as field
    /// errors (reported together with the rest by [`RawConfig::validate`]).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let table: toml::Table = config_file::parse(text, path)?;
        let mut raw = Self::default();
        let origin = path.display().to_string();
        raw.add_table("", &table, &origin);
        Ok(raw)
    }

    /// Reads and parses a config file. Blocks.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(&config_file::read(path)?, path)
    }

    fn add_table(&mut self, prefix: &str, table: &toml::Table, origin: &str) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if let toml::Value::Table(t) = v {
                if KEYS
                    .iter()
                    .any(|(known, _)| known.starts_with(&format!("{key}.")))
                {
                    self.add_table(&key, t, origin);
                } else {
                    self.errors.push(FieldError {
                        key,
                        message: format!("unknown section (in {origin})"),
                    });
                }
                continue;
            }
            let Some(known) = known_key(&key) else {
                self.errors.push(FieldError {
                    key,
                    message: format!("unknown key (in {origin})"),
                });
                continue;
            };
            let value = match v {
                toml::Value::String(s) => RawValue::Str(s.clone()),
                toml::Value::Integer(i) => RawValue::Num(*i as f64),
                toml::Value::Float(f) => RawValue::Num(*f),
                toml::Value::Boolean(b) => RawValue::Bool(*b),
                toml::Value::Array(a) => {
                    let items: Option<Vec<String>> =
                        a.iter().map(|i| i.as_str().map(str::to_string)).collect();
                    match items {
                        Some(items) => RawValue::List(items),
                        None => {
                            self.errors.push(FieldError {
                                key,
                                message: format!(
                                    "expected an array of strings, got {v} (from {origin})"
                                ),
                            });
                            continue;
                        }
                    }
                }
                other => {
                    self.errors.push(FieldError {
                        key,
                        message: format!(
                            "expected text, a number, true/false or an array of strings, \
                             got a {} (from {origin})",
                            other.type_str()
                        ),
                    });
                    continue;
                }
            };
            self.values.insert(known, (value, origin.to_string()));
        }
    }

    /// Sets a key (used for command-line overrides and tests).
    pub fn set(&mut self, key: &str, value: RawValue, origin: &str) {
        match known_key(key) {
            Some(k) => {
                self.values.insert(k, (value, origin.to_string()));
            }
            None => self.errors.push(FieldError {
                key: key.to_string(),
                message: format!("unknown key (from {origin})"),
            }),
        }
    }

    /// Applies environment overrides: Linkerd's names first, then `ROTATOR_*` (which win).
    pub fn apply_env(&mut self, env: &dyn Env) {
        for (var, key) in LINKERD_ENV {
            if let Some(v) = env.get(var).filter(|v| !v.trim().is_empty()) {
                self.set(key, RawValue::Str(v), var);
            }
        }
        for (key, _) in KEYS {
            let var = env_name(key);
            if let Some(v) = env.get(&var) {
                self.set(key, RawValue::Str(v), &var);
            }
        }
    }

    /// Validates every field and returns the config, or every problem found.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let mut v = Validator {
            raw: self,
            errors: self.errors.clone(),
        };
        let identity = v.required("identity", |s| {
            Identity::parse(s).map_err(|e| e.to_string())
        });
        let dir = v.required("dir", |s| non_empty(s).map(PathBuf::from));
        let trust_anchors = v.required("trust_anchors", |s| {
            let s = non_empty(s)?;
            Ok(if s.trim_start().starts_with("-----BEGIN") {
                AnchorSource::Pem(s.to_string())
            } else {
                AnchorSource::File(PathBuf::from(s))
            })
        });
        let token_file = v.required("token_file", |s| non_empty(s).map(PathBuf::from));
        let issuer_addr = v.required("issuer_addr", parse_host_port);
        let issuer_name = v.optional("issuer_name", |s| {
            let s = non_empty(s)?;
            rustls_pki_types::ServerName::try_from(s.to_string())
                .map_err(|e| format!("not a valid server name: {e}"))?;
            Ok(proxy_lib::identity::normalize_name(s))
        });
        // Linkerd's meaning of a loopback LINKERD2_PROXY_IDENTITY_SVC_ADDR: no TLS (the proxy
        // then ignores _SVC_NAME and talks plaintext to a local identity service). An explicit
        // `plaintext` wins; a loopback issuer_addr from anywhere else keeps TLS.
        let linkerd_loopback = v
            .get("issuer_addr")
            .is_some_and(|(_, origin)| origin == LINKERD_SVC_ADDR)
            && issuer_addr
                .as_ref()
                .is_some_and(|a| is_loopback_host(&a.host));
        let plaintext = v.bool("plaintext").unwrap_or(linkerd_loopback);
        let timeout = v.duration("timeout").unwrap_or(DEFAULT_TIMEOUT);
        let renew_at = v
            .number(
                "renew_at",
                |n| n > 0.0 && n < 1.0,
                "must be between 0 and 1 (exclusive)",
            )
            .unwrap_or(DEFAULT_RENEW_AT);
        let jitter = v
            .number("jitter", |n| (0.0..0.5).contains(&n), "must be in [0, 0.5)")
            .unwrap_or(DEFAULT_JITTER);
        let margin = v
            .number("margin", |n| (0.0..0.5).contains(&n), "must be in [0, 0.5)")
            .unwrap_or(DEFAULT_MARGIN);
        let clock_skew = v.duration("clock_skew").unwrap_or(DEFAULT_CLOCK_SKEW);
        let backoff_min = v.duration("backoff.min").unwrap_or(DEFAULT_BACKOFF_MIN);
        let backoff_max = v.duration("backoff.max").unwrap_or(DEFAULT_BACKOFF_MAX);
        if backoff_min.is_zero() {
            v.error("backoff.min", "must be greater than zero");
        }
        if backoff_min > backoff_max {
            v.error(
                "backoff.max",
                format!(
                    "must not be below backoff.min ({})",
                    proxy_lib::human::duration(backoff_min)
                ),
            );
        }
        if renew_at + jitter >= 1.0 {
            v.error("jitter", "renew_at + jitter must stay below 1");
        }
        if renew_at - jitter <= 0.0 {
            v.error("jitter", "renew_at - jitter must stay above 0");
        }
        let schedule = v.optional("schedule", |s| {
            CronSchedule::parse(s).map_err(|e| e.to_string())
        });
        let key_group = v.optional("key_group", |s| {
            proxy_lib::account::group_id(s).map_err(|e| e.to_string())
        });

        // [reload]
        let pidfile = v.optional("reload.pidfile", |s| non_empty(s).map(PathBuf::from));
        let signal = v.optional("reload.signal", ReloadSignal::parse);
        let process_name = v.optional("reload.process_name", |s| non_empty(s).map(str::to_string));
        let http = v.optional("reload.http", |s| {
            let uri: http::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err("must be an http:// URL with a host".into());
            }
            Ok(uri.to_string())
        });
        let exec = v.list("reload.exec");
        let reload_timeout = v
            .duration("reload.timeout")
            .unwrap_or(DEFAULT_RELOAD_TIMEOUT);
        let signal_hook = match (pidfile, signal, process_name) {
            (Some(pidfile), signal, Some(process_name)) => Some(SignalHook {
                pidfile,
                signal: signal.unwrap_or(ReloadSignal::Hup),
                process_name,
            }),
            (Some(_), _, None) => {
                v.error(
                    "reload.process_name",
                    "is required with reload.pidfile (the pid is checked before it is signalled)",
                );
                None
            }
            (None, Some(_), _) | (None, None, Some(_)) => {
                v.error(
                    "reload.pidfile",
                    "is required with reload.signal/process_name",
                );
                None
            }
            (None, None, None) => None,
        };
        let reload = ReloadConfig {
            signal: signal_hook,
            http,
            exec,
            timeout: reload_timeout,
        };

        // [verify]
        let verify_addr = v.optional("verify.addr", parse_host_port);
        let verify_name = v.optional("verify.server_name", |s| {
            rustls_pki_types::ServerName::try_from(s.to_string())
                .map(|_| s.to_string())
                .map_err(|e| format!("not a valid server name: {e}"))
        });
        let verify_attempts = v
            .number(
                "verify.attempts",
                |n| (1.0..=100.0).contains(&n) && n.fract() == 0.0,
                "must be a whole number from 1 to 100",
            )
            .map(|n| n as u32)
            .unwrap_or(DEFAULT_VERIFY_ATTEMPTS);
        let verify_delay = v.duration("verify.delay").unwrap_or(DEFAULT_VERIFY_DELAY);
        let verify = verify_addr.map(|addr| VerifyConfig {
            addr,
            server_name: verify_name,
            attempts: verify_attempts,
            delay: verify_delay,
        });
        let metrics_listen = v.optional("metrics.listen", |s| {
            s.parse::<SocketAddr>()
                .map_err(|e| format!("not an ip:port address: {e}"))
        });

        if plaintext
            && let Some(addr) = &issuer_addr
            && !is_loopback_host(&addr.host)
        {
            v.error(
                "plaintext",
                format!("only allowed with a loopback issuer_addr, not {addr}"),
            );
        }

        if !v.errors.is_empty() {
            return Err(ConfigError::Invalid(v.errors));
        }
        let identity = identity.expect("checked");
        let td = TrustDomain::new(identity.trust_domain()).expect("identity has a valid td");
        // The identity service of the control plane the identity names.
        let issuer_name = issuer_name.unwrap_or_else(|| {
            td.identity_service_name_in(identity.control_plane_namespace())
                .unwrap_or_else(|_| td.identity_service_name())
                .as_str()
                .to_string()
        });
        Ok(Config {
            identity,
            dir: dir.expect("checked"),
            trust_anchors: trust_anchors.expect("checked"),
            token_file: token_file.expect("checked"),
            issuer_addr: issuer_addr.expect("checked"),
            issuer_name,
            plaintext,
            timeout,
            policy: Policy {
                renew_at,
                jitter,
                margin,
                clock_skew,
                backoff_min,
                backoff_max,
            },
            schedule,
            key_group,
            reload,
            verify,
            metrics_listen,
        })
    }
}

/// Loads the config: the file (if any), then the environment, then validates. Blocks.
pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut raw = match path {
        Some(p) => RawConfig::load(p)?,
        None => RawConfig::default(),
    };
    raw.apply_env(env);
    raw.validate()
}

/// The environment variable for a key: `ROTATOR_BACKOFF_MAX` for `backoff.max`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', "_"))
}

fn known_key(key: &str) -> Option<&'static str> {
    KEYS.iter().map(|(k, _)| *k).find(|k| *k == key)
}

struct Validator<'a> {
    raw: &'a RawConfig,
    errors: Vec<FieldError>,
}

impl Validator<'_> {
    fn error(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn get(&self, key: &str) -> Option<&(RawValue, String)> {
        self.raw.values.get(key)
    }

    fn optional<T>(&mut self, key: &str, f: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let (value, origin) = self.get(key)?.clone();
        let RawValue::Str(s) = value else {
            self.error(key, format!("expected text, got {value} (from {origin})"));
            return None;
        };
        match f(s.trim()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(key, format!("{e} (from {origin})"));
                None
            }
        }
    }

    fn required<T>(&mut self, key: &str, f: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        if self.get(key).is_none() {
            self.error(
                key,
                format!("is required (set it in the file or as {})", env_name(key)),
            );
            return None;
        }
        self.optional(key, f)
    }

    fn bool(&mut self, key: &str) -> Option<bool> {
        let (value, origin) = self.get(key)?.clone();
        match value {
            RawValue::Bool(b) => Some(b),
            RawValue::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Some(true),
                "false" | "0" | "no" | "" => Some(false),
                _ => {
                    self.error(
                        key,
                        format!("expected true or false, got {s:?} (from {origin})"),
                    );
                    None
                }
            },
            other => {
                self.error(
                    key,
                    format!("expected true or false, got {other} (from {origin})"),
                );
                None
            }
        }
    }

    fn number(&mut self, key: &str, ok: impl Fn(f64) -> bool, rule: &str) -> Option<f64> {
        let (value, origin) = self.get(key)?.clone();
        let n = match &value {
            RawValue::Num(n) => Some(*n),
            RawValue::Str(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match n {
            Some(n) if n.is_finite() && ok(n) => Some(n),
            Some(_) => {
                self.error(key, format!("{rule}, got {value} (from {origin})"));
                None
            }
            None => {
                self.error(
                    key,
                    format!("expected a number, got {value} (from {origin})"),
                );
                None
            }
        }
    }

    fn duration(&mut self, key: &str) -> Option<Duration> {
        self.optional(key, |s| {
            humantime::parse_duration(s)
                .map_err(|e| format!("not a duration like \"30s\" or \"5m\": {e}"))
        })
    }

    fn list(&mut self, key: &str) -> Option<Vec<String>> {
        let (value, origin) = self.get(key)?.clone();
        let argv = match value {
            RawValue::List(l) => l,
            // From the environment: a TOML/JSON array, or whitespace-separated words.
            RawValue::Str(s) if s.trim_start().starts_with('[') => {
                match serde_json::from_str::<Vec<String>>(s.trim()) {
                    Ok(l) => l,
                    Err(e) => {
                        self.error(key, format!("not an array of strings: {e} (from {origin})"));
                        return None;
                    }
                }
            }
            RawValue::Str(s) => s.split_whitespace().map(str::to_string).collect(),
            other => {
                self.error(
                    key,
                    format!("expected an array of strings, got {other} (from {origin})"),
                );
                return None;
            }
        };
        if argv.is_empty() || argv[0].is_empty() {
            self.error(key, format!("must name a program to run (from {origin})"));
            return None;
        }
        Some(argv)
    }
}

fn non_empty(s: &str) -> Result<&str, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s)
    }
}

/// A `host:port` address (host may be a name or an IP; IPv6 in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl HostPort {
    /// Resolves to socket addresses. Blocks (DNS).
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        Ok((self.host.as_str(), self.port).to_socket_addrs()?.collect())
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `host:port` or `[v6]:port`.
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(HostPort {
            host: sa.ip().to_string(),
            port: sa.port(),
        });
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: port {port:?} is not a number from 0 to 65535"))?;
    if host.is_empty() || host.contains(':') || host.contains('/') {
        return Err(format!("{s:?} is not host:port"));
    }
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where the trust anchors come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorSource {
    /// A PEM file, re-read on every rotation.
    File(PathBuf),
    /// PEM text given inline (e.g. `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`).
    Pem(String),
}

impl AnchorSource {
    /// Loads the anchors. Blocks for a file.
    pub fn load(&self) -> Result<TrustAnchors, proxy_lib::verify::VerifyError> {
        match self {
            AnchorSource::File(p) => TrustAnchors::read(p),
            AnchorSource::Pem(text) => TrustAnchors::from_bytes(text.as_bytes(), "trust_anchors"),
        }
    }
}

/// A signal the signal hook can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadSignal {
    /// SIGHUP.
    Hup,
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
}

impl ReloadSignal {
    /// Parses `HUP`, `SIGHUP`, `USR1`, `SIGUSR2`, ... (case-insensitive).
    pub fn parse(s: &str) -> Result<Self, String> {
        let up = s.trim().to_ascii_uppercase();
        match up.strip_prefix("SIG").unwrap_or(&up) {
            "HUP" => Ok(Self::Hup),
            "USR1" => Ok(Self::Usr1),
            "USR2" => Ok(Self::Usr2),
            _ => Err(format!("{s:?} is not one of HUP, USR1, USR2")),
        }
    }

    /// The rustix signal.
    pub fn to_rustix(self) -> rustix::process::Signal {
        match self {
            Self::Hup => rustix::process::Signal::HUP,
            Self::Usr1 => rustix::process::Signal::USR1,
            Self::Usr2 => rustix::process::Signal::USR2,
        }
    }
}

/// Signal a process found through its pidfile, after checking it is the expected one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalHook {
    /// The pidfile.
    pub pidfile: PathBuf,
    /// The signal.
    pub signal: ReloadSignal,
    /// Expected `/proc/<pid>/comm` (or the file name of `/proc/<pid>/exe`).
    pub process_name: String,
}

/// The reload hooks run after each rotation (any combination).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadConfig {
    /// Signal a process.
    pub signal: Option<SignalHook>,
    /// POST to this URL.
    pub http: Option<String>,
    /// Run this argv.
    pub exec: Option<Vec<String>>,
    /// Timeout of the HTTP and exec hooks.
    pub timeout: Duration,
}

impl ReloadConfig {
    /// Whether any hook is configured.
    pub fn is_empty(&self) -> bool {
        self.signal.is_none() && self.http.is_none() && self.exec.is_none()
    }
}

/// The verify step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyConfig {
    /// The TLS listener.
    pub addr: HostPort,
    /// Server name to verify (default: the identity).
    pub server_name: Option<String>,
    /// Reload+verify attempts.
    pub attempts: u32,
    /// Pause between reload and handshake.
    pub delay: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The identity to keep.
    pub identity: Identity,
    /// The cert dir.
    pub dir: PathBuf,
    /// The anchors, re-read on every rotation.
    pub trust_anchors: AnchorSource,
    /// The token file, re-read on every attempt.
    pub token_file: PathBuf,
    /// The issuer's address.
    pub issuer_addr: HostPort,
    /// The issuer's TLS server name.
    pub issuer_name: String,
    /// Plaintext to a loopback issuer.
    pub plaintext: bool,
    /// Timeout of one Certify call.
    pub timeout: Duration,
    /// Renewal policy.
    pub policy: Policy,
    /// Optional cron schedule.
    pub schedule: Option<CronSchedule>,
    /// Group that may read the key.
    pub key_group: Option<u32>,
    /// Reload hooks.
    pub reload: ReloadConfig,
    /// Verify step.
    pub verify: Option<VerifyConfig>,
    /// Metrics listener.
    pub metrics_listen: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "db.ext.serviceaccount.identity.linkerd.cluster.local";

    fn minimal() -> String {
        format!(
            "identity = \"{ID}\"\ndir = \"/var/lib/rotator\"\ntrust_anchors = \"/etc/ca.crt\"\n\
             token_file = \"/etc/token\"\nissuer_addr = \"127.0.0.1:8080\"\n"
        )
    }

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::from_toml(text, Path::new("rotator.toml"))?;
        raw.apply_env(&MapEnv::from_pairs(env.iter().copied()));
        raw.validate()
    }

    #[test]
    fn defaults_apply_to_a_minimal_file() {
        let c = parse(&minimal(), &[]).unwrap();
        assert_eq!(c.identity.as_str(), ID);
        assert_eq!(c.policy.renew_at, DEFAULT_RENEW_AT);
        assert_eq!(c.policy.jitter, DEFAULT_JITTER);
        assert_eq!(c.policy.backoff_min, DEFAULT_BACKOFF_MIN);
        assert_eq!(c.policy.backoff_max, DEFAULT_BACKOFF_MAX);
        assert_eq!(c.policy.margin, DEFAULT_MARGIN);
        assert_eq!(
            c.issuer_name,
            "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"
        );
        assert!(c.reload.is_empty());
        assert!(c.verify.is_none() && c.schedule.is_none() && c.metrics_listen.is_none());
    }

    #[test]
    fn every_bad_field_is_reported_together() {
        let text = "identity = \"nope\"\nrenew_at = 1.5\njitter = \"x\"\n[backoff]\nmin = \"10m\"\nmax = \"1m\"\n\
                    [reload]\npidfile = \"/run/p.pid\"\nbogus = 1\n";
        let err = parse(text, &[]).unwrap_err();
        let ConfigError::Invalid(errs) = err else {
            panic!("{err}")
        };
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "identity",
            "dir",
            "trust_anchors",
            "token_file",
            "issuer_addr",
            "renew_at",
            "jitter",
            "backoff.max",
            "reload.process_name",
            "reload.bogus",
        ] {
            assert!(keys.contains(&k), "{k} not reported in {keys:?}");
        }
    }

    #[test]
    fn environment_overrides_the_file_and_linkerd_names_are_accepted() {
        let text = "renew_at = 0.5\n[backoff]\nmax = \"2m\"\n";
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let c = parse(
            text,
            &[
                ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", ID),
                (
                    "LINKERD2_PROXY_IDENTITY_DIR",
                    "/var/run/linkerd/identity/end-entity",
                ),
                ("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", "/var/run/token"),
                ("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", pem),
                ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", "issuer.example:8080"),
                ("LINKERD2_PROXY_IDENTITY_SVC_NAME", "issuer.example"),
                ("ROTATOR_DIR", "/override"),
                ("ROTATOR_RENEW_AT", "0.8"),
                ("ROTATOR_BACKOFF_MAX", "3m"),
                (
                    "ROTATOR_RELOAD_EXEC",
                    "[\"systemctl\", \"reload\", \"nginx\"]",
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.identity.as_str(), ID);
        assert_eq!(
            c.dir,
            PathBuf::from("/override"),
            "ROTATOR_ wins over LINKERD2_"
        );
        assert_eq!(c.token_file, PathBuf::from("/var/run/token"));
        assert_eq!(c.trust_anchors, AnchorSource::Pem(pem.trim().into()));
        assert_eq!(c.issuer_addr.to_string(), "issuer.example:8080");
        assert_eq!(c.issuer_name, "issuer.example");
        assert_eq!(c.policy.renew_at, 0.8);
        assert_eq!(c.policy.backoff_max, Duration::from_secs(180));
        assert_eq!(
            c.reload.exec.as_deref(),
            Some(&["systemctl".to_string(), "reload".into(), "nginx".into()][..])
        );
    }

    // linkerd2-proxy (env.rs parse_control_addr) talks plaintext to a loopback
    // LINKERD2_PROXY_IDENTITY_SVC_ADDR whatever _SVC_NAME says; so do we when the address
    // comes from that variable, unless `plaintext` is set explicitly.
    #[test]
    fn a_loopback_linkerd_svc_addr_means_plaintext_as_for_the_proxy() {
        let base = "identity = \"x\"\n".replace('x', ID)
            + "dir = \"/d\"\ntrust_anchors = \"/ca.crt\"\ntoken_file = \"/t\"\n";
        let svc_name = (
            "LINKERD2_PROXY_IDENTITY_SVC_NAME",
            "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local",
        );
        for (addr, want) in [
            ("127.0.0.1:8080", true),
            ("[::1]:8080", true),
            ("localhost:8080", true),
            ("10.0.0.1:8080", false),
            (
                "linkerd-identity-headless.linkerd.svc.cluster.local.:8080",
                false,
            ),
        ] {
            let c = parse(
                &base,
                &[("LINKERD2_PROXY_IDENTITY_SVC_ADDR", addr), svc_name],
            )
            .unwrap();
            assert_eq!(c.plaintext, want, "{addr}");
        }
        // An explicit setting wins.
        let c = parse(
            &base,
            &[
                ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", "127.0.0.1:8080"),
                ("ROTATOR_PLAINTEXT", "false"),
            ],
        )
        .unwrap();
        assert!(!c.plaintext);
        // A loopback issuer_addr from the file or ROTATOR_ keeps TLS (a local TLS issuer).
        assert!(!parse(&minimal(), &[]).unwrap().plaintext);
        let c = parse(&base, &[("ROTATOR_ISSUER_ADDR", "127.0.0.1:8080")]).unwrap();
        assert!(!c.plaintext);
        // ROTATOR_ISSUER_ADDR overrides a loopback Linkerd address: TLS again.
        let c = parse(
            &base,
            &[
                ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", "127.0.0.1:8080"),
                ("ROTATOR_ISSUER_ADDR", "127.0.0.1:9090"),
            ],
        )
        .unwrap();
        assert!(!c.plaintext);
    }

    #[test]
    fn plaintext_only_for_loopback_and_hooks_parse() {
        let text = format!(
            "{}plaintext = true\n",
            minimal().replace("127.0.0.1", "10.0.0.1")
        );
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("plaintext"), "{err}");
        let text = format!(
            "{}plaintext = true\nschedule = \"30 2 * * 0\"\n[reload]\npidfile = \"/run/x.pid\"\nprocess_name = \"nginx\"\n\
             signal = \"SIGUSR1\"\nhttp = \"http://127.0.0.1:4191/reload\"\nexec = [\"true\"]\ntimeout = \"3s\"\n\
             [verify]\naddr = \"127.0.0.1:4143\"\n[metrics]\nlisten = \"127.0.0.1:9991\"\n",
            minimal()
        );
        let c = parse(&text, &[]).unwrap();
        assert!(c.plaintext);
        let s = c.reload.signal.unwrap();
        assert_eq!(s.signal, ReloadSignal::Usr1);
        assert_eq!(s.process_name, "nginx");
        assert_eq!(c.reload.timeout, Duration::from_secs(3));
        assert_eq!(c.verify.unwrap().attempts, DEFAULT_VERIFY_ATTEMPTS);
        assert_eq!(c.metrics_listen.unwrap().port(), 9991);
        assert!(c.schedule.is_some());
    }

    #[test]
    fn type_errors_name_the_key_and_the_file() {
        let path = Path::new("/etc/mesh/rotator.toml");
        for (text, key) in [
            ("renew_at = \"soon\"\n", "renew_at"),
            ("plaintext = \"maybe\"\n", "plaintext"),
            ("dir = 5\n", "dir"),
            ("[reload]\nexec = [\"a\", 1]\n", "reload.exec"),
            ("schedule = 1979-05-27T07:32:00Z\n", "schedule"),
            ("[backoff]\nmax = true\n", "backoff.max"),
            ("bogus = 1\n", "bogus"),
            ("[bogus]\nx = 1\n", "bogus"),
        ] {
            let raw = RawConfig::from_toml(text, path).unwrap();
            let err = raw.validate().unwrap_err();
            assert_eq!(err.exit_code(), 78);
            let ConfigError::Invalid(errs) = err else {
                panic!("{text:?}: {err}")
            };
            let e = errs
                .iter()
                .find(|e| e.key == key)
                .unwrap_or_else(|| panic!("{text:?}: {key} not reported in {errs:?}"));
            assert!(
                e.message.contains("/etc/mesh/rotator.toml"),
                "{text:?}: {e:?}"
            );
        }
    }

    #[test]
    fn an_unreadable_file_exits_66_and_bad_toml_78_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing.toml");
        let e = load(Some(&missing), &MapEnv::default()).unwrap_err();
        assert_eq!(e.exit_code(), 66);
        assert!(e.to_string().contains("missing.toml"), "{e}");
        let e = RawConfig::from_toml("\nrenew_at = [\n", Path::new("r.toml")).unwrap_err();
        assert_eq!(e.exit_code(), 78);
        assert!(e.to_string().contains("r.toml:2"), "{e}");
    }

    #[test]
    fn every_key_has_an_environment_variable() {
        for (key, _) in KEYS {
            let var = env_name(key);
            let mut raw = RawConfig::default();
            raw.apply_env(&MapEnv::from_pairs([(var.as_str(), "x")]));
            assert!(raw.values.contains_key(key), "{var} does not set {key}");
            assert!(raw.errors.is_empty());
        }
        assert_eq!(env_name("backoff.max"), "ROTATOR_BACKOFF_MAX");
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(parse_host_port("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(parse_host_port("a.b:1").unwrap().host, "a.b");
        assert!(parse_host_port("a.b").is_err());
        assert!(parse_host_port("a.b:x").is_err());
        assert!(parse_host_port(":80").is_err());
    }
}
