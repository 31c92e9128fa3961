//! The daemon: a small IO loop around the sans-IO [`machine::Machine`]. The loop sleeps until
//! the machine's next deadline (at most five minutes, then it looks at the wall clock again),
//! a forced renewal (SIGHUP), a shutdown (SIGTERM; never mid-swap) or a watchdog tick, feeds
//! what happened to the machine and carries out the actions it returns. Renewals and verifies
//! run concurrently with the loop (so the watchdog keeps being pinged), and every blocking
//! file step (reading the cert dir, the swap, the state file under the store lock) runs on
//! tokio's blocking pool, so `/metrics` and `/ready` keep answering.

pub mod machine;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proxy_lib::clock::{rfc3339, unix_secs};
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};

use crate::client::Issue;
use crate::notify::Notify;
use crate::reload::Reload;
use crate::renew::{Current, CycleError, Rotator};
use crate::schedule;
use crate::state::State;
use machine::{Action, Disk, Event, Failure, Log, Machine};

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
    rotator: Rotator<I, R>,
    notifier: Arc<dyn Notify>,
    mut ctl: Controls,
    opts: LoopOptions,
) {
    let mut rng = match opts.seed {
        Some(s) => rand::rngs::StdRng::seed_from_u64(s),
        None => rand::rngs::StdRng::from_os_rng(),
    };
    let clock = rotator.clock().clone();
    let metrics = rotator.metrics().clone();
    // A restarted daemon reports the last success it recorded, not 0 (an "age of the last
    // success" alert would fire at every restart).
    let dir = rotator.config().dir.clone();
    let state = crate::renew::blocking(move || State::load(&dir)).await;
    if let Some(t) = state.last_success {
        metrics.last_success.set(t as i64);
    }
    // A reload that failed before the restart runs again first.
    let mut machine = Machine::new(rotator.config().policy, rotator.config().verify.is_some())
        .resuming(state.unfinished.is_some())
        .polling_bundle(rotator.config().bundle_poll_interval);
    rotator.show_trust().await;
    let mut watchdog = opts.watchdog.map(|w| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + w, w);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    // The renewal or verify in progress; it borrows the rotator, as the loop does.
    let mut busy: Option<Op<'_>> = None;
    let (mut stopping, mut force_open) = (false, true);
    let mut event = Some(Event::Start);
    loop {
        let mut actions = std::collections::VecDeque::new();
        if let Some(ev) = event {
            actions.extend(machine.on(clock.now(), rng.random(), ev));
        }
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Observe => {
                    let disk = observe(&rotator).await;
                    actions.extend(machine.on(clock.now(), rng.random(), Event::Observed(disk)));
                }
                Action::Renew { forced } => busy = Some(Box::pin(renew(&rotator, forced))),
                Action::Verify => busy = Some(Box::pin(verify(&rotator))),
                Action::PollBundle => busy = Some(Box::pin(poll_bundle(&rotator))),
                Action::SetReady(ready) => metrics.set_ready(ready),
                Action::Notify(notice) => notifier.notify(notice),
                Action::Persist(changes) => rotator.record_off_thread(changes).await,
                Action::Log(line) => log(line),
                Action::Stop => return,
            }
        }
        let nap = machine
            .next_deadline()
            .map(|d| schedule::sleep_for(clock.now(), d));
        event = tokio::select! {
            biased;
            ev = finish(&mut busy) => {
                busy = None;
                Some(ev)
            }
            _ = ctl.shutdown.wait_for(|s| *s), if !stopping => {
                // A dropped sender stops the daemon too.
                stopping = true;
                Some(Event::Shutdown)
            }
            msg = ctl.force.recv(), if force_open => {
                force_open = msg.is_some();
                msg.map(|()| Event::Force)
            }
            _ = tokio::time::sleep(nap.unwrap_or_default()), if nap.is_some() => Some(Event::Deadline),
            _ = tick(&mut watchdog) => Some(Event::Watchdog),
        };
    }
}

/// A renewal or verify in progress, answering with its event.
type Op<'a> = Pin<Box<dyn Future<Output = Event> + Send + 'a>>;

/// Waits for the operation in progress; never, when there is none.
async fn finish(busy: &mut Option<Op<'_>>) -> Event {
    match busy {
        Some(op) => op.await,
        None => std::future::pending().await,
    }
}

/// Waits for the next watchdog tick; never, without a watchdog.
async fn tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Looks at the cert dir (off the runtime thread) and updates the expiry metric.
async fn observe<I: Issue, R: Reload>(rotator: &Rotator<I, R>) -> Disk {
    let (current, decision) = rotator.observe().await;
    if let Some(t) = current.times() {
        rotator
            .metrics()
            .cert_expiration
            .set(unix_secs(t.not_after) as i64);
    }
    let cert = match current {
        Current::Valid { times, leaf } => Ok((leaf.serial, times)),
        Current::Unusable(why) => Err(why),
    };
    Disk { cert, decision }
}

async fn renew<I: Issue, R: Reload>(rotator: &Rotator<I, R>, forced: bool) -> Event {
    let result = rotator.renew_due(forced).await.map(drop).map_err(failure);
    let disk = observe(rotator).await;
    Event::Renewed { result, disk }
}

async fn verify<I: Issue, R: Reload>(rotator: &Rotator<I, R>) -> Event {
    let result = rotator.verify_current().await.map_err(failure);
    let disk = observe(rotator).await;
    Event::Verified { result, disk }
}

async fn poll_bundle<I: Issue, R: Reload>(rotator: &Rotator<I, R>) -> Event {
    let result = rotator.poll_bundle().await.map_err(failure);
    let disk = observe(rotator).await;
    Event::BundlePolled { result, disk }
}

fn failure(e: CycleError) -> Failure {
    Failure {
        error: e.to_string(),
        installed: e.installed_serial().map(str::to_string),
    }
}

fn log(line: Log) {
    match line {
        Log::Forced => tracing::info!("renewal forced"),
        Log::NoUsableCert { reason } => {
            tracing::info!(%reason, "no usable cert on disk; renewing now");
        }
        Log::RenewalFailed {
            error,
            failures,
            retry_at,
        } => {
            tracing::warn!(%error, failures, retry_at = %rfc3339(retry_at), "renewal failed");
        }
        Log::InstalledButFailed { error, retry_at } => {
            tracing::warn!(%error, retry_at = %rfc3339(retry_at), "renewal failed");
        }
        Log::VerifyFailed { error, retry_at } => tracing::warn!(
            %error,
            retry_at = %rfc3339(retry_at),
            "the listener does not serve the cert on disk"
        ),
        Log::ReloadFailed { error, retry_at } => tracing::warn!(
            %error,
            retry_at = %rfc3339(retry_at),
            "running the reload hooks of the cert on disk again failed"
        ),
        Log::Status { text, quiet: false } => tracing::info!("{text}"),
        Log::Status { text, quiet: true } => tracing::debug!("{text}"),
        Log::BundlePollFailed { error, next } => {
            tracing::warn!(%error, next_poll = %rfc3339(next), "fetching the issuer's trust bundle failed");
        }
        Log::ShuttingDown => tracing::info!("shutting down"),
    }
}
