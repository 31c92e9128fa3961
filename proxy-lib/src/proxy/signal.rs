//! Process signals: SIGHUP asks for a reload, SIGTERM and SIGINT for a graceful shutdown.
//!
//! Handlers are installed by [`Signals::install`], before the pidfile is written, so a rotator
//! that reads the pidfile and sends SIGHUP never kills a proxy that is still starting.

use std::io;

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: reload the certificates.
    Reload,
    /// SIGTERM or SIGINT: stop accepting, drain, exit.
    Shutdown,
}

/// The installed signal handlers.
#[cfg(unix)]
#[derive(Debug)]
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    /// Installs the handlers (process-wide). Must run inside a tokio runtime.
    pub fn install() -> io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next signal.
    pub async fn recv(&mut self) -> Event {
        tokio::select! {
            _ = self.hup.recv() => Event::Reload,
            _ = self.term.recv() => Event::Shutdown,
            _ = self.int.recv() => Event::Shutdown,
        }
    }
}

/// The installed signal handlers (Ctrl-C only off Unix).
#[cfg(not(unix))]
#[derive(Debug)]
pub struct Signals(());

#[cfg(not(unix))]
impl Signals {
    /// Installs the handlers.
    pub fn install() -> io::Result<Self> {
        Ok(Self(()))
    }

    /// Waits for the next signal.
    pub async fn recv(&mut self) -> Event {
        let _ = tokio::signal::ctrl_c().await;
        Event::Shutdown
    }
}
