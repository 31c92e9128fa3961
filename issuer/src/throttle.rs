//! Throttling of failed requests per source, before authentication.
//!
//! Every request refused before or at authentication (too big, a malformed identity, no or a
//! wrong token) takes one token from its source's bucket (IPv4 address, IPv6 /64); a source
//! whose bucket is empty is refused RESOURCE_EXHAUSTED before anything else is done for it
//! (no token lookup, no Kubernetes review, no audit record of its own). Successes take
//! nothing, so a fleet renewing from one NAT address is never throttled by its own renewals.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Failures a source may have in a burst.
pub const DEFAULT_BURST: u32 = 20;
/// Failures per minute a source regains.
pub const DEFAULT_PER_MINUTE: u32 = 20;
/// Sources tracked at most; a source beyond it is not throttled until room is made.
pub const MAX_SOURCES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-source buckets of allowed failures.
#[derive(Debug)]
pub struct FailureThrottle {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Default for FailureThrottle {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_PER_MINUTE)
    }
}

impl FailureThrottle {
    /// `burst` failures at once, `per_minute` regained each minute.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_minute) / 60.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let secs = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + secs * self.per_second).min(self.burst);
        b.at = now;
    }

    /// Whether `peer`'s source has failures left (`false`: refuse it now).
    pub fn allows(&self, peer: IpAddr) -> bool {
        let src = proxy_lib::net::caps::source_of(peer);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match buckets.get_mut(&src) {
            None => true,
            Some(b) => {
                self.refill(b, now);
                b.tokens >= 1.0
            }
        }
    }

    /// Counts one failure of `peer`'s source.
    pub fn failed(&self, peer: IpAddr) {
        let src = proxy_lib::net::caps::source_of(peer);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&src) {
            return;
        }
        let b = buckets.entry(src).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    /// Forgets sources whose buckets are full again (run now and then).
    pub fn retain_recent(&self) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.retain(|_, b| {
            let secs = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + secs * self.per_second < self.burst
        });
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// How long until a source that just ran out may fail again.
    pub fn refill_interval(&self) -> Duration {
        if self.per_second > 0.0 {
            Duration::from_secs_f64(1.0 / self.per_second)
        } else {
            Duration::MAX
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_is_throttled_after_its_burst_of_failures_and_recovers() {
        let t = FailureThrottle::new(3, 60);
        for _ in 0..3 {
            assert!(t.allows(ip("127.0.0.2")));
            t.failed(ip("127.0.0.2"));
        }
        assert!(!t.allows(ip("127.0.0.2")), "burst spent");
        assert!(t.allows(ip("127.0.0.1")), "other sources are not affected");
        // The same /64 is the same source.
        t.failed(ip("2001:db8::1"));
        t.failed(ip("2001:db8::2"));
        t.failed(ip("2001:db8::3"));
        assert!(!t.allows(ip("2001:db8::ffff")));
        tokio::time::advance(t.refill_interval()).await;
        assert!(t.allows(ip("127.0.0.2")), "one failure regained");
        t.failed(ip("127.0.0.2"));
        assert!(!t.allows(ip("127.0.0.2")));
        tokio::time::advance(Duration::from_secs(60)).await;
        t.retain_recent();
        assert_eq!(t.tracked(), 0, "full buckets are forgotten");
    }
}
