//! The data path: the inbound (mTLS in → plaintext app) and outbound (plaintext in → mTLS out)
//! accept loops, and the byte forwarding between two streams with half-close, an idle timeout
//! and byte counting.
//!
//! Each accepted connection takes the credentials current at that instant, so a reload affects
//! only connections accepted after it. A shared semaphore bounds open connections: at the limit
//! each accept loop holds at most one accepted socket waiting for a slot (no handshake before
//! it has one) and further connections wait in the kernel's backlog.
//!
//! Inbound listeners also cap the handshakes in progress per source (an IPv4 address or an
//! IPv6 /64, [`Limits::max_pending_per_source`]): a connection from a source already at its
//! cap is closed at once, before it takes a connection slot, counted as
//! `proxy_tls_handshakes_total{direction="inbound",result="source_pending"}` and logged within
//! the refusal log limit. So sockets from one source that never send a byte hold at most that
//! many slots (each until the handshake timeout), and clients from other sources are served.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::net::LogLimit;
use crate::net::caps::{Caps, ConnCaps, Slot};
use crate::proxy::config::Limits;
use crate::proxy::metrics::{Direction, DirectionMetrics, HandshakeResult, Metrics};
use crate::proxy::reload::{Credentials, Reloader};
use crate::tls::{Accepted, HandshakeError, NotAllowed};

/// Copy buffer per direction. TLS records are at most 16 KiB; a larger buffer lets one read
/// drain several of them and keeps syscalls per byte low on bulk transfers.
pub const COPY_BUFFER: usize = 64 * 1024;

/// What every accept loop shares.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The credentials.
    pub reloader: Arc<Reloader>,
    /// Metrics.
    pub metrics: Metrics,
    /// Timeouts.
    pub limits: Limits,
    /// The connection limit (one permit per open connection).
    pub permits: Arc<Semaphore>,
    /// Becomes true when open connections must be cut (after the drain timeout).
    pub cut: watch::Receiver<bool>,
    /// Becomes true when the proxy stops accepting (HTTP/2 connections are then asked to
    /// finish their streams and close).
    pub stop: watch::Receiver<bool>,
    /// How often refused inbound handshakes are logged at info.
    pub refusals: Arc<LogLimit>,
    /// Inbound handshakes in progress per source (see [`pending_caps`]).
    pub pending: Arc<ConnCaps>,
}

/// The per-source cap on inbound handshakes in progress that `limits` asks for. It tracks
/// handshakes only (a connection's place is given back when its handshake ends), caps nothing
/// else per source and never sheds: `max_connections` stays the semaphore's.
pub fn pending_caps(limits: &Limits) -> Arc<ConnCaps> {
    ConnCaps::new(Caps {
        max_connections: usize::MAX,
        max_pending_per_source: limits.max_pending_per_source,
        max_connections_per_source: usize::MAX,
        exempt: Vec::new(),
    })
}

/// Accepts mTLS connections on `listener` and forwards each to `app` until `stop` turns true.
pub async fn serve_inbound(
    listener: TcpListener,
    app: Arc<str>,
    shared: Shared,
    stop: watch::Receiver<bool>,
) {
    let dm = shared.metrics.direction(Direction::Inbound);
    let caps = Some(shared.pending.clone());
    accept_loop(
        listener,
        shared.clone(),
        stop,
        caps,
        move |tcp, peer, pending| {
            let app = app.clone();
            let shared = shared.clone();
            let dm = dm.clone();
            async move { inbound_conn(tcp, peer, pending, &app, &shared, &dm).await }
        },
    )
    .await
}

/// Accepts plaintext connections on `listener` and originates mTLS to `target`, requiring the
/// server to carry `identity`, until `stop` turns true.
pub async fn serve_outbound(
    listener: TcpListener,
    target: Arc<str>,
    identity: ServerName<'static>,
    shared: Shared,
    stop: watch::Receiver<bool>,
) {
    let dm = shared.metrics.direction(Direction::Outbound);
    accept_loop(listener, shared.clone(), stop, None, move |tcp, peer, _| {
        let target = target.clone();
        let identity = identity.clone();
        let shared = shared.clone();
        let dm = dm.clone();
        async move { outbound_conn(tcp, peer, &target, identity, &shared, &dm).await }
    })
    .await
}

/// Accepts connections on `listener` and spawns `handle` for each until `stop` turns true.
/// With `per_source`, a connection is first admitted as a pending handshake of its source
/// (refused, counted and logged when the source is at its cap); `handle` gets its [`Slot`]
/// and drops it when the handshake ends.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
    per_source: Option<Arc<ConnCaps>>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Option<Slot>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    loop {
        if *stop.borrow() {
            break;
        }
        // Accept first, then take a slot: a loop holding a slot while it waits for a client
        // would starve the other listeners' clients at the limit (with fewer slots than
        // listeners, for ever). A loop waiting for a slot holds one accepted socket, untouched
        // (no handshake) until a slot frees; further clients wait in the kernel's backlog.
        let Some((tcp, peer)) = crate::net::accept(&listener, &mut stop).await else {
            break;
        };
        let pending = match per_source.as_ref().map(|c| c.admit(peer.ip())).transpose() {
            Ok(p) => p,
            Err(refused) => {
                shared
                    .metrics
                    .handshake(Direction::Inbound, HandshakeResult::SourcePending);
                log_refusal(&shared, peer, HandshakeResult::SourcePending, &refused);
                continue; // dropping `tcp` closes it, unanswered
            }
        };
        let permit = match shared.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                tracing::debug!(%peer, "connection limit reached, waiting for a slot");
                tokio::select! {
                    p = shared.permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break, // semaphore closed: shutting down
                    },
                    _ = stop.changed() => break,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut cut = shared.cut.clone();
        let conn = handle(tcp, peer, pending);
        tokio::spawn(async move {
            tokio::select! {
                () = conn => {}
                _ = cut.wait_for(|c| *c) => {
                    tracing::debug!(%peer, "connection cut at shutdown");
                }
            }
            drop(permit);
        });
    }
    tracing::debug!(listen = ?local, "listener stopped");
}

/// The credentials new handshakes use; without any (none loaded yet) the connection is
/// refused and counted as `no_credentials`.
pub(crate) fn current_credentials(
    shared: &Shared,
    direction: Direction,
    peer: SocketAddr,
) -> Option<Arc<Credentials>> {
    let creds = shared.reloader.current();
    if creds.is_none() {
        shared
            .metrics
            .handshake(direction, HandshakeResult::NoCredentials);
        tracing::warn!(%peer, "no valid certificate loaded; refusing connection");
    }
    creds
}

async fn inbound_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    pending: Option<Slot>,
    app: &str,
    shared: &Shared,
    dm: &DirectionMetrics,
) {
    let _open = dm.open_connection();
    let Some(creds) = current_credentials(shared, Direction::Inbound, peer) else {
        return;
    };
    let accept = creds.acceptor.accept(tcp);
    let accepted = tokio::time::timeout(shared.limits.handshake_timeout, accept).await;
    drop(pending); // the handshake is over, whatever its outcome
    let Some(accepted) = inbound_accepted(shared, peer, accepted) else {
        return;
    };
    drop(creds);
    forward_to_app(accepted.stream, app, shared, dm, peer).await;
}

/// Connects to `app` and forwards bytes both ways between it and `client` (see [`forward`]).
pub(crate) async fn forward_to_app<S>(
    client: S,
    app: &str,
    shared: &Shared,
    dm: &DirectionMetrics,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let app_tcp = match connect(app, shared.limits.connect_timeout).await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%peer, app, %error, "cannot reach the app");
            return;
        }
    };
    if let Err(error) = forward(client, app_tcp, shared.limits.idle_timeout, &dm.bytes).await {
        tracing::debug!(%peer, %error, "inbound connection ended with an error");
    }
}

/// The connection of a finished inbound handshake (counted `ok`), or `None` with the failure
/// counted and logged.
pub(crate) fn inbound_accepted<IO>(
    shared: &Shared,
    peer: SocketAddr,
    result: Result<Result<Accepted<IO>, HandshakeError>, tokio::time::error::Elapsed>,
) -> Option<Accepted<IO>> {
    match result {
        Err(_) => {
            inbound_handshake_timed_out(shared, peer);
            None
        }
        Ok(Err(e)) => {
            inbound_handshake_failed(shared, peer, e);
            None
        }
        Ok(Ok(accepted)) => {
            shared
                .metrics
                .handshake(Direction::Inbound, HandshakeResult::Ok);
            Some(accepted)
        }
    }
}

/// Counts and logs an inbound handshake that did not finish in time.
pub(crate) fn inbound_handshake_timed_out(shared: &Shared, peer: SocketAddr) {
    shared
        .metrics
        .handshake(Direction::Inbound, HandshakeResult::Timeout);
    tracing::debug!(%peer, "inbound handshake timed out");
}

/// Counts and logs a failed inbound handshake.
pub(crate) fn inbound_handshake_failed(shared: &Shared, peer: SocketAddr, error: HandshakeError) {
    match error {
        HandshakeError::Handshake(error) => {
            let result = classify(&error);
            shared.metrics.handshake(Direction::Inbound, result);
            if error.kind() == io::ErrorKind::UnexpectedEof {
                // A TCP health check or a client that gave up: nothing was refused.
                tracing::debug!(%peer, %error, "inbound connection closed before the handshake");
            } else {
                log_refusal(shared, peer, result, &error);
            }
        }
        HandshakeError::Resumed(error) => {
            let result = classify_tls(&error);
            shared.metrics.handshake(Direction::Inbound, result);
            log_refusal(shared, peer, result, &error);
        }
    }
}

/// Logs a refused inbound handshake at info, with the peer and rustls' reason (never the
/// certificate itself), at most [`LogLimit`]'s burst per window; the next line logged after a
/// flood counts the lines left out (`suppressed`).
pub(crate) fn log_refusal(
    shared: &Shared,
    peer: SocketAddr,
    result: HandshakeResult,
    reason: &dyn std::fmt::Display,
) {
    match shared.refusals.admit() {
        Some(suppressed) => tracing::info!(
            %peer,
            %reason,
            result = %result.as_str(),
            suppressed,
            "inbound handshake refused"
        ),
        None => {
            tracing::debug!(%peer, %reason, result = %result.as_str(), "inbound handshake refused")
        }
    }
}

async fn outbound_conn(
    local: TcpStream,
    peer: SocketAddr,
    target: &str,
    identity: ServerName<'static>,
    shared: &Shared,
    dm: &DirectionMetrics,
) {
    let _open = dm.open_connection();
    let Some(creds) = current_credentials(shared, Direction::Outbound, peer) else {
        return;
    };
    let remote = match connect(target, shared.limits.connect_timeout).await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%peer, target, %error, "cannot reach the outbound target");
            return;
        }
    };
    let handshake = creds.connector.connect(identity.clone(), remote);
    let tls = match tokio::time::timeout(shared.limits.handshake_timeout, handshake).await {
        Err(_) => {
            shared
                .metrics
                .handshake(Direction::Outbound, HandshakeResult::Timeout);
            tracing::warn!(%peer, target, "outbound handshake timed out");
            return;
        }
        Ok(Err(HandshakeError::Handshake(error))) => {
            let result = classify(&error);
            shared.metrics.handshake(Direction::Outbound, result);
            tracing::warn!(%peer, target, %error, result = result.as_str(), "outbound handshake failed");
            return;
        }
        Ok(Err(HandshakeError::Resumed(error))) => {
            let result = classify_tls(&error);
            shared.metrics.handshake(Direction::Outbound, result);
            tracing::warn!(%peer, target, %error, result = result.as_str(), "outbound resumed session refused");
            return;
        }
        Ok(Ok(tls)) => tls,
    };
    drop(creds);
    shared
        .metrics
        .handshake(Direction::Outbound, HandshakeResult::Ok);
    if let Err(error) = forward(local, tls, shared.limits.idle_timeout, &dm.bytes).await {
        tracing::debug!(%peer, %error, "outbound connection ended with an error");
    }
}

pub(crate) async fn connect(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Maps a handshake error to its metric label.
pub fn classify(error: &io::Error) -> HandshakeResult {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => classify_tls(tls),
        None => HandshakeResult::Error,
    }
}

/// Maps a rustls error to its handshake metric label.
pub fn classify_tls(tls: &rustls::Error) -> HandshakeResult {
    match tls {
        rustls::Error::NoCertificatesPresented => HandshakeResult::NoClientCert,
        rustls::Error::InvalidCertificate(c) => match c {
            rustls::CertificateError::Other(o) if o.0.downcast_ref::<NotAllowed>().is_some() => {
                HandshakeResult::NotAllowed
            }
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. } => {
                HandshakeResult::WrongIdentity
            }
            _ => HandshakeResult::Untrusted,
        },
        _ => HandshakeResult::Error,
    }
}

/// Copies both ways between `a` and `b` until both sides are done (a half-close on one side
/// is passed on as a shutdown of the other's write half), or until neither side has moved a
/// byte for `idle` (checked in quarters: closes between `idle` and 1.25 × `idle`). Counts the
/// bytes read from either side in `bytes`.
pub async fn forward<A, B>(a: A, b: B, idle: Duration, bytes: &Counter) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(AtomicBool::new(false));
    let mut a = Counted::new(a, bytes.clone(), activity.clone());
    let mut b = Counted::new(b, bytes.clone(), activity.clone());
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER) => {
            r.map(|_| ())
        }
        () = idle_watch(&activity, idle) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"))
        }
    }
}

pub(crate) async fn idle_watch(activity: &AtomicBool, idle: Duration) {
    let tick = idle / 4;
    let mut quiet = 0;
    loop {
        tokio::time::sleep(tick).await;
        if activity.swap(false, Ordering::Relaxed) {
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= 4 {
                return;
            }
        }
    }
}

/// A stream that counts the bytes read from it and flags activity.
pub(crate) struct Counted<S> {
    inner: S,
    bytes: Counter,
    activity: Arc<AtomicBool>,
}

impl<S> Counted<S> {
    /// `inner`, counting the bytes read from it in `bytes` and flagging reads in `activity`.
    pub(crate) fn new(inner: S, bytes: Counter, activity: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            bytes,
            activity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.bytes.inc_by(n as u64);
            self.activity.store(true, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forward_passes_half_close_and_counts_bytes() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let bytes = Counter::default();
        let fwd = tokio::spawn({
            let bytes = bytes.clone();
            async move { forward(a, b, Duration::from_secs(60), &bytes).await }
        });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap(); // EOF arrives: half-close passed on
        assert_eq!(got, b"hello");
        server.write_all(b"world!").await.unwrap(); // the other direction still works
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        fwd.await.unwrap().unwrap();
        assert_eq!(bytes.get(), 11);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn forward_closes_idle_connections_only() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(40);
        let fwd = tokio::spawn(async move { forward(a, b, idle, &Counter::default()).await });
        // Traffic every 20 s keeps it open for well beyond the idle timeout.
        let mut buf = [0u8; 4];
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            client.write_all(b"ping").await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
        }
        assert!(!fwd.is_finished());
        tokio::time::sleep(Duration::from_secs(55)).await;
        let err = fwd.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
