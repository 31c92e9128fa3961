//! Where the time of one rotation goes: the wall-clock moment the rotator decided to renew and
//! each stage's duration, kept for the last successful rotation and shown by the daemon's
//! `GET /status` as `last_rotation` (and in a debug log line). Measuring costs a few
//! `Instant::now()` calls per rotation; nothing is kept beyond the last one.
//!
//! The decision time is the real wall clock (microseconds since the Unix epoch, read through
//! `SystemClock`), never the rotator's injectable clock, so that another process on the host (the rotation bench) can compare it
//! with the moment it first sees the new cert served.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// The stages of the last successful rotation, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationTiming {
    /// The new serial.
    pub serial: String,
    /// Forced (SIGHUP, `--force`) rather than scheduled.
    pub forced: bool,
    /// When the rotator decided to renew: wall clock, microseconds since the Unix epoch.
    pub decided_unix_us: u64,
    /// Reading the trust anchors, the installed set and the token, and checking the cert dir
    /// is writable.
    pub prepare_us: u64,
    /// Generating the P-256 key and the CSR.
    pub keygen_csr_us: u64,
    /// The Certify round trip (connection included), with the trust bundle fetched beside it.
    pub certify_us: u64,
    /// Validating the answer (chain to the anchors, identity, key, times).
    pub validate_us: u64,
    /// Deciding on the issuer's trust bundle (fetched beside the Certify call).
    pub bundle_us: u64,
    /// The atomic swap with its fsyncs, and the state file.
    pub swap_us: u64,
    /// The first run of the reload hooks (an HTTP hook's answer includes the listener's reload).
    pub hook_us: u64,
    /// From the end of the first hook run to the start of the verify handshake that saw the
    /// new cert: the listener still reloading (verify delay, failed attempts, hooks run
    /// again). 0 without `[verify]`.
    pub reload_wait_us: u64,
    /// The verify handshake that saw the new cert. 0 without `[verify]`.
    pub verify_us: u64,
    /// Verify attempts made (0 without `[verify]`).
    pub verify_attempts: u32,
    /// From the decision to the end of the rotation.
    pub total_us: u64,
}

/// A stopwatch over one rotation's stages.
#[derive(Debug)]
pub(crate) struct Stopwatch {
    started: Instant,
    lap: Instant,
    pub(crate) timing: RotationTiming,
}

impl Stopwatch {
    /// Starts now: the decision.
    pub(crate) fn start(forced: bool) -> Self {
        let now = Instant::now();
        let decided = proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            started: now,
            lap: now,
            timing: RotationTiming {
                forced,
                decided_unix_us: micros(decided),
                ..RotationTiming::default()
            },
        }
    }

    /// The time since the last lap (or the start), and starts a new lap.
    pub(crate) fn lap(&mut self) -> u64 {
        let now = Instant::now();
        let d = now - self.lap;
        self.lap = now;
        micros(d)
    }

    /// Finishes: the total, for the rotation that installed `serial`.
    pub(crate) fn finish(mut self, serial: &str) -> RotationTiming {
        self.timing.serial = serial.to_string();
        self.timing.total_us = micros(self.started.elapsed());
        self.timing
    }
}

/// The reload-and-verify part of a rotation, measured by [`crate::renew::Rotator`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ReloadTiming {
    pub(crate) hook_us: u64,
    pub(crate) reload_wait_us: u64,
    pub(crate) verify_us: u64,
    pub(crate) verify_attempts: u32,
}

/// The last successful rotation's timing, shared by the rotator and its `/status`.
pub type LastRotation = Arc<Mutex<Option<RotationTiming>>>;

/// Records `timing` as the last rotation and logs it at debug level.
pub(crate) fn record(last: &LastRotation, timing: RotationTiming) {
    tracing::debug!(
        serial = %timing.serial,
        decided_unix_us = timing.decided_unix_us,
        prepare_us = timing.prepare_us,
        keygen_csr_us = timing.keygen_csr_us,
        certify_us = timing.certify_us,
        validate_us = timing.validate_us,
        bundle_us = timing.bundle_us,
        swap_us = timing.swap_us,
        hook_us = timing.hook_us,
        reload_wait_us = timing.reload_wait_us,
        verify_us = timing.verify_us,
        total_us = timing.total_us,
        "rotation stages"
    );
    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(timing);
}

/// A duration in whole microseconds (saturating).
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_add_up_to_at_most_the_total_and_the_decision_is_wall_clock() {
        let before = micros(
            proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap(),
        );
        let mut w = Stopwatch::start(true);
        std::thread::sleep(Duration::from_millis(2));
        let a = w.lap();
        let b = w.lap();
        let t = w.finish("0a");
        assert!(a >= 2_000, "first lap {a} us");
        assert!(a + b <= t.total_us);
        assert!(t.decided_unix_us >= before);
        assert!(t.forced);
        assert_eq!(t.serial, "0a");
        let last: LastRotation = Arc::default();
        record(&last, t.clone());
        assert_eq!(last.lock().unwrap().as_ref(), Some(&t));
    }
}
