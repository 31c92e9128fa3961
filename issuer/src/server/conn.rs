//! The issuer's connections: accepting them under the per-source and global caps, the TLS
//! handshake, and the stream type tonic serves (plaintext on loopback, or TLS), each held by
//! its slot with its first-request and idle deadlines.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use proxy_lib::net::caps::{Caps, ConnCaps, Guarded};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::transport::server::Connected;

use super::Server;
use crate::config::Limits;
use crate::service::PeerInfo;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default connections tracked at once (handshaking and open); beyond it the quietest is
/// shed (`limits.max_connections`).
pub const MAX_CONNECTIONS: usize = crate::config::DEFAULT_MAX_CONNECTIONS;
/// Default TLS handshakes in progress per source (IPv4 address, IPv6 /64)
/// (`limits.max_pending_per_source`).
pub const MAX_PENDING_PER_SOURCE: usize = crate::config::DEFAULT_MAX_PENDING_PER_SOURCE;
/// Default connections per source (`limits.max_connections_per_source`).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = crate::config::DEFAULT_MAX_CONNECTIONS_PER_SOURCE;
/// How quiet a connection may stay: until its first request (the HTTP/2 preface), and
/// between requests.
pub const CONNECTION_DEADLINES: proxy_lib::net::caps::Deadlines = proxy_lib::net::caps::Deadlines {
    first_byte: Duration::from_secs(10),
    idle: Duration::from_secs(60),
};

/// One accepted connection: plaintext (loopback only) or TLS.
pub enum Conn {
    /// Plaintext.
    Plain(Guarded<TcpStream>, PeerInfo),
    /// TLS.
    Tls(
        Box<Guarded<tokio_rustls::server::TlsStream<TcpStream>>>,
        PeerInfo,
    ),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(_, p) | Conn::Tls(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The issuer's connection caps (see [`proxy_lib::net::caps`]) from its `[limits]`.
pub fn conn_caps(limits: &Limits) -> Caps {
    Caps {
        max_connections: limits.max_connections,
        max_pending_per_source: limits.max_pending_per_source,
        max_connections_per_source: limits.max_connections_per_source,
        exempt: limits.exempt_sources.clone(),
    }
}

pub(super) async fn accept_loop(
    server: Arc<Server>,
    listener: TcpListener,
    tx: mpsc::Sender<io::Result<Conn>>,
    mut stop: watch::Receiver<bool>,
) {
    let caps = ConnCaps::new(conn_caps(&server.config.limits));
    let refusals = proxy_lib::net::LogLimit::new(1, Duration::from_secs(1));
    let metrics = server.shared.metrics.clone();
    loop {
        let Some((tcp, addr)) = proxy_lib::net::accept(&listener, &mut stop).await else {
            return;
        };
        let shed_before = caps.shed_count();
        let slot = match caps.admit(addr.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                metrics.connection_refused(refused.label());
                // One summary line a second at most: a flood must not fill the journal.
                if let Some(suppressed) = refusals.admit() {
                    tracing::warn!(
                        peer = %addr,
                        reason = %refused,
                        suppressed,
                        "connection refused"
                    );
                }
                continue;
            }
        };
        let shed = caps.shed_count() - shed_before;
        if shed > 0 {
            metrics.connections_shed.inc_by(shed);
        }
        let _ = tcp.set_nodelay(true);
        if server.config.plaintext {
            let peer = PeerInfo {
                addr: Some(addr),
                client_certs: None,
            };
            let conn = Guarded::new(tcp, slot, CONNECTION_DEADLINES);
            if tx.send(Ok(Conn::Plain(conn, peer))).await.is_err() {
                return;
            }
            continue;
        }
        let acceptor = server.tls.load_full();
        let tx = tx.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let outcome = tokio::select! {
                r = handshake => r,
                _ = slot.shed() => {
                    tracing::debug!(peer = %addr, "tls handshake shed to make room");
                    return;
                }
            };
            match outcome {
                Ok(Ok(tls)) => {
                    // Only a chain that verifies (for client use, against the anchors in use,
                    // at the clock's now, also on a resumed session) reaches the
                    // authenticators; see `Acceptor::deferred`.
                    if let Some(error) = &tls.ignored_chain {
                        tracing::debug!(%error, peer = %addr, "client certificate does not verify; ignored");
                    }
                    let peer = PeerInfo {
                        addr: Some(addr),
                        client_certs: tls.client_chain,
                    };
                    let conn = Guarded::new(tls.stream, slot, CONNECTION_DEADLINES);
                    let _ = tx.send(Ok(Conn::Tls(Box::new(conn), peer))).await;
                }
                Ok(Err(error)) => tracing::debug!(%error, peer = %addr, "tls handshake failed"),
                Err(_) => {
                    metrics.connection_refused("handshake_timeout");
                    tracing::debug!(peer = %addr, "tls handshake timed out");
                }
            }
        });
    }
}
