//! Validity windows: the one rule for the window granted to a new certificate, and what every
//! part reads off a window (lifetime, time left, whether an instant lies inside). Pure.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A certificate's validity window, `[not_before, not_after]` (both ends included, as X.509
/// has it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Window {
    /// The window `[not_before, not_after]`.
    pub fn new(not_before: SystemTime, not_after: SystemTime) -> Self {
        Self {
            not_before,
            not_after,
        }
    }

    /// The window granted to a certificate issued at `now` by an issuer valid over `issuer`:
    /// `[now − backdate, now + lifetime]`, with `now` truncated to whole seconds (X.509 times
    /// carry seconds), then clipped to the issuer's window, so a certificate never outlives
    /// (or predates) its issuer. `backdate` allows for clocks of relying hosts running behind.
    /// Whether enough of the issuer's life remains is the caller's policy.
    pub fn grant(now: SystemTime, lifetime: Duration, backdate: Duration, issuer: Window) -> Self {
        let now = whole_seconds(now);
        let start = now.checked_sub(backdate).unwrap_or(UNIX_EPOCH);
        Self {
            not_before: start.max(issuer.not_before),
            not_after: (now + lifetime).min(issuer.not_after),
        }
    }

    /// notAfter − notBefore (zero for an empty or inverted window).
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// notAfter − `now` (zero once it has passed).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// Whether `now` lies inside the window.
    pub fn contains(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// `t` truncated to whole seconds since the Unix epoch (the epoch for earlier times).
pub fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(crate::clock::unix_secs(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const NOW: u64 = 1_900_000_000;
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_grant_is_backdated_truncated_and_clipped_to_the_issuer() {
        let skew = Duration::from_secs(20);
        let issuer = Window::new(t(NOW - 3_600), t(NOW + 30 * 86_400));
        // Inside the issuer's life: [now − skew, now + lifetime], from whole seconds.
        let g = Window::grant(t(NOW) + Duration::from_millis(999), DAY, skew, issuer);
        assert_eq!(g, Window::new(t(NOW - 20), t(NOW + 86_400)));
        assert_eq!(g.lifetime(), DAY + skew);
        // Never before the issuer's notBefore, never after its notAfter.
        let young = Window::new(t(NOW - 5), t(NOW + 3_600));
        let g = Window::grant(t(NOW), DAY, skew, young);
        assert_eq!(g, Window::new(t(NOW - 5), t(NOW + 3_600)));
        // No backdate: starts now.
        let g = Window::grant(t(NOW), Duration::from_secs(60), Duration::ZERO, issuer);
        assert_eq!(g, Window::new(t(NOW), t(NOW + 60)));
        // A backdate past the epoch stops at the epoch.
        let g = Window::grant(
            t(5),
            Duration::from_secs(60),
            skew,
            Window::new(t(0), t(100)),
        );
        assert_eq!(g, Window::new(t(0), t(65)));
    }

    #[test]
    fn lifetime_remaining_and_contains_at_and_around_the_ends() {
        let w = Window::new(t(100), t(200));
        assert_eq!(w.lifetime(), Duration::from_secs(100));
        assert_eq!(Window::new(t(200), t(100)).lifetime(), Duration::ZERO);
        assert_eq!(w.remaining(t(150)), Duration::from_secs(50));
        assert_eq!(w.remaining(t(250)), Duration::ZERO);
        for (at, inside) in [
            (99, false),
            (100, true),
            (150, true),
            (200, true),
            (201, false),
        ] {
            assert_eq!(w.contains(t(at)), inside, "{at}");
        }
        assert_eq!(whole_seconds(t(7) + Duration::from_nanos(1)), t(7));
    }
}
