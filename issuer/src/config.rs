//! `issuer.toml`: the typed raw file, the flags layered over it, and the validated [`Config`]
//! the rest of the crate uses. Every bad field is reported, not just the first.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_lib::config_file::{Env, Layers, ProcessEnv, de, env_name};
use proxy_lib::identity::TrustDomain;
use serde::{Deserialize, Serialize};

use crate::audit::AuditTarget;
use crate::ca::CaFiles;
use crate::error::{Error, Result};
use crate::kubernetes::ca::KubeCaNames;
use crate::kubernetes::review::{MAX_REVIEW_CACHE, ReviewConfig};
use crate::policy::{DEFAULT_CLOCK_SKEW, DEFAULT_LIFETIME, DEFAULT_MIN_LIFETIME, Policy};

/// The config file name inside `--dir`.
pub const CONFIG_FILE: &str = "issuer.toml";
/// Default gRPC listen address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Default admin listen address.
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9990));
/// Default token store file name (next to the config file).
pub const DEFAULT_TOKENS_FILE: &str = "tokens";
/// Default request size limit.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 65_536;
/// Default signing concurrency limit.
pub const DEFAULT_MAX_CONCURRENT_SIGNING: usize = 64;
/// Default per-credential-and-peer rate (and burst) per minute.
pub const DEFAULT_PER_CREDENTIAL_PER_MINUTE: u32 = 600;
/// Default longest leaf lifetime `lifetime` may ask for.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// Default connections tracked at once (handshaking and open); beyond it the quietest is shed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default TLS handshakes in progress per source (IPv4 address, IPv6 /64).
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 8;
/// Default connections per source (a renewing host needs one, briefly).
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 64;
/// Default failed requests per minute a source regains (also its burst).
pub const DEFAULT_FAILURES_PER_SOURCE_PER_MINUTE: u32 = crate::throttle::DEFAULT_PER_MINUTE;
/// Connections tracked at once, at most (each holds a file descriptor).
pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
/// Default: warn when the issuer certificate has less than this left.
pub const DEFAULT_CA_WARN_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// Prefix of the issuer's config variables: every key of [`KEYS`] can be set as
/// `ISSUER_<KEY>` (dots as underscores: `ISSUER_LIMITS_MAX_REQUEST_BYTES`).
pub const ENV_PREFIX: &str = "ISSUER_";

/// Every key of `issuer.toml` (each also settable from the environment, see [`ENV_PREFIX`]).
pub const KEYS: &[&str] = &[
    "trust_domain",
    "listen",
    "admin",
    "plaintext",
    "lifetime",
    "min_lifetime",
    "clock_skew",
    "server_name",
    "ca.source",
    "ca.dir",
    "ca.warn_before",
    "ca.control_plane_namespace",
    "ca.namespace",
    "ca.secret",
    "ca.trust_roots",
    "ca.retired_issuers",
    "auth.tokens",
    "auth.store",
    "auth.namespace",
    "auth.kubernetes",
    "auth.audiences",
    "auth.review_cache",
    "auth.renew_by_certificate",
    "auth.max_renewal_age",
    "auth.external_workloads",
    "auth.namespaces",
    "auth.last_issued_flush",
    "audit.path",
    "limits.max_request_bytes",
    "limits.max_concurrent_signing",
    "limits.per_credential_per_minute",
    "limits.max_lifetime",
    "limits.max_connections",
    "limits.max_pending_per_source",
    "limits.max_connections_per_source",
    "limits.exempt_sources",
    "limits.failures_per_source_per_minute",
];

/// `issuer.toml` as written: every key optional, values typed as far as serde can check them
/// alone. Flags ([`Overrides`]) are a layer over it (see [`proxy_lib::config_file::Layers`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Trust domain.
    #[serde(default, deserialize_with = "de::parsed")]
    pub trust_domain: Option<TrustDomain>,
    /// gRPC listen address.
    #[serde(default, deserialize_with = "de::parsed")]
    pub listen: Option<SocketAddr>,
    /// Admin listen address.
    #[serde(default, deserialize_with = "de::parsed")]
    pub admin: Option<SocketAddr>,
    /// Serve without TLS (loopback only).
    pub plaintext: Option<bool>,
    /// Leaf lifetime.
    #[serde(default, with = "humantime_serde")]
    pub lifetime: Option<Duration>,
    /// Minimum leaf lifetime.
    #[serde(default, with = "humantime_serde")]
    pub min_lifetime: Option<Duration>,
    /// notBefore backdating.
    #[serde(default, with = "humantime_serde")]
    pub clock_skew: Option<Duration>,
    /// The name the issuer's serving certificate carries.
    pub server_name: Option<String>,
    /// `[ca]`.
    #[serde(default)]
    pub ca: RawCa,
    /// `[auth]`.
    #[serde(default)]
    pub auth: RawAuth,
    /// `[audit]`.
    #[serde(default)]
    pub audit: RawAudit,
    /// `[limits]`.
    #[serde(default)]
    pub limits: RawLimits,
}

/// Where the CA comes from (`ca.source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaSource {
    /// `ca.dir` holds ca.crt, issuer.crt and issuer.key.
    #[default]
    Files,
    /// A Kubernetes secret (a later issue).
    Kubernetes,
}

/// `[ca]`. A new key is one more `Option` field here (with `#[serde(default, with =
/// "humantime_serde")]` for a duration), read in [`Config::from_layers`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCa {
    /// `files` or `kubernetes`.
    pub source: Option<CaSource>,
    /// Directory holding ca.crt, issuer.crt, issuer.key.
    pub dir: Option<PathBuf>,
    /// `kubernetes`: namespace of the Secret and the ConfigMap.
    pub namespace: Option<String>,
    /// `kubernetes`: the issuer Secret.
    pub secret: Option<String>,
    /// `kubernetes`: the trust-roots ConfigMap (key `ca-bundle.crt`).
    pub trust_roots: Option<String>,
    /// `kubernetes`: the ConfigMap (created by the operator) where replaced issuer
    /// certificates are recorded (key `retired-issuers.json`).
    pub retired_issuers: Option<String>,
    /// Warn when the issuer certificate has less than this left.
    #[serde(default, with = "humantime_serde")]
    pub warn_before: Option<Duration>,
    /// The control-plane namespace in Linkerd names (`identity.<ns>.<trust-domain>`), used
    /// for the issuer certificates `issuer ca new-issuer` mints.
    pub control_plane_namespace: Option<String>,
}

/// `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Token store file.
    pub tokens: Option<PathBuf>,
    /// `file` or `kubernetes`.
    pub store: Option<String>,
    /// `kubernetes`: namespace of the token Secrets (default: the CA namespace).
    pub namespace: Option<String>,
    /// Also accept Kubernetes service-account tokens, checked with TokenReviews.
    pub kubernetes: Option<bool>,
    /// The audiences a reviewed token must be valid for (default `["identity.l5d.io"]`).
    pub audiences: Option<Vec<String>>,
    /// How long a review's outcome is reused (default 10s, at most 5m; `0s`: never).
    #[serde(default, with = "humantime_serde")]
    pub review_cache: Option<Duration>,
    /// Accept a client certificate this issuer signed as the credential for renewing its
    /// identity (default true).
    pub renew_by_certificate: Option<bool>,
    /// The longest a chain of renewals by certificate may run from its bootstrap by token
    /// (default: no limit).
    #[serde(default, with = "humantime_serde")]
    pub max_renewal_age: Option<Duration>,
    /// Honour bootstrap tokens (and every credential but service-account tokens) only from
    /// the address an ExternalWorkload registers for the identity.
    pub external_workloads: Option<bool>,
    /// With `external_workloads`: the namespaces whose ExternalWorkloads are watched
    /// (default: all).
    pub namespaces: Option<Vec<String>>,
    /// With `external_workloads`: how often the last issuance is written to the
    /// ExternalWorkloads (default 10s, from 1s to 1h).
    #[serde(default, with = "humantime_serde")]
    pub last_issued_flush: Option<Duration>,
}

/// `[audit]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// `-` for stdout, or a file to append to.
    pub path: Option<String>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest request accepted.
    pub max_request_bytes: Option<usize>,
    /// Signings in flight.
    pub max_concurrent_signing: Option<usize>,
    /// Requests per minute per credential and peer (also the burst).
    pub per_credential_per_minute: Option<u32>,
    /// The longest `lifetime` allowed.
    #[serde(default, with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Connections tracked at once.
    pub max_connections: Option<usize>,
    /// TLS handshakes in progress per source.
    pub max_pending_per_source: Option<usize>,
    /// Connections per source.
    pub max_connections_per_source: Option<usize>,
    /// Sources (networks) not capped per source.
    pub exempt_sources: Option<Vec<ipnet::IpNet>>,
    /// Failed requests per minute per source (also the burst).
    pub failures_per_source_per_minute: Option<u32>,
}

/// Command-line values: the flags layer over the file (unset flags leave the file's keys).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--admin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// `--lifetime`.
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub lifetime: Option<Duration>,
    /// `--min-lifetime`.
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub min_lifetime: Option<Duration>,
    /// `--clock-skew`.
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub clock_skew: Option<Duration>,
    /// `--plaintext` (only ever turns it on).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub plaintext: bool,
}

/// Limits on requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request accepted (checked in the handler).
    pub max_request_bytes: usize,
    /// Signings in flight.
    pub max_concurrent_signing: usize,
    /// Requests per minute per credential and peer, with a burst of the same size.
    pub per_credential_per_minute: NonZeroU32,
    /// The longest leaf lifetime `lifetime` may ask for (checked at load).
    pub max_lifetime: Duration,
    /// Connections tracked at once (handshaking and open); beyond it the quietest is shed.
    pub max_connections: usize,
    /// TLS handshakes in progress per source (IPv4 address, IPv6 /64).
    pub max_pending_per_source: usize,
    /// Connections (handshaking and open) per source.
    pub max_connections_per_source: usize,
    /// Sources not capped per source (a fleet behind one NAT); still counted in all.
    pub exempt_sources: Vec<ipnet::IpNet>,
    /// Failed requests per minute per source before authentication, with a burst of the same
    /// size (see [`crate::throttle`]).
    pub failures_per_source_per_minute: NonZeroU32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_concurrent_signing: DEFAULT_MAX_CONCURRENT_SIGNING,
            per_credential_per_minute: NonZeroU32::new(DEFAULT_PER_CREDENTIAL_PER_MINUTE)
                .unwrap_or(NonZeroU32::MIN),
            max_lifetime: DEFAULT_MAX_LIFETIME,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_per_source: DEFAULT_MAX_PENDING_PER_SOURCE,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            exempt_sources: Vec::new(),
            failures_per_source_per_minute: NonZeroU32::new(DEFAULT_FAILURES_PER_SOURCE_PER_MINUTE)
                .unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Issuing policy (trust domain, lifetimes, skew).
    pub policy: Policy,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Admin listen address.
    pub admin: SocketAddr,
    /// Serve without TLS (loopback only).
    pub plaintext: bool,
    /// The serving certificate's DNS name.
    pub server_name: String,
    /// CA files.
    pub ca_files: CaFiles,
    /// `[ca] source = "kubernetes"`: the Secret and ConfigMap to watch instead of the files.
    pub ca_kubernetes: Option<KubeCaNames>,
    /// `[auth] store = "kubernetes"`: the namespace of the token Secrets (used instead of
    /// the token file).
    pub tokens_kubernetes: Option<String>,
    /// `[auth] kubernetes = true`: service-account tokens are also accepted, checked with
    /// TokenReviews for these audiences, outcomes cached this long.
    pub auth_kubernetes: Option<ReviewConfig>,
    /// `[auth] renew_by_certificate`: a client certificate this issuer signed renews its
    /// identity without a token.
    pub renew_by_certificate: bool,
    /// `[auth] max_renewal_age`: the longest a chain of renewals by certificate may run.
    pub max_renewal_age: Option<Duration>,
    /// `[auth] external_workloads = true`: the namespaces whose ExternalWorkloads are watched
    /// (empty: all); a credential is honoured only from an address one of them registers for
    /// the identity (service-account tokens excepted).
    pub auth_external_workloads: Option<Vec<String>>,
    /// `[auth] last_issued_flush`: with `external_workloads`, how often the last issuances
    /// are written to the ExternalWorkloads (each at most once per interval).
    pub last_issued_flush: Duration,
    /// Warn when the issuer certificate has less than this left.
    pub ca_warn_before: Duration,
    /// The control-plane namespace in Linkerd names (default `linkerd`).
    pub ca_control_plane_namespace: String,
    /// Token store.
    pub tokens: PathBuf,
    /// Audit log destination.
    pub audit: AuditTarget,
    /// Request limits.
    pub limits: Limits,
}

impl Config {
    /// The config file of `--dir DIR`.
    pub fn path_in_dir(dir: &Path) -> PathBuf {
        dir.join(CONFIG_FILE)
    }

    /// Reads and validates `path`, then `ISSUER_*` variables of the process environment,
    /// then `overrides`. Blocks.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self> {
        Self::load_with_env(path, overrides, &ProcessEnv)
    }

    /// [`Config::load`] with the environment given.
    pub fn load_with_env(path: &Path, overrides: &Overrides, env: &dyn Env) -> Result<Self> {
        let mut layers = Layers::file(path)?;
        layers.env(env, KEYS.iter().map(|k| (env_name(ENV_PREFIX, k), *k)));
        layers.flags(overrides).map_err(|e| Error::Config {
            path: PathBuf::from("<flags>"),
            problems: vec![e.to_string()],
        })?;
        Self::from_layers(&layers, path)
    }

    /// Validates the layers of a config read from `path` (relative paths are resolved
    /// against its directory), reporting every bad key and value together.
    pub fn from_layers(layers: &Layers, path: &Path) -> Result<Self> {
        let (raw, errors) = layers.extract::<RawConfig>();
        let mut problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let base = proxy_lib::fs::parent_dir(path).to_path_buf();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let lifetime = raw.lifetime.unwrap_or(DEFAULT_LIFETIME);
        let min_lifetime = raw.min_lifetime.unwrap_or(DEFAULT_MIN_LIFETIME);
        let clock_skew = raw.clock_skew.unwrap_or(DEFAULT_CLOCK_SKEW);
        let ca_warn_before = raw.ca.warn_before.unwrap_or(DEFAULT_CA_WARN_BEFORE);
        let trust_domain = raw.trust_domain.unwrap_or_default();
        let listen = raw.listen.unwrap_or(DEFAULT_LISTEN);
        let admin = raw.admin.unwrap_or(DEFAULT_ADMIN);
        let plaintext = raw.plaintext.unwrap_or(false);

        if lifetime.is_zero() {
            problems.push("lifetime must be greater than zero".into());
        }
        if min_lifetime.is_zero() {
            problems.push("min_lifetime must be greater than zero".into());
        }
        if clock_skew > Duration::from_secs(3600) {
            problems.push("clock_skew must be at most 1h".into());
        }
        if plaintext && !listen.ip().is_loopback() {
            problems.push(format!(
                "plaintext serving is only allowed on a loopback address, not {listen}"
            ));
        }
        // Namespaces are DNS labels; Secret and ConfigMap names DNS subdomains.
        let mut kube_name = |key: &str, v: &Option<String>, default: &str| {
            let v = v.clone().unwrap_or_else(|| default.to_string());
            let ok = if key.ends_with("namespace") {
                proxy_lib::identity::is_dns_label(&v)
            } else {
                proxy_lib::identity::is_dns_name(&v)
            };
            if !ok {
                problems.push(format!("{key} = {v:?} is not a Kubernetes object name"));
            }
            v
        };
        let ca_namespace = kube_name(
            "ca.namespace",
            &raw.ca.namespace,
            crate::kubernetes::DEFAULT_NAMESPACE,
        );
        let names = KubeCaNames {
            namespace: ca_namespace.clone(),
            secret: kube_name(
                "ca.secret",
                &raw.ca.secret,
                crate::kubernetes::DEFAULT_SECRET,
            ),
            trust_roots: kube_name(
                "ca.trust_roots",
                &raw.ca.trust_roots,
                crate::kubernetes::DEFAULT_TRUST_ROOTS,
            ),
            retired: kube_name(
                "ca.retired_issuers",
                &raw.ca.retired_issuers,
                crate::kubernetes::DEFAULT_RETIRED_ISSUERS,
            ),
        };
        let tokens_namespace = kube_name("auth.namespace", &raw.auth.namespace, &ca_namespace);
        let ca_kubernetes = match raw.ca.source.unwrap_or_default() {
            CaSource::Files => None,
            CaSource::Kubernetes => Some(names),
        };
        let tokens_kubernetes = match raw.auth.store.as_deref() {
            None | Some("file") => None,
            Some("kubernetes") => Some(tokens_namespace),
            Some(other) => {
                problems.push(format!(
                    "auth.store = {other:?}: expected \"file\" or \"kubernetes\""
                ));
                None
            }
        };
        let review_defaults = ReviewConfig::default();
        let audiences = raw
            .auth
            .audiences
            .clone()
            .unwrap_or(review_defaults.audiences);
        if audiences.is_empty() || audiences.iter().any(|a| a.trim().is_empty()) {
            problems.push("auth.audiences must list at least one non-empty audience".into());
        }
        let review_cache = raw.auth.review_cache.unwrap_or(review_defaults.cache);
        if review_cache > MAX_REVIEW_CACHE {
            problems.push(format!(
                "auth.review_cache must be at most {}",
                humantime::format_duration(MAX_REVIEW_CACHE)
            ));
        }
        let auth_kubernetes = raw
            .auth
            .kubernetes
            .unwrap_or(false)
            .then_some(ReviewConfig {
                audiences,
                cache: review_cache,
            });
        let workload_namespaces = raw.auth.namespaces.clone().unwrap_or_default();
        for ns in &workload_namespaces {
            if !proxy_lib::identity::is_dns_label(ns) {
                problems.push(format!(
                    "auth.namespaces: {ns:?} is not a Kubernetes namespace name"
                ));
            }
        }
        let last_issued_flush = raw
            .auth
            .last_issued_flush
            .unwrap_or(crate::kubernetes::last_issued::DEFAULT_FLUSH);
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&last_issued_flush) {
            problems.push(format!(
                "auth.last_issued_flush = {}: must be from 1s to 1h",
                humantime::format_duration(last_issued_flush)
            ));
        }
        let auth_external_workloads = raw
            .auth
            .external_workloads
            .unwrap_or(false)
            .then_some(workload_namespaces);
        let ca_control_plane_namespace = raw
            .ca
            .control_plane_namespace
            .clone()
            .unwrap_or_else(|| crate::ca::ops::DEFAULT_CONTROL_PLANE_NAMESPACE.to_string());
        if let Err(e) = crate::ca::ops::check_namespace(&ca_control_plane_namespace) {
            problems.push(format!("ca.control_plane_namespace: {e}"));
        }
        let server_name = raw.server_name.clone().unwrap_or_else(|| {
            trust_domain
                .identity_service_name_in(&ca_control_plane_namespace)
                .unwrap_or_else(|_| trust_domain.identity_service_name())
                .to_string()
        });
        if rustls_pki_types::ServerName::try_from(server_name.as_str())
            .map(|n| !matches!(n, rustls_pki_types::ServerName::DnsName(_)))
            .unwrap_or(true)
        {
            problems.push(format!("server_name = {server_name:?} is not a DNS name"));
        }
        let ca_dir = raw
            .ca
            .dir
            .as_deref()
            .map(resolve)
            .unwrap_or_else(|| base.clone());
        let tokens = raw
            .auth
            .tokens
            .as_deref()
            .map(resolve)
            .unwrap_or_else(|| base.join(DEFAULT_TOKENS_FILE));
        let audit = match raw.audit.path.as_deref() {
            None | Some("-") => AuditTarget::Stdout,
            Some(p) => AuditTarget::File(resolve(Path::new(p))),
        };
        let l = &raw.limits;
        let max_request_bytes = l.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
        if max_request_bytes < 512 {
            problems.push("limits.max_request_bytes must be at least 512".into());
        }
        let max_concurrent_signing = l
            .max_concurrent_signing
            .unwrap_or(DEFAULT_MAX_CONCURRENT_SIGNING);
        if max_concurrent_signing == 0 {
            problems.push("limits.max_concurrent_signing must be at least 1".into());
        }
        let per_minute = NonZeroU32::new(
            l.per_credential_per_minute
                .unwrap_or(DEFAULT_PER_CREDENTIAL_PER_MINUTE),
        );
        if per_minute.is_none() {
            problems.push("limits.per_credential_per_minute must be at least 1".into());
        }
        let max_lifetime = l.max_lifetime.unwrap_or(DEFAULT_MAX_LIFETIME);
        if lifetime > max_lifetime {
            problems.push(format!(
                "lifetime = {:?} is longer than limits.max_lifetime = {:?} (shorten the \
                 lifetime, or raise limits.max_lifetime)",
                humantime::format_duration(lifetime).to_string(),
                humantime::format_duration(max_lifetime).to_string(),
            ));
        }
        let mut at_least_one = |key: &str, v: Option<usize>, default: usize| {
            let v = v.unwrap_or(default);
            if v == 0 || v > MAX_MAX_CONNECTIONS {
                problems.push(format!(
                    "limits.{key} = {v}: must be between 1 and {MAX_MAX_CONNECTIONS}"
                ));
            }
            v
        };
        let max_connections = at_least_one(
            "max_connections",
            l.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        );
        let max_pending_per_source = at_least_one(
            "max_pending_per_source",
            l.max_pending_per_source,
            DEFAULT_MAX_PENDING_PER_SOURCE,
        );
        let max_connections_per_source = at_least_one(
            "max_connections_per_source",
            l.max_connections_per_source,
            DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
        );
        let failures = NonZeroU32::new(
            l.failures_per_source_per_minute
                .unwrap_or(DEFAULT_FAILURES_PER_SOURCE_PER_MINUTE),
        );
        if failures.is_none() {
            problems.push("limits.failures_per_source_per_minute must be at least 1".into());
        }
        if raw.auth.max_renewal_age == Some(Duration::ZERO) {
            problems.push(
                "auth.max_renewal_age must be more than 0s (leave it out for no limit)".into(),
            );
        }
        if !problems.is_empty() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                problems,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            policy: Policy {
                trust_domain,
                control_plane_namespace: ca_control_plane_namespace.clone(),
                lifetime,
                min_lifetime,
                clock_skew,
            },
            listen,
            admin,
            plaintext,
            server_name,
            ca_files: CaFiles::in_dir(&ca_dir),
            ca_kubernetes,
            tokens_kubernetes,
            auth_kubernetes,
            renew_by_certificate: raw.auth.renew_by_certificate.unwrap_or(true),
            max_renewal_age: raw.auth.max_renewal_age,
            auth_external_workloads,
            last_issued_flush,
            ca_warn_before,
            ca_control_plane_namespace,
            tokens,
            audit,
            limits: Limits {
                max_request_bytes,
                max_concurrent_signing,
                per_credential_per_minute: per_minute.unwrap_or(NonZeroU32::MIN),
                max_lifetime,
                max_connections,
                max_pending_per_source,
                max_connections_per_source,
                exempt_sources: l.exempt_sources.clone().unwrap_or_default(),
                failures_per_source_per_minute: failures.unwrap_or(NonZeroU32::MIN),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, o: &Overrides) -> Result<Config> {
        let path = Path::new("/etc/issuer/issuer.toml");
        let mut layers = Layers::from_toml(text, path)?;
        layers.flags(o).unwrap();
        Config::from_layers(&layers, path)
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = parse("", &Overrides::default()).unwrap();
        assert_eq!(c.policy.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin.to_string(), "127.0.0.1:9990");
        assert_eq!(c.policy.lifetime, Duration::from_secs(86_400));
        assert_eq!(c.policy.min_lifetime, Duration::from_secs(3600));
        assert_eq!(c.policy.clock_skew, Duration::from_secs(20));
        assert_eq!(
            c.server_name,
            "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"
        );
        assert_eq!(c.ca_files, CaFiles::in_dir(Path::new("/etc/issuer")));
        assert_eq!(c.tokens, Path::new("/etc/issuer/tokens"));
        assert_eq!(c.audit, AuditTarget::Stdout);
        assert_eq!(c.limits.max_request_bytes, 65_536);
        assert_eq!(c.limits.per_credential_per_minute.get(), 600);
    }

    #[test]
    fn the_spec_example_parses_and_flags_override() {
        let text = r#"
trust_domain = "example.org"
listen = "127.0.0.1:8080"
admin = "127.0.0.1:9990"
plaintext = false
lifetime = "24h"
min_lifetime = "1h"
clock_skew = "20s"
server_name = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.example.org"
[ca]
source = "files"
dir = "ca"
[auth]
tokens = "/var/lib/issuer/tokens"
[audit]
path = "audit.log"
[limits]
max_request_bytes = 65536
max_concurrent_signing = 64
per_credential_per_minute = 600
"#;
        let o = Overrides {
            lifetime: Some(Duration::from_secs(10)),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            plaintext: true,
            ..Overrides::default()
        };
        let c = parse(text, &o).unwrap();
        assert_eq!(c.policy.trust_domain.as_str(), "example.org");
        assert_eq!(c.policy.lifetime, Duration::from_secs(10));
        assert_eq!(c.listen.port(), 1);
        assert!(c.plaintext);
        assert_eq!(c.ca_files.cert, Path::new("/etc/issuer/ca/issuer.crt"));
        assert_eq!(c.audit, AuditTarget::File("/etc/issuer/audit.log".into()));
    }

    #[test]
    fn every_bad_field_is_reported() {
        let text = r#"
trust_domain = "Bad_Domain"
listen = "0.0.0.0:8080"
plaintext = true
lifetime = "soon"
server_name = "10.0.0.1"
[ca]
source = "kubernets"
[limits]
per_credential_per_minute = 0
"#;
        let Err(Error::Config { problems, .. }) = parse(text, &Overrides::default()) else {
            panic!("accepted");
        };
        let all = problems.join("\n");
        for needle in [
            "trust_domain",
            "plaintext",
            "lifetime",
            "server_name",
            "kubernetes",
            "per_credential",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
    }

    #[test]
    fn every_key_can_come_from_the_environment_between_the_file_and_the_flags() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("issuer.toml");
        std::fs::write(&path, "lifetime = \"2h\"\nclock_skew = \"5s\"\n").unwrap();
        let env = proxy_lib::config_file::MapEnv::from_pairs([
            ("ISSUER_LIFETIME", "3h"),
            ("ISSUER_CLOCK_SKEW", "7s"),
            ("ISSUER_LIMITS_PER_CREDENTIAL_PER_MINUTE", "9"),
            ("ISSUER_PLAINTEXT", "true"),
            ("ISSUER_TRUST_DOMAIN", "example.org"),
        ]);
        let flags = Overrides {
            clock_skew: Some(Duration::from_secs(1)),
            ..Overrides::default()
        };
        let c = Config::load_with_env(&path, &flags, &env).unwrap();
        assert_eq!(c.policy.lifetime, Duration::from_secs(3 * 3600));
        assert_eq!(c.policy.clock_skew, Duration::from_secs(1));
        assert_eq!(c.limits.per_credential_per_minute.get(), 9);
        assert!(c.plaintext);
        assert_eq!(c.policy.trust_domain.as_str(), "example.org");
        // Every listed key is one RawConfig knows.
        for key in KEYS {
            let mut layers = Layers::new();
            layers.set(key, "x", "test");
            let (_, errors) = layers.extract::<RawConfig>();
            assert!(
                errors.iter().all(|e| !e.message.starts_with("unknown key")),
                "{key}: {errors:?}"
            );
        }
        let env = proxy_lib::config_file::MapEnv::from_pairs([("ISSUER_LISTEN", "nowhere")]);
        let e = Config::load_with_env(&path, &Overrides::default(), &env).unwrap_err();
        assert!(e.to_string().contains("(from ISSUER_LISTEN)"), "{e}");
        assert_eq!(e.exit_code(), 78);
    }

    #[test]
    fn a_lifetime_above_max_lifetime_is_refused_naming_both() {
        // The default ceiling is 7 days.
        assert_eq!(
            parse("", &Overrides::default())
                .unwrap()
                .limits
                .max_lifetime,
            Duration::from_secs(7 * 86_400)
        );
        parse("lifetime = \"7d\"\n", &Overrides::default()).unwrap();
        let Err(Error::Config { problems, .. }) =
            parse("lifetime = \"1000years\"\n", &Overrides::default())
        else {
            panic!("a 1000-year lifetime was accepted");
        };
        let all = problems.join("\n");
        assert!(
            all.contains("lifetime = \"1000years")
                && all.contains("limits.max_lifetime = \"7days\""),
            "{all}"
        );
        // A flag is checked the same way; a raised ceiling lets a longer lifetime through.
        let long = Overrides {
            lifetime: Some(Duration::from_secs(30 * 86_400)),
            ..Overrides::default()
        };
        assert!(parse("", &long).is_err());
        let c = parse("[limits]\nmax_lifetime = \"90d\"\n", &long).unwrap();
        assert_eq!(c.policy.lifetime, Duration::from_secs(30 * 86_400));
    }

    #[test]
    fn the_last_issued_flush_defaults_to_10s_and_is_bounded() {
        let c = parse("[auth]\nexternal_workloads = true\n", &Overrides::default()).unwrap();
        assert_eq!(c.last_issued_flush, Duration::from_secs(10));
        let c = parse(
            "[auth]\nlast_issued_flush = \"1s\"\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.last_issued_flush, Duration::from_secs(1));
        for bad in ["0s", "2h"] {
            let text = format!("[auth]\nlast_issued_flush = \"{bad}\"\n");
            let Err(Error::Config { problems, .. }) = parse(&text, &Overrides::default()) else {
                panic!("last_issued_flush = {bad} was accepted");
            };
            assert!(
                problems.join("\n").contains("auth.last_issued_flush"),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn connection_caps_and_the_failure_throttle_are_configurable() {
        let c = parse("", &Overrides::default()).unwrap();
        assert_eq!(
            crate::server::conn_caps(&c.limits),
            proxy_lib::net::caps::Caps {
                max_connections: 4096,
                max_pending_per_source: 8,
                max_connections_per_source: 64,
                exempt: Vec::new(),
            }
        );
        assert_eq!(c.limits.failures_per_source_per_minute.get(), 20);
        let c = parse(
            "[limits]\nmax_connections = 100\nmax_pending_per_source = 2\n\
             max_connections_per_source = 5\nexempt_sources = [\"10.0.0.0/8\", \"fd00::/64\"]\n\
             failures_per_source_per_minute = 3\n",
            &Overrides::default(),
        )
        .unwrap();
        let caps = crate::server::conn_caps(&c.limits);
        assert_eq!(
            (
                caps.max_connections,
                caps.max_pending_per_source,
                caps.max_connections_per_source
            ),
            (100, 2, 5)
        );
        assert_eq!(
            caps.exempt,
            vec!["10.0.0.0/8".parse().unwrap(), "fd00::/64".parse().unwrap()]
        );
        assert_eq!(c.limits.failures_per_source_per_minute.get(), 3);
        // From the environment too, a list as TOML text.
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("issuer.toml");
        std::fs::write(&path, "").unwrap();
        let env = proxy_lib::config_file::MapEnv::from_pairs([
            ("ISSUER_LIMITS_EXEMPT_SOURCES", "[\"192.168.0.0/16\"]"),
            ("ISSUER_LIMITS_MAX_PENDING_PER_SOURCE", "4"),
        ]);
        let c = Config::load_with_env(&path, &Overrides::default(), &env).unwrap();
        assert_eq!(
            c.limits.exempt_sources,
            vec!["192.168.0.0/16".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!(c.limits.max_pending_per_source, 4);
        // Zeroes and a bad network are each named.
        let Err(Error::Config { problems, .. }) = parse(
            "[limits]\nmax_connections = 0\nmax_pending_per_source = 0\n\
             max_connections_per_source = 0\nfailures_per_source_per_minute = 0\n",
            &Overrides::default(),
        ) else {
            panic!("zero caps accepted");
        };
        let all = problems.join("\n");
        for key in [
            "limits.max_connections ",
            "limits.max_pending_per_source",
            "limits.max_connections_per_source",
            "limits.failures_per_source_per_minute",
        ] {
            assert!(all.contains(key), "{key} missing from {all}");
        }
        let e = parse(
            "[limits]\nexempt_sources = [\"10.0.0.0/33\"]\n",
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("limits.exempt_sources"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<RawConfig>("lifetme = \"1h\"").is_err());
    }

    #[test]
    fn file_errors_name_the_key_and_the_file_and_pick_the_exit_code() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("issuer.toml");
        let file = path.display().to_string();
        for (text, key) in [
            ("lifetme = \"1h\"\n", "lifetme"),
            ("plaintext = \"yes\"\n", "plaintext"),
            (
                "[limits]\nmax_request_bytes = \"big\"\n",
                "limits.max_request_bytes",
            ),
            ("[ca]\ndir = 7\n", "ca.dir"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Config::load(&path, &Overrides::default()).unwrap_err();
            let shown = e.to_string();
            assert!(shown.contains(&format!("key `{key}`")), "{text:?}: {shown}");
            assert!(shown.contains(&file), "{text:?}: {shown}");
            assert_eq!(e.exit_code(), 78, "{shown}");
        }
        let e = Config::load(&d.path().join("missing.toml"), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
        assert_eq!(e.exit_code(), 66, "{e}");
    }

    #[test]
    fn kubernetes_sources_take_their_keys_and_defaults() {
        let c = parse(
            "[ca]\nsource = \"kubernetes\"\n[auth]\nstore = \"kubernetes\"\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.ca_kubernetes, Some(KubeCaNames::default()));
        assert_eq!(c.tokens_kubernetes.as_deref(), Some("linkerd"));
        let c = parse(
            "[ca]\nsource = \"kubernetes\"\nnamespace = \"mesh\"\nsecret = \"iss\"\n\
             trust_roots = \"roots\"\nretired_issuers = \"old\"\n[auth]\nstore = \"kubernetes\"\n",
            &Overrides::default(),
        )
        .unwrap();
        let names = c.ca_kubernetes.unwrap();
        assert_eq!(names.retired, "old");
        assert_eq!(
            (
                names.namespace.as_str(),
                names.secret.as_str(),
                names.trust_roots.as_str()
            ),
            ("mesh", "iss", "roots")
        );
        assert_eq!(c.tokens_kubernetes.as_deref(), Some("mesh"));
        let c = parse(
            "[auth]\nstore = \"kubernetes\"\nnamespace = \"tok\"\n",
            &Overrides::default(),
        )
        .unwrap();
        assert!(c.ca_kubernetes.is_none());
        assert_eq!(c.tokens_kubernetes.as_deref(), Some("tok"));
        let Err(Error::Config { problems, .. }) = parse(
            "[ca]\nnamespace = \"Bad_NS\"\n[auth]\nstore = \"etcd\"\n",
            &Overrides::default(),
        ) else {
            panic!("accepted");
        };
        let all = problems.join("\n");
        assert!(
            all.contains("ca.namespace") && all.contains("auth.store"),
            "{all}"
        );
    }
    #[test]
    fn the_kubernetes_authenticator_takes_its_keys_and_defaults() {
        let c = parse("", &Overrides::default()).unwrap();
        assert_eq!(c.auth_kubernetes, None);
        let c = parse("[auth]\nkubernetes = true\n", &Overrides::default()).unwrap();
        assert_eq!(c.auth_kubernetes, Some(ReviewConfig::default()));
        assert_eq!(
            ReviewConfig::default().audiences,
            vec!["identity.l5d.io".to_string()]
        );
        let c = parse(
            "[auth]\nkubernetes = true\naudiences = [\"a\", \"b\"]\nreview_cache = \"30s\"\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.auth_kubernetes,
            Some(ReviewConfig {
                audiences: vec!["a".into(), "b".into()],
                cache: Duration::from_secs(30),
            })
        );
        let Err(Error::Config { problems, .. }) = parse(
            "[auth]\nkubernetes = true\naudiences = []\nreview_cache = \"1h\"\n",
            &Overrides::default(),
        ) else {
            panic!("accepted");
        };
        let all = problems.join("\n");
        assert!(
            all.contains("auth.audiences") && all.contains("auth.review_cache"),
            "{all}"
        );
    }
}
