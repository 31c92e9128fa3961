//! HTTP/2 from a Linkerd client, served with hyper and forwarded request by request to the app.
//!
//! A request carrying `l5d-orig-proto: HTTP/1.1` (or `HTTP/1.0`) was HTTP/1 at the pod and
//! upgraded by its linkerd2-proxy: the header is removed and the request goes to the app as
//! HTTP/1.x, in origin form (`Host` from `:authority` when absent) or, with `; absolute-form`,
//! in absolute form; bodies stream through (chunked when their length is unknown), trailers
//! too where HTTP/1.1 allows. The response goes back on the stream as HTTP/2 with
//! `l5d-orig-proto` naming the app's version, as linkerd2-proxy answers. Any other request goes
//! to the app as HTTP/2 (prior knowledge). An app that cannot be reached or fails the request
//! gets the client a 502.
//!
//! Connections to the app are pooled per port (and, for HTTP/2 and absolute-form requests, per
//! `:authority`): idle ones are closed after [`POOL_IDLE`], at most [`POOL_MAX_IDLE`] are kept
//! per key. The client connection closes after the idle timeout with no bytes either way; when
//! the proxy stops, it gets a GOAWAY and its streams in flight may finish within the drain
//! timeout.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HOST, HeaderValue, TRANSFER_ENCODING};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::proxy::listener::{self, Shared};
use crate::proxy::metrics::{DirectionMetrics, LinkerdLabels, LinkerdProtocol};

/// The header linkerd2-proxy adds to an HTTP/1 request it carries over HTTP/2.
pub const L5D_ORIG_PROTO: &str = "l5d-orig-proto";

/// Idle pooled app connections are closed after this.
pub const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle pooled app connections kept per key.
pub const POOL_MAX_IDLE: usize = 32;

/// The body of a response sent back to the client.
type Body = Either<Incoming, Full<Bytes>>;

/// One app and the pooled clients that reach it.
#[derive(Clone, Debug)]
pub struct App {
    addr: Arc<str>,
    /// HTTP/1, origin form.
    h1: Client<AppConnector, Incoming>,
    /// HTTP/1, absolute form (the connector marks its connections as proxied, which makes the
    /// client keep the absolute URI).
    h1_absolute: Client<AppConnector, Incoming>,
    /// HTTP/2, prior knowledge.
    h2: Client<AppConnector, Incoming>,
}

impl App {
    /// Clients for the app at `addr` (`host:port`).
    pub fn new(addr: &str, connect_timeout: Duration) -> Self {
        let addr: Arc<str> = addr.into();
        let connector = |absolute| AppConnector {
            addr: addr.clone(),
            timeout: connect_timeout,
            absolute,
        };
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_max_idle_per_host(POOL_MAX_IDLE);
            b
        };
        Self {
            h1: builder().build(connector(false)),
            h1_absolute: builder().build(connector(true)),
            h2: builder().http2_only(true).build(connector(false)),
            addr,
        }
    }

    /// The app's `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// Serves `io` as an HTTP/2 connection whose requests go to `app`, until the client closes it,
/// it idles for the idle timeout, or the connection is cut.
pub async fn serve<S>(
    io: S,
    app: &App,
    shared: &Shared,
    dm: &DirectionMetrics,
    client_id: &str,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(AtomicBool::new(false));
    let io = listener::Counted::new(io, dm.bytes.clone(), activity.clone());
    let counter = |protocol| {
        shared
            .metrics
            .linkerd_requests
            .get_or_create_owned(&LinkerdLabels {
                protocol,
                client_id: client_id.to_string(),
            })
    };
    let ctx = Arc::new(Ctx {
        app: app.clone(),
        downgraded: counter(LinkerdProtocol::Http1Downgraded),
        http2: counter(LinkerdProtocol::Http2),
    });
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut stop = shared.stop.clone();
    let idle = listener::idle_watch(&activity, shared.limits.idle_timeout);
    let mut idle = std::pin::pin!(idle);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(error) = r {
                    tracing::debug!(%peer, %error, "linkerd HTTP/2 connection ended with an error");
                }
                return;
            }
            () = idle.as_mut() => {
                tracing::debug!(%peer, "linkerd HTTP/2 connection idle: closed");
                return;
            }
            // At shutdown: GOAWAY, streams in flight finish (until the drain timeout cuts).
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

struct Ctx {
    app: App,
    downgraded: Counter,
    http2: Counter,
}

impl Ctx {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let orig = req.headers_mut().remove(L5D_ORIG_PROTO);
        let target = orig.as_ref().and_then(|v| downgrade_target(v.as_bytes()));
        if orig.is_some() && target.is_none() {
            tracing::debug!(value = ?orig, "unknown l5d-orig-proto: forwarding as HTTP/2");
        }
        let result = match target {
            Some((version, absolute)) => {
                self.downgraded.inc();
                *req.version_mut() = version;
                // Linkerd drops it on the way up; HTTP/1 framing is the client's to choose.
                req.headers_mut().remove(TRANSFER_ENCODING);
                if let Some(authority) = req.uri().authority() {
                    let host = HeaderValue::from_str(authority.as_str());
                    if let (false, Ok(host)) = (req.headers().contains_key(HOST), host) {
                        req.headers_mut().insert(HOST, host);
                    }
                }
                if absolute {
                    self.app.h1_absolute.request(req).await
                } else {
                    // One pool for every origin-form request: the authority is in `Host`.
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    match Uri::try_from(format!("http://{}{path}", self.app.addr)) {
                        Ok(uri) => *req.uri_mut() = uri,
                        Err(e) => return bad_gateway(&e),
                    }
                    self.app.h1.request(req).await
                }
                .map(|mut rsp| {
                    let orig = match rsp.version() {
                        Version::HTTP_10 => "HTTP/1.0",
                        _ => "HTTP/1.1",
                    };
                    rsp.headers_mut()
                        .insert(L5D_ORIG_PROTO, HeaderValue::from_static(orig));
                    rsp.headers_mut().remove(TRANSFER_ENCODING);
                    *rsp.version_mut() = Version::HTTP_2;
                    rsp
                })
            }
            None => {
                self.http2.inc();
                self.app.h2.request(req).await
            }
        };
        match result {
            Ok(rsp) => rsp.map(Either::Left),
            Err(e) => bad_gateway(&e),
        }
    }
}

/// The HTTP/1 version (and whether the target was in absolute form) an `l5d-orig-proto`
/// value names; `None` for a value linkerd2-proxy does not write.
fn downgrade_target(value: &[u8]) -> Option<(Version, bool)> {
    let version = if value.starts_with(b"HTTP/1.1") {
        Version::HTTP_11
    } else if value.starts_with(b"HTTP/1.0") {
        Version::HTTP_10
    } else {
        return None;
    };
    let absolute = value[8..]
        .split(|b| *b == b';')
        .any(|p| p.trim_ascii() == b"absolute-form");
    Some((version, absolute))
}

fn bad_gateway(error: &dyn std::fmt::Display) -> Response<Body> {
    tracing::warn!(%error, "app request failed: answering 502");
    let mut rsp = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"mtls-proxy: the app could not be reached or failed the request\n",
    ))));
    *rsp.status_mut() = StatusCode::BAD_GATEWAY;
    rsp
}

/// Dials the one app whatever the request's URI says.
#[derive(Clone, Debug)]
struct AppConnector {
    addr: Arc<str>,
    timeout: Duration,
    absolute: bool,
}

impl tower::Service<Uri> for AppConnector {
    type Response = AppConn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<AppConn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, timeout, absolute) = (self.addr.clone(), self.timeout, self.absolute);
        Box::pin(async move {
            let tcp = listener::connect(&addr, timeout).await?;
            Ok(AppConn {
                io: TokioIo::new(tcp),
                absolute,
            })
        })
    }
}

/// A connection to the app.
struct AppConn {
    io: TokioIo<TcpStream>,
    absolute: bool,
}

impl Connection for AppConn {
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.absolute)
    }
}

impl hyper::rt::Read for AppConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for AppConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orig_proto_values_as_linkerd_writes_them() {
        assert_eq!(
            downgrade_target(b"HTTP/1.1"),
            Some((Version::HTTP_11, false))
        );
        assert_eq!(
            downgrade_target(b"HTTP/1.0"),
            Some((Version::HTTP_10, false))
        );
        assert_eq!(
            downgrade_target(b"HTTP/1.1; absolute-form"),
            Some((Version::HTTP_11, true))
        );
        assert_eq!(
            downgrade_target(b"HTTP/1.0; absolute-form"),
            Some((Version::HTTP_10, true))
        );
        assert_eq!(downgrade_target(b"HTTP/2"), None);
        assert_eq!(downgrade_target(b""), None);
    }
}
