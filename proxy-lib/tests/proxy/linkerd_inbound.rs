//! Linkerd inbound mode, driven by a client built to linkerd2-proxy's wire behaviour (its
//! public source: `linkerd/proxy/http/src/orig_proto.rs` upgrades HTTP/1 requests to HTTP/2
//! with prior knowledge and `l5d-orig-proto`; `linkerd/transport-header` writes the opaque
//! transport header after ALPN `transport.l5d.io/v1`), mTLS with SNI = the host's identity.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_lib::identity::Identity;
use proxy_lib::proxy::linkerd::LinkerdListener;
use proxy_lib::test_util::{TestPki, write_data_dir};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

const TRANSPORT_ALPN: &[u8] = b"transport.l5d.io/v1";
/// Logical ports of the opaque apps (what a transport header names).
const PORT_A: u16 = 5432;
const PORT_B: u16 = 6379;
/// The logical port of the HTTP/1 app, for a header with session protocol HTTP/2.
const PORT_HTTP: u16 = 8080;

type ReqBody = BoxBody<Bytes, Infallible>;

/// The session protocol of a transport header.
#[derive(Clone, Copy)]
enum Session {
    Http1,
    Http2,
}

/// A transport header as linkerd2-proxy writes it, encoded by hand: the preface, the message
/// length (u32, big endian) and the protobuf `transport.l5d.io.Header`.
fn transport_header(port: u16, session: Option<Session>) -> Vec<u8> {
    let mut msg = vec![0x08]; // field 1 (port), varint
    let mut p = u32::from(port);
    while p >= 0x80 {
        msg.push((p as u8 & 0x7f) | 0x80);
        p >>= 7;
    }
    msg.push(p as u8);
    if let Some(s) = session {
        // field 3 (session_protocol): a message holding field 1 (http1) or 2 (http2), empty.
        let tag = match s {
            Session::Http1 => 0x0a,
            Session::Http2 => 0x12,
        };
        msg.extend_from_slice(&[0x1a, 2, tag, 0]);
    }
    let mut out = b"transport.l5d.io/v1\r\n\r\n".to_vec();
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    out
}

/// An HTTP/1-only app (hyper's HTTP/1 server refuses HTTP/2 bytes). It answers with what it
/// saw in `x-seen-*` headers; a POST's body is echoed with its trailers' `x-checksum` in
/// `x-seen-trailer`. Counts the connections it accepted.
async fn http1_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let seen = |name: &str| {
                        req.headers()
                            .get(name)
                            .cloned()
                            .unwrap_or(HeaderValue::from_static("-"))
                    };
                    let mut rsp = Response::builder()
                        .header("x-seen-version", format!("{:?}", req.version()))
                        .header("x-seen-target", req.uri().to_string())
                        .header("x-seen-host", seen("host"))
                        .header("x-seen-te", seen("transfer-encoding"))
                        .header("x-seen-length", seen("content-length"))
                        .header("x-seen-orig-proto", seen("l5d-orig-proto"));
                    let post = req.method() == http::Method::POST;
                    let collected = req.into_body().collect().await?;
                    if let Some(t) = collected.trailers().and_then(|t| t.get("x-checksum")) {
                        rsp = rsp.header("x-seen-trailer", t.clone());
                    }
                    let body = if post {
                        collected.to_bytes()
                    } else {
                        Bytes::from_static(b"hello from an HTTP/1.1 app")
                    };
                    Ok::<_, hyper::Error>(rsp.body(Full::new(body)).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// An HTTP/2-only app (prior knowledge) that names the version it saw.
async fn http2_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let rsp = Response::builder()
                        .header("x-seen-version", format!("{:?}", req.version()))
                        .header("x-seen-target", req.uri().to_string())
                        .body(Full::new(Bytes::from_static(b"hello from an HTTP/2 app")))
                        .unwrap();
                    Ok::<_, Infallible>(rsp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An app that says its name, then echoes.
async fn tagged_app(tag: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(tag).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A body sent as separate DATA frames of unknown total length, then trailers: what an
/// upgraded chunked HTTP/1.1 request looks like on the HTTP/2 side.
struct Chunks(VecDeque<Frame<Bytes>>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

struct Setup {
    pki: TestPki,
    server_id: Identity,
    client: proxy_lib::bundle::CertBundle,
    proxy: Running,
    /// The listener of the HTTP port (its own app: the HTTP/1 app).
    http_port: SocketAddr,
    /// The listener of the HTTP/2 app's port.
    h2_port: SocketAddr,
    /// The inbound port for opaque transport (no app of its own).
    inbound_port: SocketAddr,
    h1_conns: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    init();
    let pki = TestPki::new(now());
    let server_id = id("legacy-db", "external");
    let client = leaf(&pki, &id("web", "apps"));
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &server_id));
    let (h1, h1_conns) = http1_app().await;
    let h2 = http2_app().await;
    let (a, b) = (tagged_app(b"A:").await, tagged_app(b"B:").await);
    let mut cfg = config(dir.path());
    let listen = |app: Option<SocketAddr>| LinkerdListener {
        addr: "127.0.0.1:0".parse().unwrap(),
        app: app.map(|a| a.to_string()),
    };
    cfg.linkerd.listen = vec![listen(Some(h1)), listen(Some(h2)), listen(None)];
    cfg.linkerd.apps = [(PORT_A, a), (PORT_B, b), (PORT_HTTP, h1)]
        .into_iter()
        .map(|(p, a)| (p, a.to_string()))
        .collect();
    let proxy = start(&cfg, Arc::new(proxy_lib::clock::SystemClock)).await;
    Setup {
        http_port: proxy.linkerd[0],
        h2_port: proxy.linkerd[1],
        inbound_port: proxy.linkerd[2],
        pki,
        server_id,
        client,
        proxy,
        h1_conns,
        _dir: dir,
    }
}

impl Setup {
    /// The pod proxy's client config: its leaf, our anchors, ALPN transport.l5d.io/v1 when
    /// `opaque`.
    fn client_config(&self, opaque: bool) -> Arc<rustls::ClientConfig> {
        let mut c = (*client_config(&self.pki.anchors(), Some(&self.client))).clone();
        if opaque {
            c.alpn_protocols = vec![TRANSPORT_ALPN.to_vec()];
        }
        Arc::new(c)
    }

    async fn tls(
        &self,
        addr: SocketAddr,
        opaque: bool,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        tls_connect_within(addr, self.client_config(opaque), &self.server_id).await
    }

    async fn metrics(&self) -> String {
        metrics_text(self.proxy.admin).await
    }
}

/// An HTTP/2 connection (prior knowledge) over `io`, as the pod's proxy opens one.
async fn h2_over<IO>(io: IO) -> hyper::client::conn::http2::SendRequest<ReqBody>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake through the proxy");
    tokio::spawn(conn);
    send
}

/// A request as linkerd2-proxy's upgrade sends an HTTP/1.1 one (`orig_proto` = the
/// `l5d-orig-proto` value, `None` for a request that was HTTP/2 to begin with).
fn request(method: &str, path: &str, orig_proto: Option<&str>, body: ReqBody) -> Request<ReqBody> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://legacy-db.example:8080{path}"))
        .version(http::Version::HTTP_2);
    if let Some(v) = orig_proto {
        b = b.header("l5d-orig-proto", v);
    }
    b.body(body).unwrap()
}

async fn send(
    h2: &mut hyper::client::conn::http2::SendRequest<ReqBody>,
    req: Request<ReqBody>,
) -> (StatusCode, HeaderMap, Bytes) {
    h2.ready().await.expect("connection ready");
    let rsp = h2.send_request(req).await.expect("response");
    let (parts, body) = rsp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).map_or("", |v| v.to_str().unwrap())
}

const CLIENT: &str = "web.apps.serviceaccount.identity.linkerd.cluster.local";

#[tokio::test]
async fn an_http1_app_answers_downgraded_requests_streams_included() {
    let s = setup().await;
    let mut h2 = h2_over(s.tls(s.http_port, false).await).await;
    let empty = || Full::new(Bytes::new()).boxed();

    // GET: origin form, Host from :authority, header removed, response marked HTTP/1.1.
    let (status, h, body) = send(
        &mut h2,
        request("GET", "/hi?x=1", Some("HTTP/1.1"), empty()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"hello from an HTTP/1.1 app");
    assert_eq!(header(&h, "x-seen-version"), "HTTP/1.1");
    assert_eq!(header(&h, "x-seen-target"), "/hi?x=1");
    assert_eq!(header(&h, "x-seen-host"), "legacy-db.example:8080");
    assert_eq!(header(&h, "x-seen-orig-proto"), "-");
    assert_eq!(header(&h, "l5d-orig-proto"), "HTTP/1.1");

    // POST with a body of unknown length in several frames and trailers: chunked to the app.
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
    let frames = ["first,", "second,", "third"]
        .into_iter()
        .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
        .chain([Frame::trailers(trailers)])
        .collect();
    let mut req = request("POST", "/upload", Some("HTTP/1.1"), Chunks(frames).boxed());
    req.headers_mut()
        .insert("trailer", HeaderValue::from_static("x-checksum"));
    let (status, h, body) = send(&mut h2, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"first,second,third");
    assert_eq!(header(&h, "x-seen-te"), "chunked");
    assert_eq!(header(&h, "x-seen-trailer"), "abc123");

    // POST 1 MiB with a length: every byte arrives and comes back.
    let big: Vec<u8> = (0..1_048_576u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut req = request(
        "POST",
        "/big",
        Some("HTTP/1.1"),
        Full::new(Bytes::from(big.clone())).boxed(),
    );
    req.headers_mut()
        .insert("content-length", HeaderValue::from(big.len()));
    let (status, h, body) = send(&mut h2, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&h, "x-seen-length"), "1048576");
    assert!(body[..] == big[..], "1 MiB body changed on the way");

    // Absolute form stays absolute; HTTP/1.0 stays 1.0.
    let (_, h, _) = send(
        &mut h2,
        request("GET", "/abs", Some("HTTP/1.1; absolute-form"), empty()),
    )
    .await;
    assert_eq!(
        header(&h, "x-seen-target"),
        "http://legacy-db.example:8080/abs"
    );
    let (_, h, _) = send(&mut h2, request("GET", "/old", Some("HTTP/1.0"), empty())).await;
    assert_eq!(header(&h, "x-seen-version"), "HTTP/1.0");

    // Connections to the app are reused across requests.
    for _ in 0..10 {
        let (status, _, _) = send(&mut h2, request("GET", "/", Some("HTTP/1.1"), empty())).await;
        assert_eq!(status, StatusCode::OK);
    }
    let conns = s.h1_conns.load(Ordering::SeqCst);
    assert!(conns <= 4, "{conns} app connections for 15 requests");

    // Plain HTTP/1.1 (no HTTP/2 preface) still flows as bytes through the same listener.
    let mut tls = s.tls(s.http_port, false).await;
    tls.write_all(b"GET /plain HTTP/1.1\r\nhost: legacy-db\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut back = Vec::new();
    tls.read_to_end(&mut back).await.unwrap();
    drop(tls);
    let back = String::from_utf8_lossy(&back);
    assert!(back.starts_with("HTTP/1.1 200"), "{back}");
    assert!(back.contains("x-seen-target: /plain"), "{back}");

    let text = s.metrics().await;
    let sample = |what: &str, protocol: &str| {
        format!(
            r#"proxy_linkerd_inbound_{what}_total{{protocol="{protocol}",client_id="{CLIENT}"}}"#
        )
    };
    assert_eq!(
        metric(&text, &sample("requests", "http1_downgraded")),
        15.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, &sample("connections", "http2")),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, &sample("connections", "tcp")), 1.0, "{text}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn an_http2_app_gets_http2_and_an_http1_app_refuses_it_with_a_502() {
    let s = setup().await;
    let mut h2 = h2_over(s.tls(s.h2_port, false).await).await;
    let empty = || Full::new(Bytes::new()).boxed();
    let (status, h, body) = send(&mut h2, request("GET", "/grpc", None, empty())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"hello from an HTTP/2 app");
    assert_eq!(header(&h, "x-seen-version"), "HTTP/2.0");
    assert_eq!(
        header(&h, "x-seen-target"),
        "http://legacy-db.example:8080/grpc"
    );
    assert_eq!(header(&h, "l5d-orig-proto"), "");

    // HTTP/2 without the downgrade header to the HTTP/1-only app: a clean 502, not a hang.
    let mut h2 = h2_over(s.tls(s.http_port, false).await).await;
    let (status, _, _) = send(&mut h2, request("GET", "/", None, empty())).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    let text = s.metrics().await;
    let sample =
        format!(r#"proxy_linkerd_inbound_requests_total{{protocol="http2",client_id="{CLIENT}"}}"#);
    assert_eq!(metric(&text, &sample), 2.0, "{text}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn opaque_transport_routes_by_the_header_port_through_one_listener() {
    let s = setup().await;
    for (port, tag) in [(PORT_A, "A:"), (PORT_B, "B:")] {
        let tls = s.tls(s.inbound_port, true).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(TRANSPORT_ALPN));
        let mut bytes = transport_header(port, None);
        bytes.extend_from_slice(b"ping");
        let back = round_trip(tls, &bytes).await.unwrap();
        assert_eq!(back, format!("{tag}ping").as_bytes(), "port {port}");
    }
    // Session protocol HTTP/1 is forwarded as bytes.
    let mut bytes = transport_header(PORT_A, Some(Session::Http1));
    bytes.extend_from_slice(b"GET");
    let back = round_trip(s.tls(s.inbound_port, true).await, &bytes)
        .await
        .unwrap();
    assert_eq!(back, b"A:GET");

    // Session protocol HTTP/2: the rest is HTTP/2, downgraded for the HTTP/1 app.
    let mut tls = s.tls(s.inbound_port, true).await;
    tls.write_all(&transport_header(PORT_HTTP, Some(Session::Http2)))
        .await
        .unwrap();
    let mut h2 = h2_over(tls).await;
    let req = request(
        "GET",
        "/via-gateway",
        Some("HTTP/1.1"),
        Full::new(Bytes::new()).boxed(),
    );
    let (status, h, _) = send(&mut h2, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&h, "x-seen-target"), "/via-gateway");

    let opaque = format!(
        r#"proxy_linkerd_inbound_connections_total{{protocol="opaque",client_id="{CLIENT}"}}"#
    );
    assert_eq!(metric(&s.metrics().await, &opaque), 4.0);
    s.proxy.stop().await;
}

/// Sends `bytes` after the handshake and expects the proxy to close without a byte back.
async fn closed_after(s: &Setup, opaque: bool, bytes: &[u8], half_close: bool) {
    let mut tls = s.tls(s.inbound_port, opaque).await;
    // The proxy may have closed already (a refusal right after the handshake).
    let _ = tls.write_all(bytes).await;
    if half_close {
        let _ = tls.shutdown().await;
    }
    let mut back = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut back),
    )
    .await
    .expect("the proxy closes the connection");
    // A reset or a clean close: either way nothing reached an app.
    assert!(read.is_err() || back.is_empty(), "got {back:?}");
}

#[tokio::test]
async fn bad_or_unrouted_transport_headers_are_refused_and_counted() {
    let s = setup().await;
    let refused =
        |reason: &str| format!(r#"proxy_linkerd_inbound_refused_total{{reason="{reason}"}}"#);

    // A port with no app.
    closed_after(&s, true, &transport_header(7000, None), false).await;
    wait_metric(s.proxy.admin, &refused("unknown_port"), 1.0).await;
    // No ALPN on the inbound port, which has no app of its own.
    closed_after(&s, false, b"hello", false).await;
    wait_metric(s.proxy.admin, &refused("unknown_port"), 2.0).await;

    // Truncated: the client half-closes inside the message.
    let h = transport_header(PORT_A, None);
    closed_after(&s, true, &h[..h.len() - 1], true).await;
    wait_metric(s.proxy.admin, &refused("bad_header"), 1.0).await;
    // A 1 MiB length: refused at once, without waiting for the message.
    let mut huge = b"transport.l5d.io/v1\r\n\r\n".to_vec();
    huge.extend_from_slice(&(1u32 << 20).to_be_bytes());
    closed_after(&s, true, &huge, false).await;
    wait_metric(s.proxy.admin, &refused("bad_header"), 2.0).await;
    // Not a header at all.
    closed_after(&s, true, b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxxxx", false).await;
    let text = wait_metric(s.proxy.admin, &refused("bad_header"), 3.0).await;
    let opaque = format!(
        r#"proxy_linkerd_inbound_connections_total{{protocol="opaque",client_id="{CLIENT}"}}"#
    );
    assert_eq!(metric(&text, &opaque), 0.0, "{text}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_foreign_sni_is_refused_and_the_client_check_is_unchanged() {
    let s = setup().await;
    let handshakes = |result: &str| {
        format!(r#"proxy_tls_handshakes_total{{direction="inbound",result="{result}"}}"#)
    };
    let port = s.http_port;
    let connect = |name: ServerName<'static>, config: Arc<rustls::ClientConfig>| async move {
        let tcp = TcpStream::connect(port).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        // The proxy refuses a client only after its own handshake finished: ask for a byte.
        tls.write_all(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map(|_| ())
    };
    // Another workload's identity as SNI: no handshake at all.
    let other = ServerName::try_from(id("other", "external").to_string()).unwrap();
    assert!(connect(other, s.client_config(false)).await.is_err());
    wait_metric(s.proxy.admin, &handshakes("foreign_sni"), 1.0).await;
    // No SNI (the client dialled an IP address): refused the same way.
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    assert!(connect(ip, s.client_config(false)).await.is_err());
    wait_metric(s.proxy.admin, &handshakes("foreign_sni"), 2.0).await;

    // Our SNI, then the usual client checks.
    let ours = ServerName::try_from(s.server_id.to_string()).unwrap();
    let no_cert = client_config(&s.pki.anchors(), None);
    assert!(connect(ours.clone(), no_cert).await.is_err());
    wait_metric(s.proxy.admin, &handshakes("no_client_cert"), 1.0).await;
    let foreign = leaf(&TestPki::new(now()), &id("web", "apps"));
    let untrusted = client_config(&s.pki.anchors(), Some(&foreign));
    assert!(connect(ours.clone(), untrusted).await.is_err());
    wait_metric(s.proxy.admin, &handshakes("untrusted"), 1.0).await;
    connect(ours, s.client_config(false))
        .await
        .expect("our SNI and a mesh client: served");
    wait_metric(s.proxy.admin, &handshakes("ok"), 1.0).await;
    s.proxy.stop().await;
}
