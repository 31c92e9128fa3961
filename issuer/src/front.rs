//! The front of the Identity service: what happens to a request before (and instead of) the
//! Certify handler.
//!
//! - A source that has failed too often is refused RESOURCE_EXHAUSTED before its request is
//!   even decoded.
//! - A request the gRPC layer cannot decode never reaches the handler; its answer is mapped
//!   to the documented codes (a message over the decoder's size limit: RESOURCE_EXHAUSTED,
//!   not OUT_OF_RANGE; bytes that are not a CertifyRequest: INVALID_ARGUMENT, not INTERNAL)
//!   and audited like any other refusal, and it counts as a failure of its source.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use linkerd2_proxy_api::identity::identity_server::IdentityServer;
use tonic::Code;
use tonic::codegen::{Body, Service, StdError, http};
use tonic::server::NamedService;

use crate::audit::AuditEvent;
use crate::error::RequestError;
use crate::service::{CertifyService, PeerInfo, Shared};

/// The Identity service behind its front.
#[derive(Debug, Clone)]
pub struct Front {
    inner: IdentityServer<CertifyService>,
    shared: Arc<Shared>,
    /// The decoder's size limit, for messages.
    max_message_bytes: usize,
}

impl Front {
    /// The service over `shared`; messages over `max_message_bytes` are refused undecoded.
    pub fn new(shared: Arc<Shared>, max_message_bytes: usize) -> Self {
        let inner = IdentityServer::new(CertifyService::new(shared.clone()))
            .max_decoding_message_size(max_message_bytes);
        Self {
            inner,
            shared,
            max_message_bytes,
        }
    }
}

impl NamedService for Front {
    const NAME: &'static str = <IdentityServer<CertifyService> as NamedService>::NAME;
}

type Response = http::Response<tonic::body::Body>;

impl<B> Service<http::Request<B>> for Front
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<B>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let source = peer.addr.map(|a| a.ip());
        let shared = self.shared.clone();
        if source.is_some_and(|ip| !shared.throttle.allows(ip)) {
            shared.metrics.certify(
                RequestError::Throttled.result_label(),
                started.elapsed().as_secs_f64(),
            );
            if let Some(suppressed) = shared.throttled_log.admit() {
                tracing::warn!(peer = ?peer.addr, suppressed, "requests throttled after repeated failures");
            }
            return Box::pin(async { Ok(RequestError::Throttled.to_status().into_http()) });
        }
        let max = self.max_message_bytes;
        let fut = Service::call(&mut self.inner, req);
        Box::pin(async move {
            let res = fut.await?;
            let Some(status) = tonic::Status::from_header_map(res.headers()) else {
                return Ok(res);
            };
            let mapped = match status.code() {
                // The decoder's size limit: the handler never saw the request.
                Code::OutOfRange => RequestError::MessageTooLarge { max },
                // Bytes that are not a CertifyRequest (prost's decode error).
                Code::Internal if status.message().starts_with("failed to decode") => {
                    RequestError::MalformedRequest(status.message().to_string())
                }
                _ => return Ok(res),
            };
            if let Some(ip) = source {
                shared.throttle.failed(ip);
            }
            let reason = mapped.to_string();
            let event = AuditEvent {
                time: proxy_lib::clock::rfc3339(shared.clock.now()),
                decision: "refused",
                identity: "",
                peer: peer.addr.map(|a| a.to_string()),
                authenticator: None,
                credential: None,
                serial: None,
                sha256: None,
                not_after: None,
                code: Some(mapped.result_label()),
                reason: Some(crate::audit::truncate(&reason, crate::audit::MAX_FIELD_CHARS).into()),
            };
            if let Err(failure) = shared.audit.record_refused(&event).await {
                shared.metrics.audit_failure(failure.label());
            }
            shared
                .metrics
                .certify(mapped.result_label(), started.elapsed().as_secs_f64());
            tracing::debug!(error = %reason, peer = ?peer.addr, "certify refused undecoded");
            Ok(mapped.to_status().into_http())
        })
    }
}
