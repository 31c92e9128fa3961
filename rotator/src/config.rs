//! The rotator's configuration: `rotator.toml`, then environment overrides, layered as
//! every binary of the workspace does it ([`proxy_lib::config_file::Layers`]), read into the
//! typed [`RawConfig`], then validated into [`Config`] in one pass that reports every bad
//! field, not just the first, each with where its value came from.
//!
//! Every key of the file can be set from the environment as `ROTATOR_<KEY>` (dots become
//! underscores: `backoff.max` is `ROTATOR_BACKOFF_MAX`). Linkerd's variable names are accepted
//! too, with Linkerd's meaning (see [`LINKERD_ENV`]). Precedence: `ROTATOR_*`, then
//! `LINKERD2_PROXY_IDENTITY_*`, then the file, then the defaults below. A variable set to a
//! blank value counts as unset.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_lib::config_file::{self, ConfigFileError, Layers};
use proxy_lib::identity::{Identity, TrustDomain};

use crate::schedule::{CronSchedule, Policy};

mod raw;
mod types;

pub use proxy_lib::config_file::{Env, FieldError, MapEnv, ProcessEnv};
pub use raw::{RawBackoff, RawConfig, RawMetrics, RawReload, RawVerify};
use types::is_loopback_host;
pub use types::{
    AnchorSource, HostPort, ReloadConfig, ReloadSignal, SignalHook, VerifyConfig, parse_host_port,
};

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
/// Default interval of the daemon's trust-bundle poll between renewals.
pub const DEFAULT_BUNDLE_POLL: Duration = Duration::from_secs(3600);
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
        "bootstrap anchor bundle (a PEM file path, or PEM text): trusted until a signed bundle is installed",
    ),
    (
        "bundle_poll_interval",
        "how often the daemon fetches the issuer's trust bundle between renewals (0: never)",
    ),
    (
        "token_file",
        "file holding the bootstrap token (re-read on every attempt)",
    ),
    ("issuer_addr", "host:port of the issuer"),
    ("issuer_name", "TLS server name of the issuer"),
    (
        "source_addr",
        "local IP to connect to the issuer from (the one its ExternalWorkload registers)",
    ),
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

/// The configuration's layers (the file, then the environment) before validation.
#[derive(Debug, Clone, Default)]
pub struct Sources(Layers);

impl Sources {
    /// The file layer from TOML text read from `path` (which names it in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Ok(Self(Layers::from_toml(text, path)?))
    }

    /// Reads and parses a config file. Blocks.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(Self(Layers::file(path)?))
    }

    /// Applies environment overrides: Linkerd's names first, then `ROTATOR_*` (which win).
    pub fn apply_env(&mut self, env: &dyn Env) {
        self.0.env(env, LINKERD_ENV.iter().copied());
        self.0
            .env(env, KEYS.iter().map(|(key, _)| (env_name(key), *key)));
    }

    /// The layers, with where each key's value came from.
    pub fn layers(&self) -> &Layers {
        &self.0
    }

    /// Validates every field and returns the config, or every problem found.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let (raw, errors) = self.0.extract::<RawConfig>();
        let mut v = Check {
            layers: &self.0,
            errors,
        };
        let identity = v.required("identity", raw.identity);
        let dir = v.non_empty("dir", raw.dir);
        let dir = v.required("dir", dir);
        let trust_anchors = v.required("trust_anchors", raw.trust_anchors);
        let trust_anchors = v.value("trust_anchors", trust_anchors, |s| {
            let s = s.trim();
            if s.is_empty() {
                Err("must not be empty".to_string())
            } else if s.starts_with("-----BEGIN") {
                Ok(AnchorSource::Pem(s.to_string()))
            } else {
                Ok(AnchorSource::File(PathBuf::from(s)))
            }
        });
        let token_file = v.non_empty("token_file", raw.token_file);
        let token_file = v.required("token_file", token_file);
        let issuer_addr = v.required("issuer_addr", raw.issuer_addr);
        let issuer_name = v.value("issuer_name", raw.issuer_name, |s| {
            let s = s.trim();
            rustls_pki_types::ServerName::try_from(s.to_string())
                .map_err(|e| format!("not a valid server name: {e}"))?;
            Ok(proxy_lib::identity::normalize_name(s))
        });
        // Linkerd's meaning of a loopback LINKERD2_PROXY_IDENTITY_SVC_ADDR: no TLS (the proxy
        // then ignores _SVC_NAME and talks plaintext to a local identity service). An explicit
        // `plaintext` wins; a loopback issuer_addr from anywhere else keeps TLS.
        let linkerd_loopback = self.0.origin("issuer_addr") == Some(LINKERD_SVC_ADDR)
            && issuer_addr
                .as_ref()
                .is_some_and(|a| is_loopback_host(&a.host));
        let plaintext = raw.plaintext.unwrap_or(linkerd_loopback);
        let renew_at = v.range(
            "renew_at",
            raw.renew_at,
            |n| n > 0.0 && n < 1.0,
            "must be between 0 and 1 (exclusive)",
            DEFAULT_RENEW_AT,
        );
        let fraction = |n: f64| (0.0..0.5).contains(&n);
        let jitter = v.range(
            "jitter",
            raw.jitter,
            fraction,
            "must be in [0, 0.5)",
            DEFAULT_JITTER,
        );
        let margin = v.range(
            "margin",
            raw.margin,
            fraction,
            "must be in [0, 0.5)",
            DEFAULT_MARGIN,
        );
        let backoff_min = raw.backoff.min.unwrap_or(DEFAULT_BACKOFF_MIN);
        let backoff_max = raw.backoff.max.unwrap_or(DEFAULT_BACKOFF_MAX);
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
        let schedule = v.value("schedule", raw.schedule, |s| {
            CronSchedule::parse(s.trim()).map_err(|e| e.to_string())
        });
        let key_group = v.value("key_group", raw.key_group, |s| {
            proxy_lib::account::group_id(s.trim()).map_err(|e| e.to_string())
        });
        let reload = v.reload(raw.reload);
        let verify = v.verify(raw.verify);
        if plaintext
            && let Some(addr) = &issuer_addr
            && !is_loopback_host(&addr.host)
        {
            v.error(
                "plaintext",
                format!("only allowed with a loopback issuer_addr, not {addr}"),
            );
        }
        let (Some(identity), Some(dir), Some(trust_anchors), Some(token_file), Some(issuer_addr)) =
            (identity, dir, trust_anchors, token_file, issuer_addr)
        else {
            return Err(ConfigError::Invalid(v.errors));
        };
        if !v.errors.is_empty() {
            return Err(ConfigError::Invalid(v.errors));
        }
        // The identity service of the control plane the identity names.
        let issuer_name = issuer_name.unwrap_or_else(|| {
            let td = TrustDomain::new(identity.trust_domain()).unwrap_or_default();
            td.identity_service_name_in(identity.control_plane_namespace())
                .unwrap_or_else(|_| td.identity_service_name())
                .as_str()
                .to_string()
        });
        Ok(Config {
            identity,
            dir,
            trust_anchors,
            token_file,
            issuer_addr,
            issuer_name,
            source_addr: raw.source_addr,
            plaintext,
            timeout: raw.timeout.unwrap_or(DEFAULT_TIMEOUT),
            policy: Policy {
                renew_at,
                jitter,
                margin,
                clock_skew: raw.clock_skew.unwrap_or(DEFAULT_CLOCK_SKEW),
                backoff_min,
                backoff_max,
            },
            schedule,
            key_group,
            reload,
            verify,
            metrics_listen: raw.metrics.listen,
            bundle_poll_interval: Some(raw.bundle_poll_interval.unwrap_or(DEFAULT_BUNDLE_POLL))
                .filter(|d| !d.is_zero()),
        })
    }
}

/// Loads the config: the file (if any), then the environment, then validates. Blocks.
pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut sources = match path {
        Some(p) => Sources::load(p)?,
        None => Sources::default(),
    };
    sources.apply_env(env);
    sources.validate()
}

/// The environment variable for a key: `ROTATOR_BACKOFF_MAX` for `backoff.max`.
pub fn env_name(key: &str) -> String {
    config_file::env_name(ENV_PREFIX, key)
}

/// Validation in progress: the problems found so far, each naming where its value came from.
struct Check<'a> {
    layers: &'a Layers,
    errors: Vec<FieldError>,
}

impl Check<'_> {
    fn error(&mut self, key: &str, message: impl Display) {
        let message = match self.layers.origin(key) {
            Some(origin) => format!("{message} (from {origin})"),
            None => message.to_string(),
        };
        self.errors.push(FieldError::new(key, message));
    }

    /// `value`, or a "required" error when neither it nor a refused value is there.
    fn required<T>(&mut self, key: &str, value: Option<T>) -> Option<T> {
        if value.is_none() && !self.errors.iter().any(|e| e.key == key) {
            self.error(
                key,
                format!("is required (set it in the file or as {})", env_name(key)),
            );
        }
        value
    }

    /// `value` checked and converted by `f`.
    fn value<T, U>(
        &mut self,
        key: &str,
        value: Option<T>,
        f: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        match f(value?) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(key, e);
                None
            }
        }
    }

    fn non_empty(&mut self, key: &str, path: Option<PathBuf>) -> Option<PathBuf> {
        self.value(key, path, |p| {
            if p.as_os_str().is_empty() {
                Err("must not be empty".into())
            } else {
                Ok(p)
            }
        })
    }

    fn range(
        &mut self,
        key: &str,
        value: Option<f64>,
        ok: impl Fn(f64) -> bool,
        rule: &str,
        default: f64,
    ) -> f64 {
        self.value(key, value, |n| {
            if n.is_finite() && ok(n) {
                Ok(n)
            } else {
                Err(format!("{rule}, got {n}"))
            }
        })
        .unwrap_or(default)
    }

    fn reload(&mut self, raw: RawReload) -> ReloadConfig {
        let pidfile = self.non_empty("reload.pidfile", raw.pidfile);
        let process_name = self.value("reload.process_name", raw.process_name, |s| {
            let s = s.trim();
            if s.is_empty() {
                Err("must not be empty".to_string())
            } else {
                Ok(s.to_string())
            }
        });
        let http = self.value("reload.http", raw.http, |s| {
            let uri: http::Uri = s.trim().parse().map_err(|e| format!("not a URL: {e}"))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err("must be an http:// URL with a host".into());
            }
            Ok(uri.to_string())
        });
        let signal = match (pidfile, raw.signal, process_name) {
            (Some(pidfile), signal, Some(process_name)) => Some(SignalHook {
                pidfile,
                signal: signal.unwrap_or(ReloadSignal::Hup),
                process_name,
            }),
            (Some(_), _, None) => {
                self.error(
                    "reload.process_name",
                    "is required with reload.pidfile (the pid is checked before it is signalled)",
                );
                None
            }
            (None, Some(_), _) | (None, None, Some(_)) => {
                self.error(
                    "reload.pidfile",
                    "is required with reload.signal/process_name",
                );
                None
            }
            (None, None, None) => None,
        };
        ReloadConfig {
            signal,
            http,
            exec: raw.exec,
            timeout: raw.timeout.unwrap_or(DEFAULT_RELOAD_TIMEOUT),
        }
    }

    fn verify(&mut self, raw: RawVerify) -> Option<VerifyConfig> {
        let server_name = self.value("verify.server_name", raw.server_name, |s| {
            let s = s.trim();
            rustls_pki_types::ServerName::try_from(s.to_string())
                .map(|_| s.to_string())
                .map_err(|e| format!("not a valid server name: {e}"))
        });
        let attempts = self
            .value("verify.attempts", raw.attempts, |n| {
                if (1..=100).contains(&n) {
                    Ok(n)
                } else {
                    Err(format!("must be a whole number from 1 to 100, got {n}"))
                }
            })
            .unwrap_or(DEFAULT_VERIFY_ATTEMPTS);
        Some(VerifyConfig {
            addr: raw.addr?,
            server_name,
            attempts,
            delay: raw.delay.unwrap_or(DEFAULT_VERIFY_DELAY),
        })
    }
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
    /// The local address to connect from (`None`: the OS picks).
    pub source_addr: Option<std::net::IpAddr>,
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
    /// How often the daemon fetches the issuer's trust bundle between renewals (`None`:
    /// never; a renewal always fetches it).
    pub bundle_poll_interval: Option<Duration>,
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
        let mut raw = Sources::from_toml(text, Path::new("rotator.toml"))?;
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
        assert_eq!(c.source_addr, None);
    }

    #[test]
    fn source_addr_is_an_ip_from_the_file_or_the_environment() {
        let c = parse(&(minimal() + "source_addr = \"127.0.0.2\"\n"), &[]).unwrap();
        assert_eq!(c.source_addr, Some("127.0.0.2".parse().unwrap()));
        let c = parse(&minimal(), &[("ROTATOR_SOURCE_ADDR", "::1")]).unwrap();
        assert_eq!(c.source_addr, Some("::1".parse().unwrap()));
        let Err(ConfigError::Invalid(errs)) =
            parse(&(minimal() + "source_addr = \"host.example\"\n"), &[])
        else {
            panic!("a host name was accepted as source_addr");
        };
        assert_eq!(errs[0].key, "source_addr");
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
            let raw = Sources::from_toml(text, path).unwrap();
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
        let e = Sources::from_toml("\nrenew_at = [\n", Path::new("r.toml")).unwrap_err();
        assert_eq!(e.exit_code(), 78);
        assert!(e.to_string().contains("r.toml:2"), "{e}");
    }

    #[test]
    fn every_key_has_an_environment_variable() {
        for (key, _) in KEYS {
            let var = env_name(key);
            let mut sources = Sources::default();
            sources.apply_env(&MapEnv::from_pairs([(var.as_str(), "x")]));
            let layers = sources.layers();
            assert!(layers.get(key).is_some(), "{var} does not set {key}");
            assert_eq!(layers.origin(key), Some(var.as_str()));
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
