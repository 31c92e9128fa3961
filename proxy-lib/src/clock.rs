//! The workspace's single source of wall-clock time.
//!
//! Certificate validity, token expiry and renewal deadlines are wall-clock decisions, so every
//! one of them takes its `now` from a [`Clock`]. Binaries use [`SystemClock`]; tests use
//! [`FakeClock`], which only moves when told to.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// A shared, dynamically typed clock.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one permitted read of the system clock
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock for tests: starts where it is told and moves only on [`FakeClock::set`] or
/// [`FakeClock::advance`]. Clones share the same time.
#[derive(Clone)]
pub struct FakeClock {
    now: Arc<Mutex<SystemTime>>,
}

impl FakeClock {
    /// A fake clock reading `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// A fake clock reading the given number of seconds after the Unix epoch.
    pub fn at_unix(secs: u64) -> Self {
        Self::new(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Sets the time (it may go backwards, like a stepped system clock).
    pub fn set(&self, t: SystemTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// Moves the time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += d;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FakeClock").field(&self.now()).finish()
    }
}

/// Seconds since the Unix epoch (0 for times before it), for metrics and JSON.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 text for a time, e.g. `2026-11-27T07:36:06Z`, for logs and `status`. Times
/// outside 1970..=9999 (a certificate may carry any; the formatter would panic on them) are
/// given as seconds from the epoch instead.
pub fn rfc3339(t: SystemTime) -> String {
    /// 10000-01-01T00:00:00Z: RFC 3339 years have four digits.
    const YEAR_10000: u64 = 253_402_300_800;
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() < YEAR_10000 => humantime::format_rfc3339_seconds(t).to_string(),
        Ok(d) => format!("{}s after 1970-01-01T00:00:00Z", d.as_secs()),
        Err(e) => format!("{}s before 1970-01-01T00:00:00Z", e.duration().as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_moves_only_when_told_and_clones_share_time() {
        let c = FakeClock::at_unix(1_000);
        let c2 = c.clone();
        assert_eq!(unix_secs(c.now()), 1_000);
        c.advance(Duration::from_secs(5));
        assert_eq!(unix_secs(c2.now()), 1_005);
        c2.set(UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(unix_secs(c.now()), 10);
    }

    #[test]
    fn rfc3339_never_panics_outside_its_years() {
        let before = UNIX_EPOCH - std::time::Duration::from_secs(412_751_706);
        assert_eq!(rfc3339(before), "412751706s before 1970-01-01T00:00:00Z");
        let after = UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800);
        assert_eq!(rfc3339(after), "253402300800s after 1970-01-01T00:00:00Z");
        let last = UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
        assert_eq!(rfc3339(last), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(86_400)),
            "1970-01-02T00:00:00Z"
        );
    }
}
