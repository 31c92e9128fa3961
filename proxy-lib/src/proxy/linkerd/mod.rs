//! Linkerd inbound mode: mtls-proxy as the host side of Linkerd's mesh expansion, in place of a
//! linkerd2-proxy on a host registered as an `ExternalWorkload`.
//!
//! Meshed pods reach such a host through their own linkerd2-proxy, which dials it the way
//! Linkerd's destination service describes an `ExternalWorkload`: TLS with SNI = the host's
//! identity (`meshTLS.serverName`), and then
//! - for an HTTP port (protocol hint H2): the app port itself, HTTP/2 with prior knowledge; an
//!   HTTP/1 request from the pod's app is upgraded and carries `l5d-orig-proto: HTTP/1.1`
//!   (`; absolute-form` when its target was an absolute URI);
//! - for an opaque port: the host's inbound port (4143), ALPN `transport.l5d.io/v1`, and a
//!   transport header naming the target port before the app's bytes.
//!
//! A Linkerd-mode listener ([`LinkerdInbound::listen`], `LISTEN[=APP]`) serves both:
//! 1. The ClientHello's SNI must be one of the served leaf's identities (DNS SANs), else the
//!    connection is closed before any handshake (`proxy_tls_handshakes_total{result=
//!    "foreign_sni"}`); a ClientHello without SNI is refused the same way. The client
//!    certificate is then required and checked as on every inbound listener (anchors,
//!    `allow_client`).
//! 2. ALPN `transport.l5d.io/v1` is answered when offered. Such a connection must start with a
//!    transport header ([`header`]); its port picks the app from [`LinkerdInbound::apps`] (an
//!    unknown port closes the connection), its session protocol HTTP/2 makes the rest an HTTP/2
//!    connection served as in 3, anything else is forwarded byte for byte.
//! 3. Without the ALPN, the app is the listener's own (`LISTEN=APP`), or else the one
//!    [`LinkerdInbound::apps`] gives its port (a listener with neither refuses). Bytes starting with the
//!    HTTP/2 connection preface are served as HTTP/2 ([`http`]): each request goes to the app
//!    as HTTP/1.1 (or 1.0) when it carries `l5d-orig-proto`, as HTTP/2 otherwise. Anything else
//!    (HTTP/1.1, other protocols) is forwarded byte for byte, as on a plain inbound listener.
//!    The first bytes are awaited at most the handshake timeout; a protocol whose server speaks
//!    first belongs on an opaque port (2), where nothing is awaited.

pub mod header;
pub mod http;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::listener::{self, Shared};
use crate::proxy::metrics::{
    Direction, DirectionMetrics, HandshakeResult, LinkerdLabels, LinkerdProtocol, LinkerdRefusal,
};
use crate::tls::ClientHello;

/// The ALPN protocol of Linkerd's opaque transport (a transport header follows the handshake).
pub const TRANSPORT_ALPN: &[u8] = b"transport.l5d.io/v1";

/// The HTTP/2 connection preface a client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One Linkerd inbound listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkerdListener {
    /// Address to listen on: the host's inbound port (Linkerd's default is 4143) for opaque
    /// ports, or an HTTP port the `ExternalWorkload` declares.
    pub addr: SocketAddr,
    /// The app of connections without a transport header (`None`: the app
    /// [`LinkerdInbound::apps`] gives this listener's port, if any).
    pub app: Option<String>,
}

/// The Linkerd inbound listeners and the apps behind them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkerdInbound {
    /// The listeners.
    pub listen: Vec<LinkerdListener>,
    /// The app of each port a client may target (the port it dialled, or the one its
    /// transport header names): port → `host:port`.
    pub apps: BTreeMap<u16, String>,
}

impl LinkerdInbound {
    /// Whether the mode is on (any listener).
    pub fn is_enabled(&self) -> bool {
        !self.listen.is_empty()
    }

    /// Validates the `linkerd_inbound` (`LISTEN_IP:PORT[=APP_HOST:PORT]`) and `linkerd_app`
    /// (`PORT=APP_HOST:PORT`) entries; each problem goes to `bad`.
    pub fn parse(listen: &[String], apps: &[String], bad: &mut Vec<String>) -> Self {
        use crate::proxy::config::{parse_host_port, parse_listen};
        let mut out = Self::default();
        for l in listen {
            let (addr, app) = match l.split_once('=') {
                Some((addr, app)) => (addr, Some(app)),
                None => (l.as_str(), None),
            };
            let parsed = parse_listen(addr).and_then(|addr| {
                let app = app.map(parse_host_port).transpose()?;
                Ok(LinkerdListener { addr, app })
            });
            match parsed {
                Ok(l) => out.listen.push(l),
                Err(e) => bad.push(format!("linkerd_inbound {l:?}: {e}")),
            }
        }
        for a in apps {
            let parsed = a
                .split_once('=')
                .ok_or_else(|| "want PORT=APP_HOST:PORT".to_string())
                .and_then(|(port, app)| {
                    let port = port
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| format!("port {port:?} must be 1..65535"))?;
                    Ok((port, parse_host_port(app)?))
                });
            match parsed {
                Ok((port, app)) => {
                    if out.apps.insert(port, app).is_some() {
                        bad.push(format!("linkerd_app {a:?}: port {port} is given twice"));
                    }
                }
                Err(e) => bad.push(format!("linkerd_app {a:?}: {e}")),
            }
        }
        if listen.is_empty() && !apps.is_empty() {
            bad.push("linkerd_app given without any linkerd_inbound listener".into());
        }
        if !listen.is_empty() && apps.is_empty() && out.listen.iter().all(|l| l.app.is_none()) {
            bad.push(
                "linkerd_inbound has no app: give linkerd_app (PORT=APP_HOST:PORT) or \
                 LISTEN=APP_HOST:PORT"
                    .into(),
            );
        }
        out
    }
}

/// What the Linkerd listeners share: the app of each port and its HTTP clients.
#[derive(Debug, Clone)]
pub struct Routes(Arc<BTreeMap<u16, http::App>>);

impl Routes {
    /// The routes of `config`, with HTTP clients that connect within `connect_timeout`.
    pub fn new(config: &LinkerdInbound, connect_timeout: Duration) -> Self {
        Self(Arc::new(
            config
                .apps
                .iter()
                .map(|(port, app)| (*port, http::App::new(app, connect_timeout)))
                .collect(),
        ))
    }

    fn get(&self, port: u16) -> Option<&http::App> {
        self.0.get(&port)
    }

    /// The app of connections without a header on `listener`, now bound to `own_port`.
    pub fn default_app(
        &self,
        listener: &LinkerdListener,
        own_port: u16,
        connect_timeout: Duration,
    ) -> Option<http::App> {
        match &listener.app {
            Some(app) => Some(http::App::new(app, connect_timeout)),
            None => self.get(own_port).cloned(),
        }
    }
}

/// Accepts connections on `listener` in Linkerd mode until `stop` turns true: with a
/// transport header they go to the app `routes` gives its port, without one to `default`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: Routes,
    default: Option<http::App>,
    shared: Shared,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let dm = shared.metrics.direction(Direction::Inbound);
    let caps = Some(shared.pending.clone());
    listener::accept_loop(
        listener,
        shared.clone(),
        stop,
        caps,
        move |tcp, peer, pending| {
            let routes = routes.clone();
            let default = default.clone();
            let shared = shared.clone();
            let dm = dm.clone();
            async move { conn(tcp, peer, pending, &routes, default.as_ref(), &shared, &dm).await }
        },
    )
    .await
}

async fn conn(
    tcp: TcpStream,
    peer: SocketAddr,
    pending: Option<crate::net::caps::Slot>,
    routes: &Routes,
    default: Option<&http::App>,
    shared: &Shared,
    dm: &DirectionMetrics,
) {
    let _open = dm.open_connection();
    let Some(creds) = listener::current_credentials(shared, Direction::Inbound, peer) else {
        return;
    };
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout;
    let hello = tokio::time::timeout_at(deadline, ClientHello::read(tcp)).await;
    let hello = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            listener::inbound_handshake_failed(shared, peer, e);
            return;
        }
        Err(_) => {
            listener::inbound_handshake_timed_out(shared, peer);
            return;
        }
    };
    let sni = hello.server_name();
    let ours = sni.as_deref().is_some_and(|s| {
        creds
            .leaf
            .dns_sans
            .iter()
            .any(|d| crate::identity::matches_san(d, s))
    });
    if !ours {
        shared
            .metrics
            .handshake(Direction::Inbound, HandshakeResult::ForeignSni);
        let reason = format!("SNI {sni:?} is not one of this host's identities");
        listener::log_refusal(shared, peer, HandshakeResult::ForeignSni, &reason);
        return;
    }
    let acceptor = if hello.offers_alpn(TRANSPORT_ALPN) {
        &creds.transport_acceptor
    } else {
        &creds.acceptor
    };
    let accepted = tokio::time::timeout_at(deadline, hello.accept(acceptor)).await;
    drop(pending); // the handshake is over, whatever its outcome
    let Some(accepted) = listener::inbound_accepted(shared, peer, accepted) else {
        return;
    };
    drop(creds);
    let client_id = client_identity(accepted.client_chain.as_deref());
    let client_id = shared.metrics.client_ids.label(client_id.as_deref());
    let tls = accepted.stream;
    let opaque = tls.get_ref().1.alpn_protocol() == Some(TRANSPORT_ALPN);
    // Logged at info within the refusal log limit, like refused handshakes.
    let refuse = |reason: LinkerdRefusal, why: &dyn std::fmt::Display| {
        shared.metrics.linkerd_refusal(reason);
        let reason = reason.as_str();
        match shared.refusals.admit() {
            Some(suppressed) => tracing::info!(
                %peer, reason, %why, suppressed, "linkerd inbound connection refused"
            ),
            None => tracing::debug!(%peer, reason, %why, "linkerd inbound connection refused"),
        }
    };
    let count = |protocol: LinkerdProtocol| {
        shared
            .metrics
            .linkerd_connections
            .get_or_create(&LinkerdLabels {
                protocol,
                client_id: client_id.clone(),
            })
            .inc();
    };
    if opaque {
        let mut tls = tls;
        let read = header::read(&mut tls);
        let h = match tokio::time::timeout(shared.limits.handshake_timeout, read).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return refuse(LinkerdRefusal::BadHeader, &e),
            Err(_) => return refuse(LinkerdRefusal::BadHeader, &"no transport header in time"),
        };
        let Some(app) = routes.get(h.port) else {
            let why = format!("transport header names port {}, which has no app", h.port);
            return refuse(LinkerdRefusal::UnknownPort, &why);
        };
        count(LinkerdProtocol::Opaque);
        tracing::debug!(%peer, port = h.port, protocol = ?h.protocol, "transport header");
        if h.protocol == Some(header::SessionProtocol::Http2) {
            http::serve(tls, app, shared, dm, &client_id, peer).await;
        } else {
            listener::forward_to_app(tls, app.addr(), shared, dm, peer).await;
        }
        return;
    }
    let Some(app) = default else {
        let why = "no transport header, and this listener has no app of its own";
        return refuse(LinkerdRefusal::UnknownPort, &why);
    };
    let (first, tls) = sniff(tls, shared.limits.handshake_timeout).await;
    let stream = Prefixed::new(first, tls);
    if stream.prefix == H2_PREFACE {
        count(LinkerdProtocol::Http2);
        http::serve(stream, app, shared, dm, &client_id, peer).await;
    } else {
        count(LinkerdProtocol::Tcp);
        listener::forward_to_app(stream, app.addr(), shared, dm, peer).await;
    }
}

/// The client's identity: its leaf's first DNS SAN.
fn client_identity(
    chain: Option<&Vec<rustls_pki_types::CertificateDer<'static>>>,
) -> Option<String> {
    let leaf = chain?.first()?;
    let info = crate::cert::CertInfo::from_der(leaf).ok()?;
    info.dns_sans
        .first()
        .map(|d| crate::identity::normalize_name(d))
}

/// Reads until the bytes are the HTTP/2 preface, cannot become it, the client half-closes, or
/// `wait` passes; returns what was read.
async fn sniff<S: AsyncRead + Unpin>(mut s: S, wait: Duration) -> (Vec<u8>, S) {
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let read = async {
        while buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) {
            let mut chunk = [0u8; 24];
            let want = H2_PREFACE.len() - buf.len();
            match s.read(&mut chunk[..want]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    (buf, s)
}

/// A stream that yields `prefix` (bytes already read from `inner`) before `inner`'s own.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_entries_are_validated_and_every_problem_reported() {
        let mut bad = Vec::new();
        let c = LinkerdInbound::parse(
            &["0.0.0.0:4143".into(), "127.0.0.1:8080".into()],
            &["8080=127.0.0.1:18080".into(), "5432=localhost:5432".into()],
            &mut bad,
        );
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.listen[1].app, None);
        assert_eq!(c.apps[&8080], "127.0.0.1:18080");
        assert_eq!(c.apps[&5432], "localhost:5432");

        let mut bad = Vec::new();
        LinkerdInbound::parse(
            &["nowhere".into()],
            &[
                "0=127.0.0.1:1".into(),
                "80".into(),
                "81=127.0.0.1:99999".into(),
                "82=127.0.0.1:1".into(),
                "82=127.0.0.1:2".into(),
            ],
            &mut bad,
        );
        let text = bad.join("\n");
        for want in [
            "linkerd_inbound \"nowhere\"",
            "port \"0\" must be 1..65535",
            "want PORT=APP_HOST:PORT",
            "port must be 1..65535",
            "port 82 is given twice",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        let mut bad = Vec::new();
        LinkerdInbound::parse(&[], &["80=127.0.0.1:80".into()], &mut bad);
        assert!(bad[0].contains("without any linkerd_inbound"), "{bad:?}");
        let mut bad = Vec::new();
        LinkerdInbound::parse(&["127.0.0.1:4143".into()], &[], &mut bad);
        assert!(bad[0].contains("has no app"), "{bad:?}");
        let mut bad = Vec::new();
        let c = LinkerdInbound::parse(&["127.0.0.1:8080=127.0.0.1:18080".into()], &[], &mut bad);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(c.listen[0].app.as_deref(), Some("127.0.0.1:18080"));
    }

    #[tokio::test]
    async fn sniff_stops_at_the_preface_or_at_the_first_byte_that_differs() {
        let (mut c, s) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut c, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest")
            .await
            .unwrap();
        let (got, mut s) = sniff(s, Duration::from_secs(5)).await;
        assert_eq!(got, H2_PREFACE);
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");

        let (mut c, s) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut c, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let (got, s) = sniff(s, Duration::from_secs(5)).await;
        assert!(!H2_PREFACE.starts_with(&got) && got.len() < H2_PREFACE.len());
        // Nothing is lost: the prefix comes back first.
        let mut all = Vec::new();
        drop(c);
        Prefixed::new(got, s).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn sniff_gives_up_after_the_wait_keeping_what_came() {
        let (mut c, s) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut c, b"PRI")
            .await
            .unwrap();
        let (got, _s) = sniff(s, Duration::from_secs(10)).await;
        assert_eq!(got, b"PRI");
    }
}
