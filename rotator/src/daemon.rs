//! The daemon loop: sleep until the next renewal, a forced renewal (SIGHUP), a shutdown
//! (SIGTERM, never mid-swap) or at most five minutes, then decide again from the wall clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proxy_lib::clock::{rfc3339, unix_secs};
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};

use crate::client::Issue;
use crate::notify::{Notice, Notify};
use crate::reload::Reload;
use crate::renew::{Current, Rotator};
use crate::schedule::{self, Decision};
use crate::state::State;

/// How the loop is driven from outside: forced renewals and shutdown.
#[derive(Debug)]
pub struct Controls {
    /// One message per forced renewal (SIGHUP).
    pub force: mpsc::UnboundedReceiver<()>,
    /// Becomes true on shutdown (SIGTERM/SIGINT).
    pub shutdown: watch::Receiver<bool>,
}

/// The sending side of [`Controls`].
#[derive(Debug, Clone)]
pub struct Handle {
    force: mpsc::UnboundedSender<()>,
    shutdown: watch::Sender<bool>,
}

impl Handle {
    /// Asks for a renewal now.
    pub fn force(&self) {
        let _ = self.force.send(());
    }

    /// Asks the loop to stop (after any swap in progress).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// A connected handle and controls.
pub fn controls() -> (Handle, Controls) {
    let (ftx, frx) = mpsc::unbounded_channel();
    let (stx, srx) = watch::channel(false);
    (
        Handle {
            force: ftx,
            shutdown: stx,
        },
        Controls {
            force: frx,
            shutdown: srx,
        },
    )
}

/// Options of the loop.
#[derive(Debug, Clone, Default)]
pub struct LoopOptions {
    /// Ping the watchdog this often.
    pub watchdog: Option<Duration>,
    /// Seed for the backoff jitter (random when `None`).
    pub seed: Option<u64>,
}

/// Runs the daemon until shutdown.
pub async fn run<I: Issue, R: Reload>(
    mut rotator: Rotator<I, R>,
    notifier: Arc<dyn Notify>,
    mut ctl: Controls,
    opts: LoopOptions,
) {
    let mut rng = match opts.seed {
        Some(s) => rand::rngs::StdRng::seed_from_u64(s),
        None => rand::rngs::StdRng::from_os_rng(),
    };
    let mut ready = false;
    let mut attempt: u32 = 0;
    let mut retry: Option<SystemTime> = None;
    // The serial on disk when the failing renewal began: a failed forced renewal of a
    // still-good cert is retried until it succeeds or another cert is installed meanwhile.
    let mut retry_serial: Option<String> = None;
    let mut force = false;
    let mut last_status = String::new();
    // Whether the listener is known to serve the cert on disk (always, without [verify]).
    let mut verified = rotator.config().verify.is_none();
    let mut verify_attempt: u32 = 0;
    let mut verify_retry: Option<SystemTime> = None;
    // A restarted daemon reports the last success it recorded, not 0 (an "age of the last
    // success" alert would fire at every restart).
    if let Some(t) = State::load(&rotator.config().dir).last_success {
        rotator.metrics().last_success.set(t as i64);
    }

    loop {
        if *ctl.shutdown.borrow() {
            break;
        }
        let now = rotator.clock().now();
        let (current, decision) = rotator.decide();
        if let Some(t) = current.times() {
            rotator
                .metrics()
                .cert_expiration
                .set(unix_secs(t.not_after) as i64);
        }
        let due = force
            || match retry {
                Some(r) => r <= now,
                None => decision == Decision::RenewNow,
            };
        if retry.is_some()
            && !due
            && decision != Decision::RenewNow
            && serial_of(&current) != retry_serial
        {
            // Someone else (a one-shot rotate) installed a good cert meanwhile.
            retry = None;
            attempt = 0;
        }
        if due {
            let forced = std::mem::take(&mut force);
            let serial_before = serial_of(&current);
            match rotator.renew_due(forced).await {
                Ok(_) => {
                    retry = None;
                    attempt = 0;
                    verified = true;
                    verify_retry = None;
                    verify_attempt = 0;
                }
                Err(e) if e.installed() => {
                    // The new cert is on disk; the next cycle comes on its normal schedule,
                    // and the reload/verify is retried with backoff until it succeeds.
                    retry = None;
                    attempt = 0;
                    if rotator.config().verify.is_some() {
                        verified = false;
                        let at = verify_retry_at(&rotator, &mut verify_attempt, &mut rng);
                        verify_retry = Some(at);
                        tracing::warn!(error = %e, verify_retry_at = %rfc3339(at), "renewal failed");
                    } else {
                        tracing::warn!(error = %e, "renewal failed");
                    }
                }
                Err(e) => {
                    let times = rotator.current().times().copied();
                    let at = schedule::retry_at(
                        rotator.clock().now(),
                        attempt,
                        times.as_ref(),
                        &rotator.config().policy,
                        rng.random::<f64>(),
                    );
                    attempt = attempt.saturating_add(1);
                    // One line per failed attempt: what failed, how often, and when next.
                    tracing::warn!(error = %e, failures = attempt, retry_at = %rfc3339(at), "renewal failed");
                    retry = Some(at);
                    retry_serial = serial_before;
                }
            }
            continue;
        }
        if !verified
            && matches!(current, Current::Valid { .. })
            && verify_retry.is_none_or(|t| t <= now)
        {
            match rotator.verify_current().await {
                Ok(()) => {
                    verified = true;
                    verify_retry = None;
                    verify_attempt = 0;
                }
                Err(e) => {
                    let at = verify_retry_at(&rotator, &mut verify_attempt, &mut rng);
                    tracing::warn!(error = %e, retry_at = %rfc3339(at), "the listener does not serve the cert on disk");
                    verify_retry = Some(at);
                }
            }
            continue;
        }
        // /ready follows the cert (an expired one while the issuer is down is not ready);
        // READY=1 goes to systemd once, after the first valid (and verified) cert.
        let good = matches!(current, Current::Valid { .. }) && verified;
        rotator.metrics().set_ready(good);
        if good && !ready {
            ready = true;
            notifier.notify(Notice::Ready);
        }
        let mut deadline = match (retry, decision) {
            (Some(r), _) => r,
            (None, Decision::At(t)) => t,
            (None, Decision::RenewNow) => now,
        };
        if !verified && let Some(v) = verify_retry {
            deadline = deadline.min(v);
        }
        let status = if !verified {
            format!(
                "the listener does not serve the new cert yet; checking again at {}",
                rfc3339(deadline)
            )
        } else if retry.is_some() {
            format!(
                "renewal failing (attempt {attempt}); next try at {}",
                rfc3339(deadline)
            )
        } else {
            format!("next renewal at {}", rfc3339(deadline))
        };
        if status != last_status {
            notifier.notify(Notice::Status(status.clone()));
            let mut st = State::load(&rotator.config().dir);
            if st.next_renewal != Some(unix_secs(deadline)) {
                st.next_renewal = Some(unix_secs(deadline));
                let _ = st.save(&rotator.config().dir);
            }
            if verified && retry.is_none() {
                tracing::info!("{status}");
            } else {
                // The failure was logged already, with its retry time.
                tracing::debug!("{status}");
            }
            last_status = status;
        }
        let mut nap = schedule::sleep_for(now, deadline);
        if let Some(w) = opts.watchdog {
            nap = nap.min(w);
        }
        tokio::select! {
            biased;
            changed = ctl.shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(()) = ctl.force.recv() => {
                tracing::info!("renewal forced");
                force = true;
            }
            _ = tokio::time::sleep(nap) => {}
        }
        if opts.watchdog.is_some() {
            notifier.notify(Notice::Watchdog);
        }
    }
    notifier.notify(Notice::Stopping);
    tracing::info!("shutting down");
}

/// The serial of the cert on disk, when it is usable.
fn serial_of(current: &Current) -> Option<String> {
    match current {
        Current::Valid { leaf, .. } => Some(leaf.serial.clone()),
        Current::Unusable(_) => None,
    }
}

/// When to retry the reload + verify of a cert already installed (backoff with full jitter,
/// not bounded by the cert: it stays installed); counts the attempt.
fn verify_retry_at<I: Issue, R: Reload>(
    rotator: &Rotator<I, R>,
    attempt: &mut u32,
    rng: &mut rand::rngs::StdRng,
) -> SystemTime {
    let at = schedule::retry_at(
        rotator.clock().now(),
        *attempt,
        None,
        &rotator.config().policy,
        rng.random::<f64>(),
    );
    *attempt = attempt.saturating_add(1);
    at
}
