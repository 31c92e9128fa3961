//! The gRPC `io.linkerd.proxy.identity.Identity/Certify` handler. Thin: size check,
//! identity, authentication, rate and concurrency limits, CSR, signing, then one audit line
//! and the metrics for every decision.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use linkerd2_proxy_api::identity::identity_server::Identity as IdentityApi;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use prost::Message;
use proxy_lib::clock::SharedClock;
use rustls_pki_types::CertificateDer;
use tokio::sync::Semaphore;

use crate::audit::{AuditEvent, AuditLog, MAX_FIELD_CHARS, truncate};
use crate::auth::{AuthChain, AuthRequest, Principal};
use crate::ca::Ca;
use crate::config::Limits;
use crate::error::RequestError;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::signer::{Leaf, LeafKind};
use crate::throttle::FailureThrottle;
use crate::tokens::{Reservation, TokenStore};

/// What the transport knows about the peer; set on every request by the server.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub addr: Option<SocketAddr>,
    /// The client certificate chain, when the peer presented one over TLS.
    pub client_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// State shared by the handler, the reloader and the admin endpoints.
pub struct Shared {
    /// The CA in use; swapped whole on reload.
    pub ca: ArcSwap<Ca>,
    /// Issuing policy.
    pub policy: Policy,
    /// Authenticators.
    pub auth: AuthChain,
    /// Request limits.
    pub limits: Limits,
    /// Rate limiter keyed by credential and peer address.
    pub limiter: DefaultKeyedRateLimiter<(String, Option<IpAddr>)>,
    /// Signings in flight.
    pub signing: Semaphore,
    /// Failed requests per source, checked before authentication.
    pub throttle: FailureThrottle,
    /// At most one "throttled" log line a second.
    pub throttled_log: proxy_lib::net::LogLimit,
    /// Audit sink.
    pub audit: AuditLog,
    /// Metrics.
    pub metrics: Metrics,
    /// Wall clock.
    pub clock: SharedClock,
    /// The issuer certificates whose leaves renew by client certificate; a CA reload
    /// records the new one here.
    pub issuers: Arc<crate::renewal::KnownIssuers>,
    /// The token store, where uses of tokens with a use count are reserved.
    pub tokens: Option<Arc<TokenStore>>,
    /// The issuer's own serving name: never issued to a requester.
    pub serving_name: Option<String>,
    /// With `[auth] external_workloads`: where issuances are queued to be recorded on their
    /// ExternalWorkload.
    pub last_issued: Option<Arc<crate::kubernetes::last_issued::Recorder>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ca", &self.ca.load())
            .field("policy", &self.policy)
            .finish()
    }
}

impl Shared {
    /// Assembles the shared state.
    pub fn new(
        ca: Ca,
        policy: Policy,
        auth: AuthChain,
        limits: Limits,
        audit: AuditLog,
        metrics: Metrics,
        clock: SharedClock,
    ) -> Self {
        let per_minute = limits.per_credential_per_minute;
        let issuers = Arc::new(crate::renewal::KnownIssuers::new(
            ca.cert(),
            crate::renewal::retirement_keep(
                policy.lifetime,
                limits.max_lifetime,
                policy.clock_skew,
            ),
        ));
        metrics
            .ca_expiration
            .set(proxy_lib::clock::unix_secs(ca.window().not_after) as i64);
        Self {
            ca: ArcSwap::from_pointee(ca),
            policy,
            auth,
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(per_minute)),
            signing: Semaphore::new(limits.max_concurrent_signing),
            throttle: FailureThrottle::new(
                limits.failures_per_source_per_minute.get(),
                limits.failures_per_source_per_minute.get(),
            ),
            throttled_log: proxy_lib::net::LogLimit::new(1, std::time::Duration::from_secs(1)),
            limits,
            audit,
            metrics,
            clock,
            issuers,
            tokens: None,
            serving_name: None,
            last_issued: None,
        }
    }

    /// Renewal state: the known issuers (shared with the certificate authenticator), the token
    /// store (for token uses) and the serving name (never issued).
    pub fn with_renewal(
        mut self,
        issuers: Arc<crate::renewal::KnownIssuers>,
        tokens: Arc<TokenStore>,
        serving_name: &str,
    ) -> Self {
        self.issuers = issuers;
        self.tokens = Some(tokens);
        self.serving_name = Some(serving_name.to_string());
        self
    }

    /// Whether the CA in use can issue now (valid, with at least the minimum lifetime left).
    pub fn ca_usable(&self) -> bool {
        let w = self.ca.load().window();
        self.policy
            .check_issuer(self.clock.now(), w.not_before, w.not_after)
            .is_ok()
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct CertifyService {
    shared: Arc<Shared>,
}

impl CertifyService {
    /// A handler over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    async fn decide(
        &self,
        req: &CertifyRequest,
        peer: &PeerInfo,
        principal: &mut Option<Principal>,
    ) -> Result<
        (
            Leaf,
            Arc<Ca>,
            Option<Reservation>,
            proxy_lib::identity::Identity,
        ),
        RequestError,
    > {
        let s = &*self.shared;
        // A throttled source never gets here: the front refuses it before decoding.
        let source = peer.addr.map(|a| a.ip());
        let refused_before_auth = |e: RequestError| {
            if let Some(ip) = source {
                s.throttle.failed(ip);
            }
            e
        };
        let size = req.encoded_len();
        if size > s.limits.max_request_bytes {
            return Err(refused_before_auth(RequestError::RequestTooLarge {
                size,
                max: s.limits.max_request_bytes,
            }));
        }
        let identity = s
            .policy
            .identity(&req.identity)
            .map_err(|e| refused_before_auth(e.into()))?;
        if s.serving_name.as_deref() == Some(identity.as_str()) {
            return Err(refused_before_auth(
                crate::error::AuthError::ServingName(identity.to_string()).into(),
            ));
        }
        let p = s
            .auth
            .authenticate(&AuthRequest {
                identity: &identity,
                token: &req.token,
                peer: peer.addr,
                client_certs: peer.client_certs.as_deref().map(|v| v.as_slice()),
            })
            .await
            .map_err(|e| {
                // The API server being away is not the caller's failure.
                if e.code() == tonic::Code::Unavailable {
                    e.into()
                } else {
                    refused_before_auth(e.into())
                }
            })?;
        let key = (
            p.credential.clone(),
            peer.addr.map(|a| a.ip().to_canonical()),
        );
        let chain_start = crate::renewal::chain_start_for(
            &p,
            peer.client_certs.as_deref().map(|v| v.as_slice()),
            s.clock.now(),
            s.policy.clock_skew,
        );
        let token_id = p.token_id().map(str::to_string);
        *principal = Some(p);
        if s.limiter.check_key(&key).is_err() {
            return Err(RequestError::RateLimited);
        }
        let _permit = s
            .signing
            .try_acquire()
            .map_err(|_| RequestError::Overloaded)?;
        let csr = crate::csr::validate(&req.certificate_signing_request, &identity)?;
        let ca = s.ca.load_full();
        let w = ca.window();
        let grant = s.policy.grant(s.clock.now(), w.not_before, w.not_after)?;
        // A token with a use count is bound to the keys it certifies: the use is reserved
        // now, and given back if nothing is issued.
        let reservation = match (&token_id, &s.tokens) {
            (Some(id), Some(store)) => {
                let key = crate::tokens::key_fingerprint(
                    rcgen::PublicKeyData::subject_public_key_info(&csr.public_key).as_slice(),
                );
                Some(store.reserve(id, &key).await?)
            }
            _ => None,
        };
        match crate::signer::sign_leaf(
            &ca,
            &identity,
            &csr.public_key,
            &grant,
            LeafKind::Renewable(chain_start),
        ) {
            Ok(leaf) => Ok((leaf, ca, reservation, identity)),
            Err(e) => {
                if let (Some(r), Some(store)) = (reservation, &s.tokens) {
                    store.release(r).await;
                }
                Err(e.into())
            }
        }
    }
}

#[tonic::async_trait]
impl IdentityApi for CertifyService {
    async fn certify(
        &self,
        request: tonic::Request<CertifyRequest>,
    ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
        let started = Instant::now();
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let req = request.into_inner();
        let mut principal = None;
        let outcome = self.decide(&req, &peer, &mut principal).await;
        let s = &*self.shared;
        let peer_text = peer.addr.map(|a| a.to_string());
        let identity = truncate(&req.identity, MAX_FIELD_CHARS);
        let mut event = AuditEvent {
            time: proxy_lib::clock::rfc3339(s.clock.now()),
            decision: "issued",
            identity,
            peer: peer_text,
            authenticator: principal.as_ref().map(|p| p.authenticator),
            credential: principal.as_ref().map(|p| p.credential.as_str()),
            serial: None,
            sha256: None,
            not_after: None,
            code: None,
            reason: None,
        };
        match outcome {
            Ok((leaf, ca, reservation, issued_to)) => {
                event.serial = Some(&leaf.serial);
                event.sha256 = Some(&leaf.sha256);
                event.not_after = Some(proxy_lib::clock::rfc3339(leaf.not_after));
                // No record, no certificate.
                if let Err(failure) = s.audit.record_issued(&event).await {
                    if let (Some(r), Some(store)) = (reservation, &s.tokens) {
                        store.release(r).await;
                    }
                    s.metrics.audit_failure(failure.label());
                    s.metrics
                        .certify("unavailable", started.elapsed().as_secs_f64());
                    tracing::error!(%failure, identity = %identity, "certificate withheld: its audit record was not written");
                    return Err(tonic::Status::unavailable(format!(
                        "{failure}; retry later"
                    )));
                }
                if let (Some(r), Some(store)) = (reservation, &s.tokens) {
                    store.commit(r).await;
                }
                s.metrics.certify("issued", started.elapsed().as_secs_f64());
                crate::bundle::count_issued(&s.metrics, &ca);
                if let Some(r) = &s.last_issued {
                    r.issued(&issued_to, peer.addr.map(|a| a.ip()), &leaf.serial);
                }
                tracing::debug!(
                    identity = %identity,
                    serial = %leaf.serial,
                    not_after = %proxy_lib::clock::rfc3339(leaf.not_after),
                    peer = ?peer.addr,
                    "certificate issued"
                );
                Ok(tonic::Response::new(CertifyResponse {
                    leaf_certificate: leaf.der.to_vec(),
                    intermediate_certificates: ca.chain().iter().map(|c| c.to_vec()).collect(),
                    valid_until: Some(leaf.not_after.into()),
                }))
            }
            Err(error) => {
                let status = error.to_status();
                event.decision = "refused";
                event.code = Some(error.result_label());
                // The reason may quote client input (a 60 KB identity): bounded.
                let reason = error.to_string();
                event.reason = Some(truncate(&reason, MAX_FIELD_CHARS).to_string());
                if let Err(failure) = s.audit.record_refused(&event).await {
                    s.metrics.audit_failure(failure.label());
                }
                s.metrics
                    .certify(error.result_label(), started.elapsed().as_secs_f64());
                if status.code() == tonic::Code::Internal {
                    tracing::error!(%error, identity = %identity, "certify failed");
                } else {
                    tracing::debug!(%error, identity = %identity, peer = ?peer.addr, "certify refused");
                }
                Err(status)
            }
        }
    }
}
