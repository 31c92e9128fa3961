//! The cert on disk as the rotator sees it: read, checked against the config, and cached
//! until `..data` or the anchors file changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use proxy_lib::bundle::CertBundle;
use proxy_lib::cert::CertInfo;
use proxy_lib::clock::{SharedClock, rfc3339};
use proxy_lib::fs::FileStamp;
use proxy_lib::identity::matches_san;
use proxy_lib::verify::Usage;

use crate::config::Config;
use crate::schedule::{self, CertTimes, Decision};
use crate::state::State;

/// The cert found on disk.
#[derive(Debug, Clone)]
pub enum Current {
    /// A complete, matching set for our identity, chaining to the configured anchors.
    Valid {
        /// Its times (issued = when received, if the state file knows, else notBefore + skew).
        times: CertTimes,
        /// The leaf.
        leaf: Box<CertInfo>,
    },
    /// Missing, unreadable, mismatched, expired, for another identity or untrusted.
    Unusable(String),
}

impl Current {
    /// The times, for a usable cert.
    pub fn times(&self) -> Option<&CertTimes> {
        match self {
            Current::Valid { times, .. } => Some(times),
            Current::Unusable(_) => None,
        }
    }
}

/// A stable jitter sample in [-1, 1] for a cert, from its fingerprint: the same cert always
/// gets the same renewal point (across restarts and between `run` and `rotate`), different
/// certs spread out.
pub fn jitter_sample(sha256_hex: &str) -> f64 {
    let n = u64::from_str_radix(sha256_hex.get(..16).unwrap_or("0"), 16).unwrap_or(0);
    (n as f64 / u64::MAX as f64) * 2.0 - 1.0
}

/// What the cached inspection depends on: the resolved version dir and the anchors file's
/// stamp.
type CacheKey = (PathBuf, Option<FileStamp>);

/// The cert dir of one config, with the last inspection cached. Every method blocks briefly
/// (a readlink and a stat; a full read when something changed), so async code calls them
/// from `spawn_blocking`.
#[derive(Debug)]
pub(crate) struct View {
    config: Arc<Config>,
    clock: SharedClock,
    cache: Option<(CacheKey, Current)>,
}

impl View {
    pub(crate) fn new(config: Arc<Config>, clock: SharedClock) -> Self {
        Self {
            config,
            clock,
            cache: None,
        }
    }

    /// Looks at the cert on disk (cached; re-read only when `..data` or the anchors file
    /// changes). Blocks briefly.
    pub(crate) fn current(&mut self) -> Current {
        let now = self.clock.now();
        let key = cache_key(&self.config);
        let cached = match &self.cache {
            Some((k, c)) if *k == key && key.0 != self.config.dir => Some(c.clone()),
            _ => None,
        };
        let current = cached.unwrap_or_else(|| {
            let c = inspect(&self.config, now);
            self.cache = Some((key, c.clone()));
            c
        });
        // Validity moves with time even when the files do not.
        match current {
            Current::Valid { times, .. } if now >= times.not_after => {
                Current::Unusable(format!("expired at {}", rfc3339(times.not_after)))
            }
            Current::Valid { times, .. } if now < times.not_before => {
                Current::Unusable(format!("not valid before {}", rfc3339(times.not_before)))
            }
            c => c,
        }
    }

    /// The renewal decision for what is on disk now. Blocks briefly.
    pub(crate) fn decide(&mut self) -> (Current, Decision) {
        let now = self.clock.now();
        let current = self.current();
        let d = match &current {
            Current::Valid { times, leaf } => schedule::next_renewal(
                times,
                now,
                &self.config.policy,
                jitter_sample(&leaf.sha256),
                self.config.schedule.as_ref(),
            ),
            Current::Unusable(_) => Decision::RenewNow,
        };
        (current, d)
    }

    /// Remembers what was just validated and written into `version`: no need to re-read it.
    /// Blocks briefly (a stat of the anchors file).
    pub(crate) fn installed(&mut self, version: PathBuf, times: CertTimes, leaf: CertInfo) {
        self.cache = Some((
            (version, anchors_stamp(&self.config)),
            Current::Valid {
                times,
                leaf: Box::new(leaf),
            },
        ));
    }
}

fn anchors_stamp(config: &Config) -> Option<FileStamp> {
    match &config.trust_anchors {
        crate::config::AnchorSource::File(p) => FileStamp::of(p),
        crate::config::AnchorSource::Pem(_) => None,
    }
}

fn cache_key(config: &Config) -> CacheKey {
    (
        proxy_lib::certdir::resolve_data_dir(&config.dir),
        anchors_stamp(config),
    )
}

/// Reads and checks the cert on disk against the config at `now`. Blocks.
pub fn inspect(config: &Config, now: SystemTime) -> Current {
    let (bundle, _) = match CertBundle::load_dir(&config.dir) {
        Ok(b) => b,
        Err(e) => return Current::Unusable(format!("cannot load the cert set: {e}")),
    };
    if let Err(e) = bundle.check(now) {
        return Current::Unusable(e.to_string());
    }
    let leaf = bundle.leaf.clone();
    let id = &config.identity;
    let dns_ok = matches!(leaf.dns_sans.as_slice(), [san] if matches_san(san, id.as_str()));
    if !dns_ok || leaf.uri_sans != [id.spiffe_id()] {
        return Current::Unusable(format!(
            "the cert is for {:?} / {:?}, not {}",
            leaf.dns_sans, leaf.uri_sans, id
        ));
    }
    // The trusted anchors may have rotated (the configured ones, until a signed bundle is
    // installed): the cert must chain to them too.
    match crate::trust::current(&config.dir, &config.trust_anchors) {
        Ok(trust) => {
            if let Err(e) =
                trust
                    .anchors
                    .verify_leaf(&bundle.chain[0], &bundle.chain[1..], now, Usage::Server)
            {
                return Current::Unusable(format!(
                    "the cert does not chain to the trusted anchors: {e}"
                ));
            }
        }
        Err(e) => return Current::Unusable(format!("the trusted anchors are unusable: {e}")),
    }
    let state = State::load(&config.dir);
    let times = match state.received_for(&leaf.serial) {
        Some(secs) => CertTimes::received(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            leaf.not_before,
            leaf.not_after,
        ),
        None => CertTimes::found_on_disk(leaf.not_before, leaf.not_after, config.policy.clock_skew),
    };
    Current::Valid {
        times,
        leaf: Box::new(leaf),
    }
}
