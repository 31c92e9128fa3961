//! What every listener shares: the accept step of an accept loop, and a limit on how often a
//! noisy event is logged.
//!
//! The limit allows at most a burst of lines per window, and the next line logged says how
//! many were left out, so a flood of refused handshakes (a scanner, a misconfigured client in a
//! retry loop) or a streak of failed accepts cannot fill the journal while one still shows up.

pub mod caps;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long an accept loop backs off after a failed accept (EMFILE and friends) instead of
/// spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Waits for the next connection on `listener`; `None` once `stop` is true or its sender is
/// gone. A failed accept (out of file descriptors, a connection reset before it was taken) is
/// logged, at most once a second with the count of those left out, and retried after
/// [`ACCEPT_BACKOFF`].
pub async fn accept(
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    let failures = LogLimit::new(1, Duration::from_secs(1));
    loop {
        if *stop.borrow() {
            return None;
        }
        tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => return Some(conn),
                Err(error) => {
                    if let Some(suppressed) = failures.admit() {
                        tracing::warn!(%error, suppressed, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            changed = stop.changed() => if changed.is_err() {
                return None;
            },
        }
    }
}

/// Lines logged per window by default.
pub const DEFAULT_BURST: u32 = 10;
/// The default window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

/// Admits at most `burst` events per fixed `window` (tokio's clock, so paused test time
/// drives it) and counts the rest.
#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_WINDOW)
    }
}

impl LogLimit {
    /// At most `burst` lines per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new(Window::default()),
        }
    }

    /// Whether the event happening now may be logged: `Some(n)` when it may, `n` being how
    /// many events were suppressed since the last one logged; `None` when it is suppressed
    /// (and counted).
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= self.window) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < self.burst {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Raises this process's soft open-file limit to its hard limit, and warns when even that is
/// below the `files` its connection limits need (plus a margin for listeners, the admin
/// server, files read at reloads and logs). The usual soft default of 1024 would make accepts
/// fail long before a server's configured limits. Returns the soft limit now in force
/// (`None`: unlimited).
pub fn raise_open_file_limit(files: u64) -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        let raised = rustix::process::Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, soft = ?before.current, "cannot raise the open-file limit");
        }
    }
    let soft = getrlimit(Resource::Nofile).current;
    let need = files.saturating_add(64);
    if let Some(soft) = soft.filter(|s| *s < need) {
        tracing::warn!(
            limit = soft,
            need,
            "open-file limit is below what the connection limits need: connections beyond it will fail"
        );
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let limit = LogLimit::new(3, Duration::from_secs(1));
        let first: Vec<_> = (0..10).map(|_| limit.admit()).collect();
        assert_eq!(
            first,
            [
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ]
        );
        // Still inside the window.
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(limit.admit(), None);
        // A new window: the first line carries the 8 left out.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(limit.admit(), Some(8));
        assert_eq!(limit.admit(), Some(0));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(limit.admit(), Some(0));
    }
}
