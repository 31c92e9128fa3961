//! `rotator.toml` as typed serde structs: every key optional (the environment may set what
//! the file leaves out), values typed as far as serde can check them alone. Ranges, required
//! keys and keys that depend on each other are checked by [`super::Sources::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use proxy_lib::config_file::de;
use proxy_lib::identity::Identity;
use serde::Deserialize;

use super::{HostPort, ReloadSignal};

/// The keys as written in the file or the environment (see [`super::KEYS`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // each key is described in `KEYS`
pub struct RawConfig {
    #[serde(default, deserialize_with = "de::parsed")]
    pub identity: Option<Identity>,
    pub dir: Option<PathBuf>,
    pub trust_anchors: Option<String>,
    pub token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "de::parsed")]
    pub issuer_addr: Option<HostPort>,
    pub issuer_name: Option<String>,
    #[serde(default, deserialize_with = "de::parsed")]
    pub source_addr: Option<std::net::IpAddr>,
    #[serde(default, deserialize_with = "de::switch")]
    pub plaintext: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::number")]
    pub renew_at: Option<f64>,
    #[serde(default, deserialize_with = "de::number")]
    pub jitter: Option<f64>,
    #[serde(default, deserialize_with = "de::number")]
    pub margin: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub clock_skew: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub bundle_poll_interval: Option<Duration>,
    #[serde(default)]
    pub backoff: RawBackoff,
    pub schedule: Option<String>,
    pub key_group: Option<String>,
    #[serde(default)]
    pub reload: RawReload,
    #[serde(default)]
    pub verify: RawVerify,
    #[serde(default)]
    pub metrics: RawMetrics,
}

/// `[backoff]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawBackoff {
    #[serde(default, with = "humantime_serde")]
    pub min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max: Option<Duration>,
}

/// `[reload]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawReload {
    #[serde(default, deserialize_with = "de::parsed")]
    pub signal: Option<ReloadSignal>,
    pub pidfile: Option<PathBuf>,
    pub process_name: Option<String>,
    pub http: Option<String>,
    #[serde(default, deserialize_with = "de::argv")]
    pub exec: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// `[verify]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawVerify {
    #[serde(default, deserialize_with = "de::parsed")]
    pub addr: Option<HostPort>,
    pub server_name: Option<String>,
    #[serde(default, deserialize_with = "de::number")]
    pub attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawMetrics {
    #[serde(default, deserialize_with = "de::parsed")]
    pub listen: Option<SocketAddr>,
}
