//! The daemon's decisions as a sans-IO state machine: [`Machine::on`] takes the time, a
//! jitter sample and one [`Event`], and returns the [`Action`]s to carry out;
//! [`Machine::next_deadline`] says when to wake it with [`Event::Deadline`]. It reads no
//! clock, no file and no random number generator, so every transition is a plain unit test.
//!
//! The rules it keeps:
//! - A renewal is due when the cert on disk is missing, unusable or past its renewal point, when
//!   one was forced (SIGHUP), or when the retry time of a failing renewal has come.
//! - A failed renewal is retried with exponential backoff and full jitter, never later than
//!   notAfter − margin of the cert still in place. When another process (a one-shot `rotate`)
//!   installs a good cert meanwhile, the retry is dropped and the normal schedule resumes.
//! - A cert installed whose reload or verify failed is not fetched again: its reload hooks
//!   (and with `[verify]` the check, reloading when the listener serves another cert) are
//!   retried with backoff until they pass, not bounded by the cert (it stays installed), with
//!   or without `[verify]`. A daemon started over a state file that says the last reload
//!   failed runs them again first.
//! - `/ready` follows the cert (valid, and verified with `[verify]`); READY=1 goes to systemd
//!   once, after the first such cert. STATUS= changes with the plan, and the state file's
//!   next renewal with it.
//! - Shutdown never interrupts a renewal or a verify in progress: it takes effect when the
//!   operation ends, after its result is recorded.
//! - The state file is written once per transition, with every change of that transition.
//! - With a bundle poll interval, the issuer's trust bundle is fetched between renewals, once
//!   per interval after the last renewal or poll (a renewal fetches it too). A poll never
//!   delays a due renewal; one that installed a new bundle whose reload hooks (or verify)
//!   failed is finished like such a renewal (hooks retried with backoff). The status text and
//!   the planned next renewal do not move with the polls.

use std::time::SystemTime;

use proxy_lib::clock::{rfc3339, unix_secs};

use crate::notify::Notice;
use crate::schedule::{self, CertTimes, Decision, Policy};
use crate::state::Change;

/// What the daemon saw in the cert dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The usable cert on disk (its serial and times), or why there is none.
    pub cert: Result<(String, CertTimes), String>,
    /// The renewal decision for it.
    pub decision: Decision,
}

impl Disk {
    fn serial(&self) -> Option<&str> {
        self.cert.as_ref().ok().map(|(s, _)| s.as_str())
    }

    fn times(&self) -> Option<&CertTimes> {
        self.cert.as_ref().ok().map(|(_, t)| t)
    }
}

/// A failed renewal or verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What failed (logged and recorded as the last error).
    pub error: String,
    /// The serial of a cert that was installed before the failure (only its reload or verify
    /// failed), if any.
    pub installed: Option<String>,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The daemon started.
    Start,
    /// The cert dir was looked at (after [`Action::Observe`]).
    Observed(Disk),
    /// [`Machine::next_deadline`] was reached, or the longest sleep ended.
    Deadline,
    /// A renewal was asked for (SIGHUP).
    Force,
    /// Shutdown was asked for (SIGTERM/SIGINT).
    Shutdown,
    /// The watchdog interval passed.
    Watchdog,
    /// A renewal (after [`Action::Renew`]) ended; `disk` is the cert dir right after it.
    Renewed {
        /// How it ended.
        result: Result<(), Failure>,
        /// The cert dir afterwards.
        disk: Disk,
    },
    /// A verify (after [`Action::Verify`]) ended; `disk` is the cert dir right after it.
    Verified {
        /// How it ended.
        result: Result<(), Failure>,
        /// The cert dir afterwards.
        disk: Disk,
    },
    /// A trust-bundle poll (after [`Action::PollBundle`]) ended: `Ok` when the bundle was
    /// fetched (and installed when it changed, or refused, which the rotator records
    /// itself); `disk` is the cert dir right after it.
    BundlePolled {
        /// How it ended.
        result: Result<(), Failure>,
        /// The cert dir afterwards.
        disk: Disk,
    },
}

/// Something to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Look at the cert dir and answer with [`Event::Observed`].
    Observe,
    /// Renew now and answer with [`Event::Renewed`].
    Renew {
        /// Asked for (SIGHUP) rather than scheduled.
        forced: bool,
    },
    /// Finish the rotation of the cert on disk: with `[verify]`, check (and reload until) the
    /// listener serves it; without, run the reload hooks again. Answer with
    /// [`Event::Verified`].
    Verify,
    /// Fetch the issuer's trust bundle and install it when it changed and is acceptable;
    /// answer with [`Event::BundlePolled`].
    PollBundle,
    /// Set `/ready`.
    SetReady(bool),
    /// Tell the service manager.
    Notify(Notice),
    /// Apply these changes to the state file, in one write under the store lock.
    Persist(Vec<Change>),
    /// Log a line.
    Log(Log),
    /// Stop the daemon.
    Stop,
}

/// A log line the daemon writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Log {
    /// A renewal was forced (info).
    Forced,
    /// Renewing because there is no usable cert on disk (info; once per run of failures).
    NoUsableCert {
        /// Why the cert on disk is unusable.
        reason: String,
    },
    /// A renewal failed before installing anything (warn).
    RenewalFailed {
        /// What failed.
        error: String,
        /// Consecutive failures.
        failures: u32,
        /// The next attempt.
        retry_at: SystemTime,
    },
    /// A new cert was installed but its reload or verify failed (warn).
    InstalledButFailed {
        /// What failed.
        error: String,
        /// When the reload (and verify) is tried again.
        retry_at: SystemTime,
    },
    /// The listener does not serve the cert on disk (warn).
    VerifyFailed {
        /// What failed.
        error: String,
        /// The next check.
        retry_at: SystemTime,
    },
    /// Running the reload hooks of the cert on disk again failed, without `[verify]` (warn).
    ReloadFailed {
        /// What failed.
        error: String,
        /// The next run.
        retry_at: SystemTime,
    },
    /// The new status text: info when all is well, debug when a failure was logged already.
    Status {
        /// The text (also sent as STATUS=).
        text: String,
        /// Whether the failure behind it was logged already.
        quiet: bool,
    },
    /// A trust-bundle poll failed (warn); the next one is at `next`.
    BundlePollFailed {
        /// What failed.
        error: String,
        /// The next poll.
        next: SystemTime,
    },
    /// The daemon stops (info).
    ShuttingDown,
}

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not started.
    Starting,
    /// Waiting for [`Event::Observed`].
    Observing,
    /// Sleeping until the deadline (the next renewal, retry or verify).
    Waiting {
        /// When to wake.
        until: SystemTime,
    },
    /// A renewal is in progress.
    Renewing {
        /// The serial on disk when it began.
        serial_before: Option<String>,
    },
    /// A verify (or, without `[verify]`, a run of the reload hooks again) is in progress.
    Verifying,
    /// A trust-bundle poll is in progress.
    PollingBundle,
    /// Stopped.
    Stopped,
}

/// A failing renewal, retried with backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Retry {
    at: SystemTime,
    failures: u32,
    /// The serial on disk when the failing renewal began: a failed forced renewal of a
    /// still-good cert is retried until it succeeds or another cert is installed meanwhile.
    serial: Option<String>,
}

/// The rotation of the cert on disk is unfinished: its reload hooks failed, or with `[verify]`
/// the listener is not known to serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unverified {
    /// When to check again (`None`: at once).
    at: Option<SystemTime>,
    attempt: u32,
}

/// The daemon's state.
#[derive(Debug, Clone)]
pub struct Machine {
    policy: Policy,
    verify: bool,
    phase: Phase,
    force: bool,
    stopping: bool,
    retry: Option<Retry>,
    unverified: Option<Unverified>,
    ready: Option<bool>,
    ready_sent: bool,
    last_status: String,
    pending: Vec<Change>,
    /// Poll the trust bundle this often between renewals (`None`: never).
    poll_every: Option<std::time::Duration>,
    /// The next poll, once the first cert is settled.
    next_poll: Option<SystemTime>,
}

impl Machine {
    /// A machine for `policy`; `verify` says whether `[verify]` is configured (then the cert
    /// found at start is checked before READY).
    pub fn new(policy: Policy, verify: bool) -> Self {
        Self {
            policy,
            verify,
            phase: Phase::Starting,
            force: false,
            stopping: false,
            retry: None,
            unverified: verify.then_some(Unverified {
                at: None,
                attempt: 0,
            }),
            ready: None,
            ready_sent: false,
            last_status: String::new(),
            pending: Vec::new(),
            poll_every: None,
            next_poll: None,
        }
    }

    /// Polls the issuer's trust bundle every `every` between renewals (none when `None` or
    /// zero).
    pub fn polling_bundle(mut self, every: Option<std::time::Duration>) -> Self {
        self.poll_every = every.filter(|d| !d.is_zero());
        self
    }

    /// A machine started over a state file that says the last reload of the cert on disk
    /// failed (`unfinished`): its hooks (and verify) run again first, with or without
    /// `[verify]`.
    pub fn resuming(mut self, unfinished: bool) -> Self {
        if unfinished {
            self.unverified = Some(Unverified {
                at: None,
                attempt: 0,
            });
        }
        self
    }

    /// Where the daemon is.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// When to send [`Event::Deadline`] (sleeping at most [`schedule::MAX_SLEEP`] at a time);
    /// `None` while an operation is in progress or after the stop.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        match self.phase {
            Phase::Waiting { until } => Some(until),
            _ => None,
        }
    }

    /// Handles `event` at `now`; `jitter` is a sample in [0, 1] for the backoff, used when
    /// the event is a failure. Events that do not fit the phase (a stale observation, a
    /// result with nothing in progress) change nothing.
    pub fn on(&mut self, now: SystemTime, jitter: f64, event: Event) -> Vec<Action> {
        let mut acts = Vec::new();
        if self.phase == Phase::Stopped {
            return acts;
        }
        match (event, &self.phase) {
            (Event::Start, Phase::Starting) => self.observe(&mut acts),
            (Event::Observed(disk), Phase::Observing) => self.settle(now, &disk, &mut acts),
            (Event::Deadline, Phase::Waiting { .. }) => self.observe(&mut acts),
            (Event::Force, phase) => {
                acts.push(Action::Log(Log::Forced));
                self.force = true;
                if matches!(phase, Phase::Waiting { .. }) {
                    self.observe(&mut acts);
                }
            }
            (Event::Shutdown, phase) => {
                self.stopping = true;
                if !matches!(
                    phase,
                    Phase::Renewing { .. } | Phase::Verifying | Phase::PollingBundle
                ) {
                    self.stop(&mut acts);
                }
            }
            (Event::Watchdog, _) => acts.push(Action::Notify(Notice::Watchdog)),
            (Event::Renewed { result, disk }, Phase::Renewing { serial_before }) => {
                let serial_before = serial_before.clone();
                self.renewed(now, jitter, result, &disk, serial_before, &mut acts);
                self.settle(now, &disk, &mut acts);
            }
            (Event::Verified { result, disk }, Phase::Verifying) => {
                self.verified(now, jitter, result, &mut acts);
                self.settle(now, &disk, &mut acts);
            }
            (Event::BundlePolled { result, disk }, Phase::PollingBundle) => {
                self.polled(now, jitter, result, &mut acts);
                self.settle(now, &disk, &mut acts);
            }
            _ => {}
        }
        acts
    }

    fn observe(&mut self, acts: &mut Vec<Action>) {
        self.phase = Phase::Observing;
        acts.push(Action::Observe);
    }

    fn stop(&mut self, acts: &mut Vec<Action>) {
        self.flush(acts);
        self.phase = Phase::Stopped;
        acts.push(Action::Notify(Notice::Stopping));
        acts.push(Action::Log(Log::ShuttingDown));
        acts.push(Action::Stop);
    }

    /// Writes the changes gathered in this transition, if any.
    fn flush(&mut self, acts: &mut Vec<Action>) {
        if !self.pending.is_empty() {
            acts.push(Action::Persist(std::mem::take(&mut self.pending)));
        }
    }

    /// When to reload (and check the listener) again after a failure; counts the attempt.
    fn verify_retry(&mut self, now: SystemTime, jitter: f64) -> SystemTime {
        let attempt = self.unverified.as_ref().map_or(0, |u| u.attempt);
        let at = schedule::retry_at(now, attempt, None, &self.policy, jitter);
        self.unverified = Some(Unverified {
            at: Some(at),
            attempt: attempt.saturating_add(1),
        });
        at
    }

    fn renewed(
        &mut self,
        now: SystemTime,
        jitter: f64,
        result: Result<(), Failure>,
        disk: &Disk,
        serial_before: Option<String>,
        acts: &mut Vec<Action>,
    ) {
        let at = unix_secs(now);
        // A renewal fetches the trust bundle too.
        self.next_poll = self.poll_every.map(|d| now + d);
        match result {
            Ok(()) => {
                self.retry = None;
                self.unverified = None;
                self.pending.push(Change::Succeeded { at });
            }
            Err(f) if f.installed.is_some() => {
                // The new cert is on disk; the next cycle comes on its normal schedule, and
                // the reload/verify is retried with backoff until it succeeds: a consumer that
                // reloads only on the hook must not keep serving the old cert until it expires.
                self.retry = None;
                let retry_at = self.verify_retry(now, jitter);
                acts.push(Action::Log(Log::InstalledButFailed {
                    error: f.error.clone(),
                    retry_at,
                }));
                self.pending.push(failed(at, f));
            }
            Err(f) => {
                let attempt = self.retry.as_ref().map_or(0, |r| r.failures);
                let retry_at = schedule::retry_at(now, attempt, disk.times(), &self.policy, jitter);
                let failures = attempt.saturating_add(1);
                // One line per failed attempt: what failed, how often, and when next.
                acts.push(Action::Log(Log::RenewalFailed {
                    error: f.error.clone(),
                    failures,
                    retry_at,
                }));
                self.retry = Some(Retry {
                    at: retry_at,
                    failures,
                    serial: serial_before,
                });
                self.pending.push(failed(at, f));
            }
        }
    }

    fn verified(
        &mut self,
        now: SystemTime,
        jitter: f64,
        result: Result<(), Failure>,
        acts: &mut Vec<Action>,
    ) {
        let at = unix_secs(now);
        match result {
            Ok(()) => {
                self.unverified = None;
                self.pending.push(Change::Completed { at });
            }
            Err(f) => {
                let retry_at = self.verify_retry(now, jitter);
                let error = f.error.clone();
                acts.push(Action::Log(if self.verify {
                    Log::VerifyFailed { error, retry_at }
                } else {
                    Log::ReloadFailed { error, retry_at }
                }));
                self.pending.push(failed(at, f));
            }
        }
    }

    fn polled(
        &mut self,
        now: SystemTime,
        jitter: f64,
        result: Result<(), Failure>,
        acts: &mut Vec<Action>,
    ) {
        let next = self.poll_every.map(|d| now + d);
        self.next_poll = next;
        match result {
            Ok(()) => {}
            Err(f) if f.installed.is_some() => {
                // A new bundle is on disk but its reload (or verify) failed: finished like a
                // rotation whose hooks failed.
                let retry_at = self.verify_retry(now, jitter);
                acts.push(Action::Log(Log::InstalledButFailed {
                    error: f.error.clone(),
                    retry_at,
                }));
                self.pending.push(failed(unix_secs(now), f));
            }
            Err(f) => acts.push(Action::Log(Log::BundlePollFailed {
                error: f.error,
                next: next.unwrap_or(now),
            })),
        }
    }

    /// Decides from what is on disk with nothing in progress: renew, verify, or wait.
    fn settle(&mut self, now: SystemTime, disk: &Disk, acts: &mut Vec<Action>) {
        if self.stopping {
            self.stop(acts);
            return;
        }
        let renew_now = disk.decision == Decision::RenewNow;
        let due = self.force
            || match &self.retry {
                Some(r) => r.at <= now,
                None => renew_now,
            };
        if !due
            && !renew_now
            && self
                .retry
                .as_ref()
                .is_some_and(|r| r.serial.as_deref() != disk.serial())
        {
            // Someone else (a one-shot rotate) installed a good cert meanwhile.
            self.retry = None;
        }
        if due {
            self.flush(acts);
            if let Err(reason) = &disk.cert
                && self.retry.is_none()
            {
                // Said once per run of failures, not before every retry.
                acts.push(Action::Log(Log::NoUsableCert {
                    reason: reason.clone(),
                }));
            }
            let forced = std::mem::take(&mut self.force);
            self.phase = Phase::Renewing {
                serial_before: disk.serial().map(str::to_string),
            };
            acts.push(Action::Renew { forced });
            return;
        }
        let valid = disk.cert.is_ok();
        if valid
            && self
                .unverified
                .as_ref()
                .is_some_and(|u| u.at.is_none_or(|t| t <= now))
        {
            self.flush(acts);
            self.phase = Phase::Verifying;
            acts.push(Action::Verify);
            return;
        }
        // /ready follows the cert (an expired one while the issuer is down is not ready);
        // READY=1 goes to systemd once, after the first valid (and verified) cert. Without
        // [verify], hooks that failed do not make the cert on disk any less ready.
        if valid && let Some(every) = self.poll_every {
            let next = *self.next_poll.get_or_insert(now + every);
            if next <= now {
                self.flush(acts);
                self.phase = Phase::PollingBundle;
                acts.push(Action::PollBundle);
                return;
            }
        }
        let good = valid && !(self.verify && self.unverified.is_some());
        if self.ready != Some(good) {
            self.ready = Some(good);
            acts.push(Action::SetReady(good));
        }
        if good && !self.ready_sent {
            self.ready_sent = true;
            acts.push(Action::Notify(Notice::Ready));
        }
        let mut deadline = match (&self.retry, disk.decision) {
            (Some(r), _) => r.at,
            (None, Decision::At(t)) => t,
            (None, Decision::RenewNow) => now,
        };
        if let Some(Unverified { at: Some(v), .. }) = &self.unverified {
            deadline = deadline.min(*v);
        }
        let status = if self.unverified.is_some() && self.verify {
            format!(
                "the listener does not serve the new cert yet; checking again at {}",
                rfc3339(deadline)
            )
        } else if self.unverified.is_some() {
            format!(
                "the reload hooks failed; running them again at {}",
                rfc3339(deadline)
            )
        } else if let Some(r) = &self.retry {
            format!(
                "renewal failing (attempt {}); next try at {}",
                r.failures,
                rfc3339(deadline)
            )
        } else {
            format!("next renewal at {}", rfc3339(deadline))
        };
        let mut log = None;
        if status != self.last_status {
            acts.push(Action::Notify(Notice::Status(status.clone())));
            self.pending.push(Change::NextRenewal(unix_secs(deadline)));
            log = Some(Log::Status {
                text: status.clone(),
                // The failure was logged already, with its retry time.
                quiet: self.unverified.is_some() || self.retry.is_some(),
            });
            self.last_status = status;
        }
        self.flush(acts);
        acts.extend(log.map(Action::Log));
        // The next poll wakes the daemon too, without changing the plan it reports.
        if valid && let Some(p) = self.next_poll {
            deadline = deadline.min(p);
        }
        self.phase = Phase::Waiting { until: deadline };
    }
}

fn failed(at: u64, f: Failure) -> Change {
    Change::Failed {
        at,
        error: f.error,
        installed: f.installed,
    }
}

#[cfg(test)]
mod tests;
