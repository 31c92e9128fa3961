//! Authenticator `kubernetes`: the request's token is a Kubernetes service-account token,
//! checked with a TokenReview (`authentication.k8s.io/v1`) for the configured audiences
//! (default Linkerd's `identity.l5d.io`).
//!
//! - An authenticated `system:serviceaccount:<ns>:<sa>` maps to
//!   `<sa>.<ns>.serviceaccount.identity.linkerd.<trust-domain>`, which must be the identity
//!   asked for: otherwise PERMISSION_DENIED. A review that does not authenticate the token
//!   (or authenticates it for none of our audiences, or as a user that is no service
//!   account) is UNAUTHENTICATED. An API server that cannot be reached or refuses the review
//!   is UNAVAILABLE: never a certificate.
//! - Only tokens shaped like a JWT (three base64url parts separated by dots) are reviewed;
//!   anything else (a bootstrap token: those start with `l5dh_` and never contain a dot) is
//!   left to the other authenticators, so it never reaches the API server.
//! - Reviews are rate limited per source (IPv4 address, IPv6 /64) before they are made, so a
//!   stranger's random tokens do not become API-server load or audit-log lines.
//! - Outcomes (authenticated as whom, or refused) are cached for `review_cache`, keyed by the
//!   token's SHA-256, never the token; an unreachable API server is not cached.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;
use proxy_lib::clock::SharedClock;
use proxy_lib::identity::{Identity, TrustDomain};
use sha2::{Digest, Sha256};

use crate::auth::{AuthRequest, Authenticator, Principal};
use crate::error::AuthError;

/// Linkerd's audience for the tokens its proxies present.
pub const DEFAULT_AUDIENCE: &str = "identity.l5d.io";
/// How long a review's outcome is reused by default.
pub const DEFAULT_REVIEW_CACHE: Duration = Duration::from_secs(10);
/// The longest `review_cache` accepted.
pub const MAX_REVIEW_CACHE: Duration = Duration::from_secs(300);
/// A review that takes longer than this counts as the API server being unreachable.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Reviews a source may cause in a burst.
pub const REVIEW_BURST_PER_SOURCE: u32 = 20;
/// Reviews per minute a source may cause after its burst.
pub const REVIEWS_PER_MINUTE_PER_SOURCE: u32 = 60;
/// Outcomes cached at most (expired ones are dropped first, then the cache is emptied).
pub const MAX_CACHED: usize = 8192;

const SA_PREFIX: &str = "system:serviceaccount:";

/// What the `kubernetes` authenticator is configured with (`[auth] kubernetes = true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewConfig {
    /// The audiences a token must be valid for (any of them).
    pub audiences: Vec<String>,
    /// How long an outcome is reused (zero: never).
    pub cache: Duration,
}

impl Default for ReviewConfig {
    fn default() -> Self {
        Self {
            audiences: vec![DEFAULT_AUDIENCE.to_string()],
            cache: DEFAULT_REVIEW_CACHE,
        }
    }
}

/// Whether `token` looks like a JWT: three non-empty base64url parts separated by dots.
/// Nothing else is ever sent to the API server.
pub fn is_jwt_shaped(token: &[u8]) -> bool {
    let parts: Vec<&[u8]> = token.split(|b| *b == b'.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        })
}

/// The service account (namespace, name) of a Kubernetes user name
/// `system:serviceaccount:<ns>:<sa>`.
pub fn service_account_of(username: &str) -> Option<(&str, &str)> {
    let (ns, sa) = username.strip_prefix(SA_PREFIX)?.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
}

/// What a review decided about one token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Authenticated as this service account.
    ServiceAccount { namespace: String, name: String },
    /// Not authenticated, with the reason.
    Refused(String),
}

#[derive(Debug)]
struct Cached {
    until: SystemTime,
    outcome: Outcome,
}

/// The `kubernetes` authenticator (see the module documentation).
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    config: ReviewConfig,
    trust_domain: TrustDomain,
    control_plane_namespace: String,
    clock: SharedClock,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    limiter: DefaultKeyedRateLimiter<Option<IpAddr>>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("config", &self.config)
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl TokenReviewAuthenticator {
    /// Reviews through `client`; identities are those of `trust_domain` with the control
    /// plane in `control_plane_namespace`; cache expiry judged by `clock`.
    pub fn new(
        client: kube::Client,
        config: ReviewConfig,
        trust_domain: TrustDomain,
        control_plane_namespace: impl Into<String>,
        clock: SharedClock,
    ) -> Self {
        let per_minute = NonZeroU32::new(REVIEWS_PER_MINUTE_PER_SOURCE).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(REVIEW_BURST_PER_SOURCE).unwrap_or(NonZeroU32::MIN);
        Self {
            api: Api::all(client),
            config,
            trust_domain,
            control_plane_namespace: control_plane_namespace.into(),
            clock,
            cache: Mutex::new(HashMap::new()),
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
        }
    }

    fn cached(&self, key: &[u8; 32], now: SystemTime) -> Option<Outcome> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|c| now < c.until)
            .map(|c| c.outcome.clone())
    }

    fn remember(&self, key: [u8; 32], outcome: &Outcome, now: SystemTime) {
        if self.config.cache.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| now < c.until);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(
            key,
            Cached {
                until: now + self.config.cache,
                outcome: outcome.clone(),
            },
        );
    }

    /// Whether `peer`'s source may cause one more review now.
    fn admit(&self, peer: Option<IpAddr>) -> bool {
        if self.limiter.len() > MAX_CACHED {
            self.limiter.retain_recent();
        }
        let source = peer.map(proxy_lib::net::caps::source_of);
        self.limiter.check_key(&source).is_ok()
    }

    async fn review(&self, token: &[u8]) -> Result<Outcome, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(self.config.audiences.clone()),
                token: Some(String::from_utf8_lossy(token).into_owned()),
            },
            ..TokenReview::default()
        };
        let answer = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.api.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| {
            AuthError::ReviewUnavailable(format!("no answer within {}s", REVIEW_TIMEOUT.as_secs()))
        })?
        .map_err(|e| AuthError::ReviewUnavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let reason = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "token not authenticated".into());
            return Ok(Outcome::Refused(reason));
        }
        let granted = status.audiences.unwrap_or_default();
        if !granted.iter().any(|a| self.config.audiences.contains(a)) {
            return Ok(Outcome::Refused(format!(
                "token is not valid for audience(s) {}",
                self.config.audiences.join(", ")
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        match service_account_of(&username) {
            Some((ns, sa)) => Ok(Outcome::ServiceAccount {
                namespace: ns.to_string(),
                name: sa.to_string(),
            }),
            None => Ok(Outcome::Refused(format!(
                "token authenticates {username:?}, which is not a service account"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    /// A pod's own service-account token needs no ExternalWorkload.
    fn bound(&self) -> bool {
        false
    }

    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Option<Principal>, AuthError> {
        let token = crate::tokens::trim_token(req.token);
        if !is_jwt_shaped(token) {
            return Ok(None);
        }
        let key: [u8; 32] = Sha256::digest(token).into();
        let now = self.clock.now();
        let outcome = match self.cached(&key, now) {
            Some(o) => o,
            None => {
                if !self.admit(req.peer.map(|p| p.ip())) {
                    return Err(AuthError::ReviewsThrottled);
                }
                let o = self.review(token).await?;
                self.remember(key, &o, now);
                o
            }
        };
        let (namespace, name) = match outcome {
            Outcome::Refused(reason) => return Err(AuthError::ReviewRefused(reason)),
            Outcome::ServiceAccount { namespace, name } => (namespace, name),
        };
        let service_account = format!("{SA_PREFIX}{namespace}:{name}");
        let mapped = Identity::new_in(
            &name,
            &namespace,
            &self.control_plane_namespace,
            &self.trust_domain,
        );
        if mapped.ok().as_ref().map(Identity::as_str) != Some(req.identity.as_str()) {
            return Err(AuthError::ServiceAccountMismatch {
                service_account,
                requested: req.identity.to_string(),
            });
        }
        Ok(Some(Principal {
            authenticator: self.name(),
            credential: format!("serviceaccount:{namespace}:{name}"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_jwt_shaped_tokens_are_reviewed() {
        assert!(is_jwt_shaped(
            b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_"
        ));
        for t in [
            &b""[..],
            b"l5dh_0123abcd",
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            b"a.b",
            b"a.b.c.d",
            b"a..c",
            b"a.b=.c",
            b"a.b c.d",
        ] {
            assert!(!is_jwt_shaped(t), "{}", String::from_utf8_lossy(t));
        }
    }

    #[test]
    fn service_account_user_names_are_parsed() {
        assert_eq!(
            service_account_of("system:serviceaccount:emojivoto:web"),
            Some(("emojivoto", "web"))
        );
        for u in [
            "system:serviceaccount:emojivoto",
            "system:serviceaccount::web",
            "system:serviceaccount:a:b:c",
            "system:node:n1",
            "alice",
        ] {
            assert_eq!(service_account_of(u), None, "{u}");
        }
    }
}
