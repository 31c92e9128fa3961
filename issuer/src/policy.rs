//! What the issuer grants: which identities it serves and the validity window of a leaf.
//! Pure: every decision takes `now` as an argument.

use std::time::{Duration, SystemTime};

use proxy_lib::identity::{Identity, IdentityError, TrustDomain};
use proxy_lib::validity::{Window, whole_seconds};

use crate::error::RequestError;

/// Default leaf lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default minimum leaf lifetime: with less issuer life left, Certify answers UNAVAILABLE.
pub const DEFAULT_MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// Default backdating of notBefore for clock skew between hosts.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(20);

/// The issuing policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The only trust domain identities may belong to.
    pub trust_domain: TrustDomain,
    /// The only control-plane namespace identities may name (`identity.<ns>.<td>`).
    pub control_plane_namespace: String,
    /// Leaf lifetime (before capping at the issuer's notAfter).
    pub lifetime: Duration,
    /// Minimum useful leaf lifetime.
    pub min_lifetime: Duration,
    /// notBefore = now − clock_skew.
    pub clock_skew: Duration,
}

/// The validity window granted to one leaf.
pub type Grant = Window;

impl Policy {
    /// Parses the requested identity and checks it belongs to the trust domain and the
    /// control plane.
    pub fn identity(&self, requested: &str) -> Result<Identity, IdentityError> {
        Identity::parse_in_mesh(requested, &self.trust_domain, &self.control_plane_namespace)
    }

    /// The shortest leaf the issuer will mint: `min(min_lifetime, lifetime)`, so configured
    /// lifetimes shorter than `min_lifetime` (tests, demos) still work.
    pub fn effective_min_lifetime(&self) -> Duration {
        self.min_lifetime.min(self.lifetime)
    }

    /// Whether an issuer valid `[issuer_not_before, issuer_not_after]` can issue at `now`;
    /// the error says why not.
    pub fn check_issuer(
        &self,
        now: SystemTime,
        issuer_not_before: SystemTime,
        issuer_not_after: SystemTime,
    ) -> Result<(), RequestError> {
        let now = whole_seconds(now);
        if now < issuer_not_before {
            return Err(RequestError::CaUnavailable(format!(
                "issuer certificate is not valid before {}",
                proxy_lib::clock::rfc3339(issuer_not_before)
            )));
        }
        let left = Window::new(issuer_not_before, issuer_not_after).remaining(now);
        let min = self.effective_min_lifetime();
        if left < min {
            return Err(RequestError::CaUnavailable(format!(
                "issuer certificate expires at {} ({} left), less than the minimum leaf lifetime of {}",
                proxy_lib::clock::rfc3339(issuer_not_after),
                proxy_lib::human::duration(Duration::from_secs(left.as_secs())),
                proxy_lib::human::duration(min)
            )));
        }
        Ok(())
    }

    /// The window for a leaf issued at `now` by an issuer valid until `issuer_not_after`:
    /// `[now − skew, min(now + lifetime, issuer_not_after)]`, or UNAVAILABLE when less than
    /// the minimum lifetime would remain.
    pub fn grant(
        &self,
        now: SystemTime,
        issuer_not_before: SystemTime,
        issuer_not_after: SystemTime,
    ) -> Result<Grant, RequestError> {
        self.check_issuer(now, issuer_not_before, issuer_not_after)?;
        let issuer = Window::new(issuer_not_before, issuer_not_after);
        Ok(Window::grant(now, self.lifetime, self.clock_skew, issuer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy {
            trust_domain: TrustDomain::default(),
            control_plane_namespace: "linkerd".into(),
            lifetime: DEFAULT_LIFETIME,
            min_lifetime: DEFAULT_MIN_LIFETIME,
            clock_skew: DEFAULT_CLOCK_SKEW,
        }
    }

    fn t(secs: u64) -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(secs)
    }

    const NOW: u64 = 2_000_000_000;

    #[test]
    fn window_is_lifetime_plus_skew() {
        let g = policy()
            .grant(
                t(NOW) + Duration::from_millis(700),
                t(0),
                t(NOW + 365 * 86_400),
            )
            .unwrap();
        assert_eq!(g.not_before, t(NOW - 20));
        assert_eq!(g.not_after, t(NOW + 86_400));
    }

    #[test]
    fn table_of_issuer_remaining_life() {
        // (issuer seconds left, expected leaf end or None = UNAVAILABLE)
        let cases = [
            (365 * 86_400, Some(NOW + 86_400)),
            (2 * 3600, Some(NOW + 2 * 3600)),
            (3600, Some(NOW + 3600)),
            (3599, None),
            (0, None),
        ];
        for (left, want) in cases {
            let got = policy().grant(t(NOW), t(0), t(NOW + left));
            match want {
                Some(end) => assert_eq!(got.unwrap().not_after, t(end), "left {left}"),
                None => assert_eq!(
                    got.unwrap_err().code(),
                    tonic::Code::Unavailable,
                    "left {left}"
                ),
            }
        }
        // expired issuer
        assert!(policy().grant(t(NOW), t(0), t(NOW - 5)).is_err());
        // not yet valid issuer
        assert!(
            policy()
                .grant(t(NOW), t(NOW + 5), t(NOW + 86_400 * 9))
                .is_err()
        );
    }

    #[test]
    fn short_lifetimes_work_below_min_lifetime() {
        let mut p = policy();
        p.lifetime = Duration::from_secs(10);
        let g = p.grant(t(NOW), t(0), t(NOW + 600)).unwrap();
        assert_eq!(g.not_after, t(NOW + 10));
        assert!(p.grant(t(NOW), t(0), t(NOW + 9)).is_err());
    }

    #[test]
    fn identity_must_be_in_trust_domain() {
        let p = policy();
        assert!(
            p.identity("a.b.serviceaccount.identity.linkerd.cluster.local")
                .is_ok()
        );
        assert!(matches!(
            p.identity("a.b.serviceaccount.identity.linkerd.example.org"),
            Err(IdentityError::OutsideTrustDomain { .. })
        ));
    }

    proptest! {
        #[test]
        fn leaf_never_outlives_issuer_nor_exceeds_lifetime(
            now in 1_000_000u64..4_000_000_000,
            left in 0u64..(400 * 86_400),
            lifetime in 1u64..(30 * 86_400),
            min in 1u64..(2 * 86_400),
        ) {
            let p = Policy { lifetime: Duration::from_secs(lifetime), min_lifetime: Duration::from_secs(min), ..policy() };
            match p.grant(t(now), t(0), t(now + left)) {
                Ok(g) => {
                    prop_assert!(g.not_after <= t(now + left));
                    prop_assert!(g.not_after <= t(now + lifetime));
                    prop_assert!(g.not_after.duration_since(t(now)).unwrap() >= Duration::from_secs(min.min(lifetime)));
                    prop_assert_eq!(g.not_before, t(now - 20));
                }
                Err(_) => prop_assert!(left < min.min(lifetime)),
            }
        }
    }
}
