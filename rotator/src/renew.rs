//! One renewal cycle, shared by `run` and `rotate`: look at the cert on disk, decide, and
//! when due fetch a new cert, validate it, swap it in, reload and verify.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use proxy_lib::bundle::CertBundle;
use proxy_lib::cert::CertInfo;
use proxy_lib::clock::{SharedClock, rfc3339, unix_secs};
use proxy_lib::fs::FileStamp;
use proxy_lib::identity::matches_san;
use proxy_lib::verify::Usage;

use crate::client::{CertifyRequest, Issue, IssueError, read_token};
use crate::config::Config;
use crate::keygen::{self, KeygenError};
use crate::metrics::Metrics;
use crate::reload::{Reload, ReloadError};
use crate::schedule::{self, CertTimes, Decision};
use crate::state::State;
use crate::store::{FsOps, NewSet, RealFs, Store, StoreError};
use crate::validate::{self, ValidateError};
use crate::verify::VerifyError;

/// Why a renewal cycle failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CycleError {
    /// The configured trust anchors are unusable.
    #[error("trust anchors: {0}")]
    Anchors(String),
    /// The request could not be made or the issuer refused it.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// No key could be generated.
    #[error(transparent)]
    Keygen(#[from] KeygenError),
    /// The issuer's answer was refused; nothing was written.
    #[error("refused the issuer's answer: {0}")]
    Invalid(#[from] ValidateError),
    /// The swap failed.
    #[error("installing the new cert failed: {0}")]
    Store(#[from] StoreError),
    /// The new cert is installed but a reload hook failed.
    #[error("new cert (serial {serial}) installed, but reload failed: {}", join(.errors))]
    Reload {
        /// The new serial.
        serial: String,
        /// Each failure.
        errors: Vec<ReloadError>,
    },
    /// The new cert is installed but the listener does not serve it.
    #[error(
        "new cert (serial {serial}) installed, but verify failed after {}: {error}{}",
        proxy_lib::human::count(*.attempts, "attempt"),
        hooks_note(.hooks)
    )]
    Verify {
        /// The new serial.
        serial: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        error: VerifyError,
        /// The reload hooks that failed in the last attempt.
        hooks: Vec<ReloadError>,
    },
    /// The installed cert set could not be read back (to reload and verify it).
    #[error("cannot read the installed cert set: {0}")]
    Installed(String),
}

fn hooks_note(errors: &[ReloadError]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!("; reload failed: {}", join(errors))
    }
}

fn join(errors: &[ReloadError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl CycleError {
    /// Whether the new cert was installed (only the reload/verify afterwards failed), so a
    /// retry must not fetch yet another cert.
    pub fn installed(&self) -> bool {
        self.installed_serial().is_some()
    }

    /// The serial of the cert that was installed, when only the reload/verify afterwards
    /// failed.
    pub fn installed_serial(&self) -> Option<&str> {
        match self {
            CycleError::Reload { serial, .. } | CycleError::Verify { serial, .. } => Some(serial),
            _ => None,
        }
    }
}

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

/// What a cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new cert was installed (and reloaded, and verified when configured).
    Rotated {
        /// New serial.
        serial: String,
        /// New SHA-256.
        sha256: String,
        /// New notAfter.
        not_after: SystemTime,
        /// The next renewal of the new cert.
        next: SystemTime,
    },
    /// The cert on disk was installed by an earlier attempt whose reload hooks or verify
    /// failed; they were run again and passed.
    Reloaded {
        /// Its serial.
        serial: String,
        /// Its next renewal.
        next: SystemTime,
    },
    /// Nothing was due.
    NotDue {
        /// When it will be.
        until: SystemTime,
    },
}

/// A stable jitter sample in [-1, 1] for a cert, from its fingerprint: the same cert always
/// gets the same renewal point (across restarts and between `run` and `rotate`), different
/// certs spread out.
pub fn jitter_sample(sha256_hex: &str) -> f64 {
    let n = u64::from_str_radix(sha256_hex.get(..16).unwrap_or("0"), 16).unwrap_or(0);
    (n as f64 / u64::MAX as f64) * 2.0 - 1.0
}

/// The rotator: config, clock, issuer, hooks, store and metrics.
pub struct Rotator<I, R> {
    config: Config,
    clock: SharedClock,
    issuer: I,
    reload: R,
    store: Store,
    fs: Arc<dyn FsOps + Send + Sync>,
    metrics: Metrics,
    cache: Option<(CacheKey, Current)>,
}

impl<I: Issue, R: Reload> Rotator<I, R> {
    /// A rotator writing through the real filesystem.
    pub fn new(config: Config, clock: SharedClock, issuer: I, reload: R, metrics: Metrics) -> Self {
        let store = Store::new(config.dir.clone(), config.key_group);
        Self {
            config,
            clock,
            issuer,
            reload,
            store,
            fs: Arc::new(RealFs),
            metrics,
            cache: None,
        }
    }

    /// Replaces the filesystem layer (tests crash it on purpose).
    pub fn with_fs(mut self, fs: Arc<dyn FsOps + Send + Sync>) -> Self {
        self.fs = fs;
        self
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Looks at the cert on disk (cached; re-read only when `..data` or the anchors file
    /// changes). Blocks briefly.
    pub fn current(&mut self) -> Current {
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

    /// The renewal decision for what is on disk now.
    pub fn decide(&mut self) -> (Current, Decision) {
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

    /// One cycle: when due (or `force`), renew, install, reload and verify. When not due but
    /// the last attempt installed the cert on disk and then failed to reload or verify it, runs
    /// the hooks and the verify again instead. Records the result in the metrics and the state
    /// file.
    pub async fn cycle(&mut self, force: bool) -> Result<Outcome, CycleError> {
        let (current, decision) = self.decide();
        if !force && let Decision::At(until) = decision {
            if let Current::Valid { leaf, .. } = &current
                && State::load(&self.config.dir).unfinished.as_deref() == Some(&leaf.serial)
            {
                let serial = leaf.serial.clone();
                tracing::debug!(%serial, "running the reload and verify that failed last time again");
                let result = match self.installed_bundle() {
                    Ok(bundle) => self.reload_and_verify(&bundle).await,
                    Err(e) => Err(e),
                };
                self.record_finish(&result);
                return result.map(|()| Outcome::Reloaded {
                    serial,
                    next: until,
                });
            }
            return Ok(Outcome::NotDue { until });
        }
        self.renew_now(current, force).await
    }

    /// Renews now, whatever the schedule says (the daemon calls this once it has decided a
    /// renewal is due); `forced` records whether it was asked for (SIGHUP, `--force`) rather
    /// than scheduled. Records the result in the metrics and the state file.
    pub async fn renew_due(&mut self, forced: bool) -> Result<Outcome, CycleError> {
        let current = self.current();
        self.renew_now(current, forced).await
    }

    async fn renew_now(&mut self, current: Current, force: bool) -> Result<Outcome, CycleError> {
        if let Current::Unusable(why) = &current {
            // Said once per run of failures, not before every retry.
            if State::load(&self.config.dir).failures == 0 {
                tracing::info!(reason = %why, "no usable cert on disk; renewing now");
            }
        }
        let span = tracing::info_span!("renewal", identity = %self.config.identity, forced = force);
        let result = tracing::Instrument::instrument(self.renew(), span).await;
        self.record_renewal(&result);
        result
    }

    /// Records a renewal attempt in the metrics and the state file. A failure is not logged
    /// here: the caller logs it once, with what it does next.
    fn record_renewal(&self, result: &Result<Outcome, CycleError>) {
        let now = self.clock.now();
        self.metrics.rotation(result.is_ok());
        self.update_state(|state| match result {
            Ok(out) => {
                self.succeeded(state, now);
                if let Outcome::Rotated { serial, next, .. } = out {
                    tracing::info!(%serial, next_renewal = %rfc3339(*next), "rotated");
                    state.next_renewal = Some(unix_secs(*next));
                }
            }
            Err(e) => failed(state, now, e),
        });
    }

    /// Records running the reload and verify again for a cert already installed: a success
    /// completes the rotation that installed it (when one was left unfinished).
    fn record_finish(&self, result: &Result<(), CycleError>) {
        let now = self.clock.now();
        self.update_state(|state| match result {
            Ok(()) if state.unfinished.is_some() => self.succeeded(state, now),
            Ok(()) => {}
            Err(e) => failed(state, now, e),
        });
    }

    fn succeeded(&self, state: &mut State, now: SystemTime) {
        self.metrics.last_success.set(unix_secs(now) as i64);
        state.last_success = Some(unix_secs(now));
        state.last_error = None;
        state.last_error_at = None;
        state.failures = 0;
        state.unfinished = None;
    }

    /// Applies `f` to the state file, writing it when that changed something.
    fn update_state(&self, f: impl FnOnce(&mut State)) {
        let before = State::load(&self.config.dir);
        let mut state = before.clone();
        f(&mut state);
        if state == before {
            return;
        }
        if let Err(e) = state.save(&self.config.dir) {
            tracing::warn!(error = %e, "cannot write the state file");
        }
    }

    async fn renew(&mut self) -> Result<Outcome, CycleError> {
        let cfg = &self.config;
        let anchors = cfg
            .trust_anchors
            .load()
            .map_err(|e| CycleError::Anchors(e.to_string()))?;
        let token = read_token(&cfg.token_file)?;
        let fresh = keygen::generate(&cfg.identity, false)?;
        let resp = self
            .issuer
            .certify(CertifyRequest {
                identity: cfg.identity.to_string(),
                token,
                csr_der: fresh.csr_der.clone(),
            })
            .await?;
        let received = self.clock.now();
        let valid = validate::validate(
            &resp.leaf,
            &resp.intermediates,
            &cfg.identity,
            &fresh.spki_der,
            &anchors,
            received,
            cfg.policy.clock_skew,
        )?;
        let serial = valid.leaf.serial.clone();
        let version = {
            let _lock = self.store.lock()?;
            self.store.swap(
                self.fs.as_ref(),
                &NewSet {
                    chain: &valid.chain,
                    key: &fresh.key,
                    anchors: anchors.certs(),
                },
                received,
            )?
        };
        let times = CertTimes::received(received, valid.leaf.not_before, valid.leaf.not_after);
        // What was just validated and written is what is on disk: no need to re-read it.
        self.cache = Some((
            (version, anchors_stamp(&self.config)),
            Current::Valid {
                times,
                leaf: Box::new(valid.leaf.clone()),
            },
        ));
        self.update_state(|state| {
            state.serial = Some(serial.clone());
            state.received = Some(unix_secs(received));
        });
        self.metrics
            .cert_expiration
            .set(unix_secs(valid.leaf.not_after) as i64);
        let next = match schedule::next_renewal(
            &times,
            received,
            &cfg.policy,
            jitter_sample(&valid.leaf.sha256),
            cfg.schedule.as_ref(),
        ) {
            Decision::At(t) => t,
            Decision::RenewNow => received,
        };
        let bundle = CertBundle::from_parts(valid.chain.clone(), fresh.key.clone(), anchors)
            .map_err(|e| CycleError::Anchors(e.to_string()))?;
        self.reload_and_verify(&bundle).await?;
        Ok(Outcome::Rotated {
            serial,
            sha256: valid.leaf.sha256,
            not_after: valid.leaf.not_after,
            next,
        })
    }

    /// Runs the reload hooks, then (with `[verify]`) checks the listener serves `bundle`,
    /// running the hooks again between attempts.
    pub async fn reload_and_verify(&self, bundle: &CertBundle) -> Result<(), CycleError> {
        let serial = bundle.leaf.serial.clone();
        let attempts = self.config.verify.as_ref().map_or(1, |v| v.attempts.max(1));
        let mut last = None;
        let mut errors = Vec::new();
        for attempt in 1..=attempts {
            let outcomes = self.reload.reload().await;
            errors.clear();
            for o in outcomes {
                self.metrics.reload(o.result.is_ok());
                if let Err(e) = o.result {
                    errors.push(e);
                }
            }
            let Some(v) = &self.config.verify else {
                if errors.is_empty() {
                    return Ok(());
                }
                return Err(CycleError::Reload { serial, errors });
            };
            tokio::time::sleep(v.delay).await;
            let name = v
                .server_name
                .clone()
                .unwrap_or_else(|| self.config.identity.to_string());
            match crate::verify::served_leaf_matches(&v.addr, &name, bundle, self.config.timeout)
                .await
            {
                Ok(_) => {
                    self.metrics.reload(true);
                    tracing::info!(%serial, attempt, "listener serves the new cert");
                    return Ok(());
                }
                Err(e) => {
                    self.metrics.reload(false);
                    // The error that ends the attempt carries the last of these.
                    tracing::debug!(%serial, attempt, error = %e, "listener does not serve the new cert yet");
                    last = Some(e);
                }
            }
        }
        Err(CycleError::Verify {
            serial,
            attempts,
            error: last.expect("at least one attempt"),
            hooks: errors,
        })
    }

    /// The cert set on disk, read back to reload and verify it. Blocks briefly.
    fn installed_bundle(&self) -> Result<CertBundle, CycleError> {
        CertBundle::load_dir(&self.config.dir)
            .map(|(b, _)| b)
            .map_err(|e| CycleError::Installed(e.to_string()))
    }

    /// Checks that the listener serves the cert on disk (start-up of the daemon with
    /// `[verify]`), reloading when it does not. Records the result in the state file.
    pub async fn verify_current(&self) -> Result<(), CycleError> {
        let result = self.check_or_reload_current().await;
        self.record_finish(&result);
        result
    }

    async fn check_or_reload_current(&self) -> Result<(), CycleError> {
        if self.config.verify.is_none() {
            return Ok(());
        }
        let bundle = self.installed_bundle()?;
        if let Some(v) = &self.config.verify {
            let name = v
                .server_name
                .clone()
                .unwrap_or_else(|| self.config.identity.to_string());
            if crate::verify::served_leaf_matches(&v.addr, &name, &bundle, self.config.timeout)
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        self.reload_and_verify(&bundle).await
    }
}

/// Notes a failed attempt in the state; a cert installed before the failure stays to be
/// reloaded and verified.
fn failed(state: &mut State, now: SystemTime, error: &CycleError) {
    state.last_error = Some(error.to_string());
    state.last_error_at = Some(unix_secs(now));
    state.failures = state.failures.saturating_add(1);
    if let Some(serial) = error.installed_serial() {
        state.unfinished = Some(serial.to_string());
    }
}

/// What the cached inspection depends on: the resolved version dir and the anchors file's
/// stamp.
type CacheKey = (PathBuf, Option<FileStamp>);

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
    // The configured anchors may have rotated: the cert must chain to them too.
    match config.trust_anchors.load() {
        Ok(anchors) => {
            if let Err(e) =
                anchors.verify_leaf(&bundle.chain[0], &bundle.chain[1..], now, Usage::Server)
            {
                return Current::Unusable(format!(
                    "the cert does not chain to the configured anchors: {e}"
                ));
            }
        }
        Err(e) => return Current::Unusable(format!("the configured anchors are unusable: {e}")),
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

#[cfg(test)]
mod tests;
