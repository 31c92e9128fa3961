//! The trust-bundle gRPC service the issuer serves beside Certify, on the same port and TLS:
//!
//! ```proto
//! syntax = "proto3";
//! package meshcerts.trust.v1;
//!
//! service TrustBundle {
//!   // The issuer's current anchors, with their detached signature when one was published.
//!   rpc Get(GetBundleRequest) returns (Bundle);
//! }
//! message GetBundleRequest {}
//! message Bundle {
//!   repeated bytes anchors = 1; // DER, in bundle order
//!   string signature = 2;       // the text of ca.crt.sig; empty when unsigned
//! }
//! ```
//!
//! The messages, a server over any function that answers `Get`, and the client call, written
//! out here rather than generated (one unary method).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::{Body, Service, StdError, http};
use tonic::server::NamedService;

/// The service's full name.
pub const SERVICE_NAME: &str = "meshcerts.trust.v1.TrustBundle";
/// The path of `Get`.
pub const GET_PATH: &str = "/meshcerts.trust.v1.TrustBundle/Get";
/// The largest answer either side handles (a bundle is a few KiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// `GetBundleRequest`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct GetBundleRequest {}

/// `Bundle`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Bundle {
    /// The anchors, DER, in bundle order.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub anchors: Vec<Vec<u8>>,
    /// The text of the detached signature; empty when the bundle is unsigned.
    #[prost(string, tag = "2")]
    pub signature: String,
}

/// What answers `Get`.
pub type GetFn = Arc<dyn Fn() -> Result<Bundle, tonic::Status> + Send + Sync>;

/// The server: answers `Get` with `get`, anything else UNIMPLEMENTED.
#[derive(Clone)]
pub struct TrustBundleServer {
    get: GetFn,
}

impl std::fmt::Debug for TrustBundleServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundleServer").finish_non_exhaustive()
    }
}

impl TrustBundleServer {
    /// A server answering `Get` with `get`.
    pub fn new(get: GetFn) -> Self {
        Self { get }
    }
}

impl NamedService for TrustBundleServer {
    const NAME: &'static str = SERVICE_NAME;
}

#[derive(Clone)]
struct GetSvc(GetFn);

impl tonic::server::UnaryService<GetBundleRequest> for GetSvc {
    type Response = Bundle;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<Bundle>, tonic::Status>> + Send>>;

    fn call(&mut self, _request: tonic::Request<GetBundleRequest>) -> Self::Future {
        let answer = (self.0)().map(tonic::Response::new);
        Box::pin(std::future::ready(answer))
    }
}

type BoxResponse =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl<B> Service<http::Request<B>> for TrustBundleServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxResponse;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != GET_PATH {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("no such method").into_http())
            });
        }
        let svc = GetSvc(self.get.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.unary(svc, req).await)
        })
    }
}

/// Calls `Get` over `channel`.
pub async fn get<T>(channel: T, timeout: std::time::Duration) -> Result<Bundle, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("transport: {}", e.into())))?;
    let mut req = tonic::Request::new(GetBundleRequest {});
    req.set_timeout(timeout);
    let path = http::uri::PathAndQuery::from_static(GET_PATH);
    grpc.unary(req, path, tonic_prost::ProstCodec::default())
        .await
        .map(tonic::Response::into_inner)
}
