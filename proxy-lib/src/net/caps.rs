//! Bounds on what strangers can make a server hold: connections per source and in all.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host's privacy addresses, or one subnet,
//! count as one). Each source may have a few connections whose handshake is still in progress
//! and a bounded number open in all; a newcomer over its own source's cap is refused at once,
//! so one source cannot take the server. Sources on the allow-list (a fleet behind one NAT)
//! are not capped per source. The global cap never refuses a newcomer: it sheds the tracked
//! connection that has been quiet the longest (a handshake that never progressed, an idle
//! connection), so an attacker holding the server full only ever loses its own sockets.
//!
//! [`ConnCaps::admit`] hands out a [`Slot`] per connection; [`Guarded`] wraps the stream so
//! that reads and writes mark it active, a shed slot fails its I/O, and a connection quiet
//! for longer than its deadline (the first request's, then the idle one) is closed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The source a connection counts against: the IPv4 address (IPv4-mapped IPv6 included), or
/// the IPv6 address's /64.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// The caps of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// Connections tracked in all (handshaking and open); beyond it the quietest is shed.
    pub max_connections: usize,
    /// Handshakes in progress per source.
    pub max_pending_per_source: usize,
    /// Connections (handshaking and open) per source.
    pub max_connections_per_source: usize,
    /// Sources not capped per source (still counted in all).
    pub exempt: Vec<IpNet>,
}

/// Why a newcomer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its source has as many handshakes in progress as it may.
    #[error("too many handshakes in progress from this source")]
    SourcePending,
    /// Its source has as many connections as it may.
    #[error("too many connections from this source")]
    SourceConnections,
}

impl Refused {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::SourcePending => "source_pending",
            Refused::SourceConnections => "source_connections",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct PerSource {
    pending: usize,
    total: usize,
}

#[derive(Debug)]
struct Tracked {
    /// `None` for an exempt source.
    source: Option<IpAddr>,
    pending: bool,
    activity: Arc<AtomicU64>,
    cancel: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    live: HashMap<u64, Tracked>,
    sources: HashMap<IpAddr, PerSource>,
}

impl State {
    fn forget(&mut self, id: u64) -> Option<Tracked> {
        let t = self.live.remove(&id)?;
        if let Some(src) = t.source
            && let Some(c) = self.sources.get_mut(&src)
        {
            c.total -= 1;
            if t.pending {
                c.pending -= 1;
            }
            if c.total == 0 {
                self.sources.remove(&src);
            }
        }
        Some(t)
    }
}

/// The per-source and global caps of a listener, and the connections they track.
#[derive(Debug)]
pub struct ConnCaps {
    caps: Caps,
    epoch: Instant,
    state: Mutex<State>,
    shed: AtomicU64,
}

impl ConnCaps {
    /// Caps for one listener.
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            epoch: Instant::now(),
            state: Mutex::new(State::default()),
            shed: AtomicU64::new(0),
        })
    }

    /// The caps in force.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Admits a connection from `peer` as a pending handshake, shedding the quietest tracked
    /// connection when the listener is full; refuses it when its source is at its cap.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refused> {
        let exempt = self
            .caps
            .exempt
            .iter()
            .any(|n| n.contains(&peer.to_canonical()));
        let source = (!exempt).then(|| source_of(peer));
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(src) = source {
            let c = st.sources.get(&src).copied().unwrap_or_default();
            if c.pending >= self.caps.max_pending_per_source {
                return Err(Refused::SourcePending);
            }
            if c.total >= self.caps.max_connections_per_source {
                return Err(Refused::SourceConnections);
            }
        }
        while st.live.len() >= self.caps.max_connections.max(1) {
            let quietest = st
                .live
                .iter()
                .min_by_key(|(id, t)| (t.activity.load(Ordering::Relaxed), **id))
                .map(|(id, _)| *id);
            let Some(id) = quietest else { break };
            if let Some(t) = st.forget(id) {
                t.cancel.cancel();
                self.shed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = st.next;
        st.next += 1;
        if let Some(src) = source {
            let c = st.sources.entry(src).or_default();
            c.pending += 1;
            c.total += 1;
        }
        let activity = Arc::new(AtomicU64::new(self.now_ms()));
        let cancel = CancellationToken::new();
        st.live.insert(
            id,
            Tracked {
                source,
                pending: true,
                activity: activity.clone(),
                cancel: cancel.clone(),
            },
        );
        Ok(Slot {
            caps: self.clone(),
            id,
            activity,
            cancel,
        })
    }

    /// Connections tracked now (handshaking and open).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .len()
    }

    /// Connections shed so far to make room.
    pub fn shed_count(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    caps: Arc<ConnCaps>,
    id: u64,
    activity: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Slot {
    /// The handshake finished: the connection no longer counts as pending.
    pub fn established(&self) {
        let mut st = self.caps.state.lock().unwrap_or_else(|e| e.into_inner());
        let source = match st.live.get_mut(&self.id) {
            Some(t) if t.pending => {
                t.pending = false;
                t.source
            }
            _ => return,
        };
        if let Some(src) = source
            && let Some(c) = st.sources.get_mut(&src)
        {
            c.pending -= 1;
        }
    }

    /// Marks the connection active now (it is then shed after quieter ones).
    pub fn touch(&self) {
        self.activity.store(self.caps.now_ms(), Ordering::Relaxed);
    }

    /// Completes when the slot was shed to make room.
    pub fn shed(&self) -> WaitForCancellationFutureOwned {
        self.cancel.clone().cancelled_owned()
    }

    /// Whether the slot was shed.
    pub fn is_shed(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.caps
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(self.id);
    }
}

/// How long a connection may stay quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// From the start of the wrapped stream to its first byte read (e.g. the HTTP/2 preface).
    pub first_byte: Duration,
    /// Between any two reads or writes after that.
    pub idle: Duration,
}

/// A stream that holds its [`Slot`]: reads and writes mark it active, a shed slot fails its
/// I/O (`ConnectionAborted`), and a stream quiet for longer than its [`Deadlines`] fails with
/// `TimedOut`, which makes the server above close it.
pub struct Guarded<S> {
    inner: S,
    slot: Slot,
    shed: Pin<Box<WaitForCancellationFutureOwned>>,
    quiet: Pin<Box<Sleep>>,
    deadlines: Deadlines,
    started: bool,
}

impl<S> std::fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("slot", &self.slot)
            .field("deadlines", &self.deadlines)
            .finish()
    }
}

impl<S> Guarded<S> {
    /// Wraps `inner`, established, with `slot`.
    pub fn new(inner: S, slot: Slot, deadlines: Deadlines) -> Self {
        slot.established();
        slot.touch();
        let shed = Box::pin(slot.shed());
        Self {
            inner,
            slot,
            shed,
            quiet: Box::pin(tokio::time::sleep(deadlines.first_byte)),
            deadlines,
            started: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn active(&mut self) {
        self.started = true;
        self.slot.touch();
        self.quiet
            .as_mut()
            .reset(Instant::now() + self.deadlines.idle);
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.shed.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection shed to make room for another",
            ));
        }
        None
    }

    fn quiet_for_too_long(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.quiet.as_mut().poll(cx).is_ready() {
            let what = if self.started {
                "idle timeout"
            } else {
                "no request in time"
            };
            return Some(io::Error::new(io::ErrorKind::TimedOut, what));
        }
        None
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(e) = me.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    me.active();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match me.quiet_for_too_long(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(e) = me.check(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
            && me.started
        {
            me.active();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(e) = me.check(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
            && me.started
        {
            me.active();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn caps(total: usize, pending: usize, per_source: usize) -> Arc<ConnCaps> {
        ConnCaps::new(Caps {
            max_connections: total,
            max_pending_per_source: pending,
            max_connections_per_source: per_source,
            exempt: vec!["127.0.0.9/32".parse().unwrap()],
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_slash_64s() {
        assert_eq!(source_of(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_of(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:ffff::9")),
            source_of(ip("2001:db8:1:2::1"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_over_its_caps_is_refused_and_others_are_not() {
        let c = caps(100, 2, 3);
        let a1 = c.admit(ip("127.0.0.2")).unwrap();
        let _a2 = c.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(
            c.admit(ip("127.0.0.2")).unwrap_err(),
            Refused::SourcePending
        );
        // Another source is not affected.
        let _b = c.admit(ip("127.0.0.1")).unwrap();
        // Once a handshake finishes, the source may start another, up to its total.
        a1.established();
        let _a3 = c.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(
            c.admit(ip("127.0.0.2")).unwrap_err(),
            Refused::SourcePending
        );
        a1.established(); // twice is harmless
        drop(_a2);
        // 2 of 3 left (a1 open, a3 pending): one more pending fits, then the total is hit.
        let _a4 = c.admit(ip("127.0.0.2")).unwrap();
        _a4.established();
        assert_eq!(
            c.admit(ip("127.0.0.2")).unwrap_err(),
            Refused::SourceConnections
        );
        // The allow-listed source is not capped per source.
        let exempt: Vec<_> = (0..10).map(|_| c.admit(ip("127.0.0.9")).unwrap()).collect();
        assert_eq!(c.tracked(), 4 + exempt.len());
        drop(exempt);
        drop((a1, _a3, _a4, _b));
        assert_eq!(c.tracked(), 0);
        assert!(c.state.lock().unwrap().sources.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_listener_sheds_its_quietest_connection_not_the_newcomer() {
        let c = caps(3, 10, 10);
        let old = c.admit(ip("127.0.0.2")).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let busy = c.admit(ip("127.0.0.2")).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let newer = c.admit(ip("127.0.0.3")).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        busy.touch();
        let newest = c.admit(ip("127.0.0.1")).unwrap();
        assert!(old.is_shed(), "the quietest is shed");
        assert!(!busy.is_shed() && !newer.is_shed() && !newest.is_shed());
        assert_eq!(c.tracked(), 3);
        assert_eq!(c.shed_count(), 1);
        old.shed().await; // completes
        drop(old); // its place was given away already
        assert_eq!(c.tracked(), 3);
        let _next = c.admit(ip("127.0.0.1")).unwrap();
        assert!(newer.is_shed(), "then the next quietest");
    }

    #[tokio::test(start_paused = true)]
    async fn a_guarded_stream_times_out_when_quiet_and_fails_when_shed() {
        let c = caps(1, 10, 10);
        let deadlines = Deadlines {
            first_byte: Duration::from_secs(5),
            idle: Duration::from_secs(30),
        };
        // No first byte within its deadline.
        let (client, server) = tokio::io::duplex(64);
        let mut g = Guarded::new(server, c.admit(ip("127.0.0.2")).unwrap(), deadlines);
        let mut buf = [0u8; 8];
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop((g, client));

        // Bytes keep it alive past the first deadline; then the idle one closes it.
        let (mut client, server) = tokio::io::duplex(64);
        let mut g = Guarded::new(server, c.admit(ip("127.0.0.2")).unwrap(), deadlines);
        client.write_all(b"hi").await.unwrap();
        assert_eq!(g.read(&mut buf).await.unwrap(), 2);
        let started = Instant::now();
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));

        // Shed: a newcomer on a full listener makes its I/O fail.
        drop(g);
        let (_client, server) = tokio::io::duplex(64);
        let mut g = Guarded::new(server, c.admit(ip("127.0.0.2")).unwrap(), deadlines);
        let _newcomer = c.admit(ip("127.0.0.1")).unwrap();
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    }
}
