//! One renewal cycle, shared by `run` and `rotate`: look at the cert on disk, decide, and
//! when due fetch a new cert, validate it, swap it in, reload and verify.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use proxy_lib::bundle::CertBundle;
use proxy_lib::clock::{SharedClock, rfc3339, unix_secs};

use crate::client::{CertifyRequest, Issue, IssueError, read_token};
use crate::config::Config;
use crate::keygen::{self, KeygenError};
use crate::metrics::Metrics;
use crate::reload::{Reload, ReloadError};
use crate::schedule::{self, CertTimes, Decision};
use crate::state::{Change, Ledger, State};
use crate::store::{FsOps, NewSet, RealFs, Store, StoreError};
use crate::timing::{LastRotation, ReloadTiming, RotationTiming, Stopwatch, micros};
use crate::trust::{Offer, Trust};
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
    /// The cert dir cannot be written (read-only or full filesystem, permissions): found
    /// before anything was asked of the issuer.
    #[error("the cert dir is not writable, so no cert was asked for: {0}")]
    NotWritable(StoreError),
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

/// The rotator: config, clock, issuer, hooks, store and metrics.
pub struct Rotator<I, R> {
    config: Arc<Config>,
    clock: SharedClock,
    issuer: I,
    reload: R,
    store: Store,
    fs: Arc<dyn FsOps + Send + Sync>,
    metrics: Metrics,
    view: Arc<Mutex<disk::View>>,
    ledger: Arc<Mutex<Ledger>>,
    /// The key of a bootstrap not yet certified, re-sent by the next attempt.
    bootstrap_key: Mutex<Option<keygen::KeyAndCsr>>,
    /// The stages of the last successful rotation (`/status` shows them).
    last_rotation: LastRotation,
}

impl<I: Issue, R: Reload> Rotator<I, R> {
    /// A rotator writing through the real filesystem.
    pub fn new(config: Config, clock: SharedClock, issuer: I, reload: R, metrics: Metrics) -> Self {
        let store = Store::new(config.dir.clone(), config.key_group);
        let config = Arc::new(config);
        let view = disk::View::new(config.clone(), clock.clone());
        Self {
            config,
            clock,
            issuer,
            reload,
            store,
            fs: Arc::new(RealFs),
            metrics,
            view: Arc::new(Mutex::new(view)),
            ledger: Arc::default(),
            bootstrap_key: Mutex::new(None),
            last_rotation: LastRotation::default(),
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

    /// What `status` reports from this rotator's own record of its state (the daemon's
    /// `/status`): it stays right when the state file cannot be written.
    pub fn status_source(&self) -> crate::status::Source {
        crate::status::Source::new(self.config.clone(), self.clock.clone(), self.ledger.clone())
            .with_last_rotation(self.last_rotation.clone())
    }

    /// The stages of the last successful rotation, if there was one in this process.
    pub fn last_rotation(&self) -> Option<RotationTiming> {
        self.last_rotation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn view(&self) -> MutexGuard<'_, disk::View> {
        // A panic while inspecting leaves nothing half-done in the cache worth refusing.
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks at the cert on disk (cached; re-read only when `..data` or the anchors file
    /// changes). Blocks briefly.
    pub fn current(&mut self) -> Current {
        self.view().current()
    }

    /// The renewal decision for what is on disk now. Blocks briefly.
    pub fn decide(&mut self) -> (Current, Decision) {
        self.view().decide()
    }

    /// [`Rotator::decide`] off the runtime thread (the daemon's `/metrics` and `/ready` keep
    /// answering while the cert dir is read).
    pub async fn observe(&self) -> (Current, Decision) {
        let view = self.view.clone();
        blocking(move || view.lock().unwrap_or_else(|p| p.into_inner()).decide()).await
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
    /// than scheduled. Records the result in the metrics; the state file is left to the
    /// caller, which writes it once for the whole transition (the new cert's serial and
    /// receipt are recorded with the swap). The blocking steps run off the runtime thread.
    pub async fn renew_due(&self, forced: bool) -> Result<Outcome, CycleError> {
        let result = self.renew_traced(forced).await;
        self.metrics.rotation(result.is_ok());
        log_rotated(&result);
        result
    }

    async fn renew_now(&mut self, current: Current, force: bool) -> Result<Outcome, CycleError> {
        if let Current::Unusable(why) = &current {
            // Said once per run of failures, not before every retry.
            if State::load(&self.config.dir).failures == 0 {
                tracing::info!(reason = %why, "no usable cert on disk; renewing now");
            }
        }
        let result = self.renew_traced(force).await;
        self.record_renewal(&result);
        result
    }

    async fn renew_traced(&self, force: bool) -> Result<Outcome, CycleError> {
        let span = tracing::info_span!("renewal", identity = %self.config.identity, forced = force);
        tracing::Instrument::instrument(self.renew(force), span).await
    }

    /// Records a renewal attempt in the metrics and the state file. A failure is not logged
    /// here: the caller logs it once, with what it does next.
    fn record_renewal(&self, result: &Result<Outcome, CycleError>) {
        let at = unix_secs(self.clock.now());
        self.metrics.rotation(result.is_ok());
        log_rotated(result);
        match result {
            Ok(Outcome::Rotated { next, .. }) => self.record(&[
                Change::Succeeded { at },
                Change::NextRenewal(unix_secs(*next)),
            ]),
            Ok(_) => self.record(&[Change::Succeeded { at }]),
            Err(e) => self.record(&[failure(at, e)]),
        }
    }

    /// Records running the reload and verify again for a cert already installed: a success
    /// completes the rotation that installed it (when one was left unfinished).
    fn record_finish(&self, result: &Result<(), CycleError>) {
        let at = unix_secs(self.clock.now());
        match result {
            Ok(()) => self.record(&[Change::Completed { at }]),
            Err(e) => self.record(&[failure(at, e)]),
        }
    }

    /// Applies `changes` to the state file under the store lock (and to the rotator's own
    /// record, whether or not the file could be written), and the last success to the metrics.
    /// Blocks (one-shot `rotate`; the daemon goes through [`Rotator::record_off_thread`]).
    fn record(&self, changes: &[Change]) {
        let recorder = self.recorder();
        recorder.record(None, changes);
    }

    /// [`Rotator::record`] for one transition's `changes`, off the runtime thread.
    pub async fn record_off_thread(&self, changes: Vec<Change>) {
        let recorder = self.recorder();
        blocking(move || recorder.record(None, &changes)).await;
    }

    fn recorder(&self) -> Recorder {
        Recorder {
            dir: self.config.dir.clone(),
            fs: self.fs.clone(),
            metrics: self.metrics.clone(),
            ledger: self.ledger.clone(),
        }
    }

    /// What the host trusts now ([`crate::trust::current`]), read off the runtime thread.
    async fn trust(&self) -> Result<Trust, CycleError> {
        let (dir, bootstrap) = (self.config.dir.clone(), self.config.trust_anchors.clone());
        blocking(move || crate::trust::current(&dir, &bootstrap))
            .await
            .map_err(CycleError::Anchors)
    }

    /// Fetches the issuer's trust bundle. `Ok(None)`: the issuer serves none.
    async fn fetch_offer(&self) -> Result<Option<Result<Offer, String>>, IssueError> {
        Ok(self
            .issuer
            .trust_bundle()
            .await?
            .map(|b| Offer::from_api(b).map_err(|e| format!("malformed trust bundle: {e}"))))
    }

    /// Decides on an offered bundle for `chain` (leaf first) installed at `at` with the set
    /// `trust`: the set to install (the offered one when it is acceptable, else `trust`), and
    /// the state change that records the verdict. Counts and logs a refusal.
    fn take_offer(
        &self,
        trust: &Trust,
        offer: Option<Result<Offer, String>>,
        chain: &[rustls_pki_types::CertificateDer<'static>],
        at: SystemTime,
    ) -> (Option<Trust>, Change) {
        let verdict = match offer {
            None => Ok(None),
            Some(Err(e)) => Err(e),
            Some(Ok(offer)) => crate::trust::decide(trust, &offer, chain, at),
        };
        match verdict {
            Ok(new) => {
                if let Some(t) = &new {
                    tracing::info!(
                        fingerprint = %proxy_lib::trust_bundle::short(&t.fingerprint()),
                        sequence = t.sequence().unwrap_or_default(),
                        anchors = t.anchors.certs().len(),
                        "installing a new signed trust bundle"
                    );
                }
                (new, Change::Bundle { error: None })
            }
            Err(reason) => {
                self.metrics.bundle_refusals.inc();
                tracing::warn!(%reason, "refused the issuer's trust bundle; keeping the anchors in place");
                (
                    None,
                    Change::Bundle {
                        error: Some(format!("trust bundle refused: {reason}")),
                    },
                )
            }
        }
    }

    /// Fetches the issuer's trust bundle between renewals and, when it changed and is
    /// acceptable (signed by a trusted anchor, a higher sequence, and it validates the chain
    /// on disk), installs it with the cert and key on disk in one atomic swap, then runs the
    /// reload hooks (and the verify). A refused bundle keeps the set in place and is recorded
    /// (`status` warns); only a failed fetch or a failed swap or reload is an error. The
    /// blocking steps run off the runtime thread.
    pub async fn poll_bundle(&self) -> Result<(), CycleError> {
        let offer = self.fetch_offer().await?;
        if offer.is_none() {
            return Ok(());
        }
        let trust = self.trust().await?;
        let dir = self.config.dir.clone();
        let Ok(current) = blocking(move || installed_bundle(&dir)).await else {
            // No usable set on disk: the renewal that follows fetches the bundle again.
            return Ok(());
        };
        let now = self.clock.now();
        let (new, change) = self.take_offer(&trust, offer, &current.chain, now);
        let Some(new) = new else {
            let recorder = self.recorder();
            blocking(move || recorder.record(None, &[change])).await;
            return Ok(());
        };
        let (store, fs) = (self.store.clone(), self.fs.clone());
        let recorder = self.recorder();
        let (chain, key) = (current.chain.clone(), current.key.clone());
        let (anchors, sig) = (new.anchors.certs().to_vec(), new.signature_text());
        blocking(move || {
            let set = NewSet {
                chain: &chain,
                key: &key,
                anchors: &anchors,
                anchors_sig: sig.as_deref(),
            };
            swap_and_record(&store, fs.as_ref(), &recorder, &set, now, &[change])
        })
        .await?;
        self.metrics.set_trust(&new);
        let bundle = CertBundle::from_parts(current.chain, current.key, new.anchors)
            .map_err(|e| CycleError::Installed(e.to_string()))?;
        self.reload_and_verify(&bundle).await
    }

    /// Shows the anchors the host trusts now in `/metrics`. Blocks briefly (off the runtime
    /// thread).
    pub async fn show_trust(&self) {
        match self.trust().await {
            Ok(t) => self.metrics.set_trust(&t),
            Err(e) => tracing::debug!(error = %e, "cannot read the trusted anchors"),
        }
    }

    async fn renew(&self, forced: bool) -> Result<Outcome, CycleError> {
        let mut watch = Stopwatch::start(forced);
        let cfg = &self.config;
        let trust = self.trust().await?;
        let anchors = trust.anchors.clone();
        // A read-only or full filesystem is found before a cert is asked for (and thrown away).
        let (store, fs) = (self.store.clone(), self.fs.clone());
        blocking(move || store.check_writable(fs.as_ref()))
            .await
            .map_err(CycleError::NotWritable)?;
        // The installed set, when it is valid now for our identity, is presented as the TLS
        // client certificate: the issuer renews by it (the token is then not needed).
        let now = self.clock.now();
        let identity = cfg.identity.clone();
        let dir = cfg.dir.clone();
        let presented = blocking(move || installed_bundle(&dir).ok())
            .await
            .filter(|b| {
                b.leaf.is_valid_at(now)
                    && b.leaf
                        .dns_sans
                        .iter()
                        .any(|d| d.eq_ignore_ascii_case(identity.as_str()))
            });
        let token = match read_token(&cfg.token_file) {
            Ok(t) => t,
            Err(e) if presented.is_none() => return Err(e.into()),
            Err(e) => {
                tracing::debug!(error = %e, "no token; renewing by the current certificate alone");
                zeroize::Zeroizing::new(Vec::new())
            }
        };
        // A bootstrap (no cert to present) keeps its key until it succeeds: a retry re-sends
        // the same key and CSR, which a single-use token bound to that key still accepts.
        watch.timing.prepare_us = watch.lap();
        let fresh = if presented.is_some() {
            keygen::generate(&cfg.identity, false)?
        } else {
            let mut pending = self.bootstrap_key.lock().unwrap_or_else(|p| p.into_inner());
            match &*pending {
                Some(k) => k.clone(),
                None => {
                    let k = keygen::generate(&cfg.identity, false)?;
                    *pending = Some(k.clone());
                    k
                }
            }
        };
        let bootstrap = presented.is_none();
        watch.timing.keygen_csr_us = watch.lap();
        let certify = self.issuer.certify_presenting(
            CertifyRequest {
                identity: cfg.identity.to_string(),
                token,
                csr_der: fresh.csr_der.clone(),
            },
            presented,
        );
        // The issuer's trust bundle, fetched with every renewal, beside the Certify call (two
        // round trips at once rather than one after the other); its answer is looked at only
        // once the new cert is validated.
        let (resp, offer) = tokio::join!(certify, self.fetch_offer());
        let resp = resp?;
        watch.timing.certify_us = watch.lap();
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
        watch.timing.validate_us = watch.lap();
        let serial = valid.leaf.serial.clone();
        if bootstrap {
            // Certified: the next bootstrap, if ever, starts with a new key.
            *self.bootstrap_key.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let times = CertTimes::received(received, valid.leaf.not_before, valid.leaf.not_after);
        // A failed fetch of the trust bundle keeps the set.
        let offer = offer.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot fetch the issuer's trust bundle; keeping the anchors in place");
            None
        });
        let at = received.max(valid.leaf.not_before);
        let (new_trust, bundle_change) = self.take_offer(&trust, offer, &valid.chain, at);
        let trust = new_trust.unwrap_or(trust);
        let anchors = trust.anchors.clone();
        watch.timing.bundle_us = watch.lap();
        let key = {
            // The swap (flock, writes, fsyncs) and the state file run off the runtime thread.
            let (store, fs, view) = (self.store.clone(), self.fs.clone(), self.view.clone());
            let recorder = self.recorder();
            let (chain, key, anchor_certs) =
                (valid.chain.clone(), fresh.key, anchors.certs().to_vec());
            let sig = trust.signature_text();
            let installed = Change::Installed {
                serial: serial.clone(),
                received: unix_secs(received),
            };
            let leaf = valid.leaf.clone();
            blocking(move || -> Result<_, StoreError> {
                let set = NewSet {
                    chain: &chain,
                    key: &key,
                    anchors: &anchor_certs,
                    anchors_sig: sig.as_deref(),
                };
                // The new cert, when it was received and the bundle's verdict go into the
                // state file together, under the same lock.
                let changes = [installed, bundle_change];
                let version =
                    swap_and_record(&store, fs.as_ref(), &recorder, &set, received, &changes)?;
                // What was just validated and written is what is on disk: no need to re-read it.
                view.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .installed(version, times, leaf);
                Ok(key)
            })
            .await?
        };
        watch.timing.swap_us = watch.lap();
        self.metrics
            .cert_expiration
            .set(unix_secs(valid.leaf.not_after) as i64);
        self.metrics.set_trust(&trust);
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
        let bundle = CertBundle::from_parts(valid.chain.clone(), key, anchors)
            .map_err(|e| CycleError::Anchors(e.to_string()))?;
        let reload = self.reload_and_verify_timed(&bundle).await?;
        watch.timing.hook_us = reload.hook_us;
        watch.timing.reload_wait_us = reload.reload_wait_us;
        watch.timing.verify_us = reload.verify_us;
        watch.timing.verify_attempts = reload.verify_attempts;
        crate::timing::record(&self.last_rotation, watch.finish(&serial));
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
        self.reload_and_verify_timed(bundle).await.map(drop)
    }

    /// [`Rotator::reload_and_verify`], saying where its time went.
    async fn reload_and_verify_timed(
        &self,
        bundle: &CertBundle,
    ) -> Result<ReloadTiming, CycleError> {
        let serial = bundle.leaf.serial.clone();
        let attempts = self.config.verify.as_ref().map_or(1, |v| v.attempts.max(1));
        let mut last = None;
        let mut errors = Vec::new();
        let mut timing = ReloadTiming::default();
        let start = std::time::Instant::now();
        let mut hooked = None;
        for attempt in 1..=attempts {
            let outcomes = self.reload.reload().await;
            let hooks_done = std::time::Instant::now();
            if hooked.is_none() {
                timing.hook_us = micros(hooks_done - start);
                hooked = Some(hooks_done);
            }
            errors.clear();
            for o in outcomes {
                self.metrics.reload(o.result.is_ok());
                if let Err(e) = o.result {
                    errors.push(e);
                }
            }
            let Some(v) = &self.config.verify else {
                if errors.is_empty() {
                    return Ok(timing);
                }
                return Err(CycleError::Reload { serial, errors });
            };
            tokio::time::sleep(v.delay).await;
            let name = v
                .server_name
                .clone()
                .unwrap_or_else(|| self.config.identity.to_string());
            let asked = std::time::Instant::now();
            match crate::verify::served_leaf_matches(&v.addr, &name, bundle, self.config.timeout)
                .await
            {
                Ok(_) => {
                    self.metrics.reload(true);
                    tracing::info!(%serial, attempt, "listener serves the new cert");
                    timing.reload_wait_us = micros(asked - hooked.unwrap_or(start));
                    timing.verify_us = micros(asked.elapsed());
                    timing.verify_attempts = attempt;
                    return Ok(timing);
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
        installed_bundle(&self.config.dir)
    }

    /// Finishes the rotation of the cert on disk: with `[verify]`, checks that the listener
    /// serves it (start-up of the daemon, and after a rotation whose reload or verify failed),
    /// reloading when it does not; without, runs the reload hooks again (after a rotation
    /// whose hooks failed). The cert set is read off the runtime thread; the state file is left
    /// to the caller.
    pub async fn verify_current(&self) -> Result<(), CycleError> {
        let dir = self.config.dir.clone();
        let bundle = blocking(move || installed_bundle(&dir)).await?;
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

/// The cert set in `dir`, read back to reload and verify it. Blocks briefly.
fn installed_bundle(dir: &std::path::Path) -> Result<CertBundle, CycleError> {
    CertBundle::load_dir(dir)
        .map(|(b, _)| b)
        .map_err(|e| CycleError::Installed(e.to_string()))
}

/// A failed attempt, for the state file; a cert installed before the failure stays to be
/// reloaded and verified.
fn failure(at: u64, error: &CycleError) -> Change {
    Change::Failed {
        at,
        error: error.to_string(),
        installed: error.installed_serial().map(str::to_string),
    }
}

fn log_rotated(result: &Result<Outcome, CycleError>) {
    if let Ok(Outcome::Rotated { serial, next, .. }) = result {
        tracing::info!(%serial, next_renewal = %rfc3339(*next), "rotated");
    }
}

/// Installs `set` (the version dir named for `now`) under the store lock and records
/// `changes` in the state file under the same lock. Returns the new version dir. Blocks.
fn swap_and_record(
    store: &Store,
    fs: &dyn FsOps,
    recorder: &Recorder,
    set: &NewSet<'_>,
    now: SystemTime,
    changes: &[Change],
) -> Result<std::path::PathBuf, StoreError> {
    let lock = store.lock()?;
    let version = store.swap(fs, set, now)?;
    recorder.record(Some(&lock), changes);
    Ok(version)
}

/// Everything a state change needs, to be moved onto the blocking pool.
struct Recorder {
    dir: std::path::PathBuf,
    fs: Arc<dyn FsOps + Send + Sync>,
    metrics: Metrics,
    ledger: Arc<Mutex<Ledger>>,
}

impl Recorder {
    /// Applies `changes` through the ledger (the state file under the store lock, the caller's
    /// `lock` or taken here) and sets the last-success metric from the result. A state file
    /// that cannot be written is logged and reported by `status`, not fatal. Blocks.
    fn record(&self, lock: Option<&proxy_lib::fs::LockGuard>, changes: &[Change]) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let state = ledger.record(&self.dir, self.fs.as_ref(), lock, changes);
        if let Some(t) = state.last_success {
            self.metrics.last_success.set(t as i64);
        }
    }
}

/// Runs blocking file work (reads, flock, fsync) on tokio's blocking pool, so the runtime
/// thread keeps serving `/metrics` and `/ready`. A panic in `f` is passed on as if `f` had
/// run here.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Cancelled: the runtime is shutting down and drops this task with it.
            Err(_) => std::future::pending().await,
        },
    }
}

mod disk;

pub use disk::{Current, inspect, jitter_sample};

#[cfg(test)]
mod tests;
