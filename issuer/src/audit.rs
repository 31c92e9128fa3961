//! The audit log: one JSON line per Certify decision (issued or refused), to stdout or a file.
//! It records who asked for what and the outcome, never the token, a key or the CSR.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// Standard output (`path = "-"`).
    Stdout,
    /// A file, appended to (created 0600).
    File(PathBuf),
}

/// One decision.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent<'a> {
    /// RFC 3339.
    pub time: String,
    /// `issued` or `refused`.
    pub decision: &'static str,
    /// The identity asked for (truncated to [`MAX_FIELD_CHARS`]).
    pub identity: &'a str,
    /// The peer address.
    pub peer: Option<String>,
    /// The authenticator that decided.
    pub authenticator: Option<&'a str>,
    /// The credential's public name (e.g. `token:<id>`).
    pub credential: Option<&'a str>,
    /// Leaf serial (hex).
    pub serial: Option<&'a str>,
    /// Leaf SHA-256 (hex).
    pub sha256: Option<&'a str>,
    /// Leaf notAfter (RFC 3339).
    pub not_after: Option<String>,
    /// gRPC code of a refusal.
    pub code: Option<&'static str>,
    /// Why it was refused (truncated to [`MAX_FIELD_CHARS`]: it may quote client input).
    pub reason: Option<String>,
}

/// Lines waiting for the writer at most; beyond it the sink is not keeping up.
pub const QUEUE_LINES: usize = 1024;
/// Lines the writer puts in one write at most (those queued while it was writing).
const WRITE_BATCH: usize = 64;
/// How long an issuance waits for its record to be written before it is answered
/// UNAVAILABLE (the certificate is then not handed out).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a client-supplied field is kept in a record (characters).
pub const MAX_FIELD_CHARS: usize = 256;

/// Why an issuance's record was not written: the issuance must not be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuditFailure {
    /// The queue is full: the sink is not keeping up.
    #[error("the audit log is not keeping up")]
    QueueFull,
    /// The record was not written within [`WRITE_TIMEOUT`].
    #[error(
        "the audit log did not take the record within {}",
        proxy_lib::human::duration(WRITE_TIMEOUT)
    )]
    Timeout,
    /// Writing failed (a broken pipe, a full disk).
    #[error("the audit log cannot be written")]
    WriteFailed,
}

impl AuditFailure {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuditFailure::QueueFull => "queue_full",
            AuditFailure::Timeout => "timeout",
            AuditFailure::WriteFailed => "write_failed",
        }
    }
}

struct Entry {
    line: Vec<u8>,
    ack: Option<oneshot::Sender<bool>>,
}

/// The audit sink: records go through a bounded queue to a writer thread of their own, so a
/// stalled reader of stdout or a slow disk never blocks a runtime thread (`/live` and
/// `/ready` keep answering). An issuance waits for its record to be written and fails closed
/// when it is not; a refusal's record is best effort (dropped, and counted, when the queue is
/// full).
pub struct AuditLog {
    tx: mpsc::Sender<Entry>,
    healthy: Arc<AtomicBool>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy())
            .finish()
    }
}

impl AuditLog {
    /// Opens the target (a file is created 0600 if missing and appended to) and starts the
    /// writer thread. Blocks.
    pub fn open(target: &AuditTarget) -> Result<Self> {
        let sink: Box<dyn Write + Send> = match target {
            AuditTarget::Stdout => Box::new(std::io::stdout()),
            AuditTarget::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(proxy_lib::fs::SECRET_MODE)
                    .open(path)
                    .map_err(|source| Error::Io {
                        path: path.clone(),
                        source,
                    })?;
                Box::new(f)
            }
        };
        Ok(Self::to_writer(sink))
    }

    /// An audit log writing to `w` (tests, embedding).
    pub fn to_writer(mut w: Box<dyn Write + Send>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Entry>(QUEUE_LINES);
        let healthy = Arc::new(AtomicBool::new(true));
        let state = healthy.clone();
        let spawned = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                let mut failing = false;
                let mut batch = Vec::with_capacity(WRITE_BATCH);
                let mut buf = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    // Everything queued meanwhile goes out in the same write (one syscall and
                    // one flush for a burst of issuances); each record is still acknowledged
                    // only once the write holding it returned.
                    batch.push(first);
                    while batch.len() < WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(e) => batch.push(e),
                            Err(_) => break,
                        }
                    }
                    buf.clear();
                    for e in &batch {
                        buf.extend_from_slice(&e.line);
                    }
                    let ok = w.write_all(&buf).and_then(|()| w.flush());
                    if let Err(error) = &ok
                        && !failing
                    {
                        tracing::error!(%error, "audit log write failed; issuing nothing until it works again");
                    }
                    failing = ok.is_err();
                    state.store(!failing, Ordering::Relaxed);
                    for e in batch.drain(..) {
                        if let Some(ack) = e.ack {
                            let _ = ack.send(!failing);
                        }
                    }
                }
            });
        if let Err(error) = spawned {
            // Without a writer every record fails: the issuer then issues nothing.
            tracing::error!(%error, "cannot start the audit writer");
            healthy.store(false, Ordering::Relaxed);
        }
        Self { tx, healthy }
    }

    /// Whether the sink is keeping up (`/ready` goes false when it is not).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.tx.capacity() > 0
    }

    fn line(event: &AuditEvent<'_>) -> Option<Vec<u8>> {
        match serde_json::to_vec(event) {
            Ok(mut l) => {
                l.push(b'\n');
                Some(l)
            }
            Err(error) => {
                tracing::error!(%error, "audit event not serialisable");
                None
            }
        }
    }

    /// Writes an issuance's record and waits until it is written: only then may the
    /// certificate be handed out.
    pub async fn record_issued(
        &self,
        event: &AuditEvent<'_>,
    ) -> std::result::Result<(), AuditFailure> {
        self.record(event).await
    }

    /// Writes a refusal's record, waiting for it only while the sink keeps up (a stalled sink
    /// must not hold every refused request for [`WRITE_TIMEOUT`]). The refusal stands either
    /// way; the error says the record was lost.
    pub async fn record_refused(
        &self,
        event: &AuditEvent<'_>,
    ) -> std::result::Result<(), AuditFailure> {
        if !self.healthy() {
            // Queued if there is room, not waited for.
            let line = Self::line(event).ok_or(AuditFailure::WriteFailed)?;
            return self
                .tx
                .try_send(Entry { line, ack: None })
                .map_err(|_| AuditFailure::QueueFull);
        }
        self.record(event).await
    }

    async fn record(&self, event: &AuditEvent<'_>) -> std::result::Result<(), AuditFailure> {
        let line = Self::line(event).ok_or(AuditFailure::WriteFailed)?;
        let (ack, written) = oneshot::channel();
        let entry = Entry {
            line,
            ack: Some(ack),
        };
        if self.tx.try_send(entry).is_err() {
            self.healthy.store(false, Ordering::Relaxed);
            return Err(AuditFailure::QueueFull);
        }
        match tokio::time::timeout(WRITE_TIMEOUT, written).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) | Ok(Err(_)) => Err(AuditFailure::WriteFailed),
            Err(_) => {
                self.healthy.store(false, Ordering::Relaxed);
                Err(AuditFailure::Timeout)
            }
        }
    }
}

/// `s` cut to at most `max` characters (on a char boundary).
pub fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_one_json_line_per_event_to_a_0600_file() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.log");
        let log = AuditLog::open(&AuditTarget::File(p.clone())).unwrap();
        let ev = AuditEvent {
            time: "2030-01-01T00:00:00Z".into(),
            decision: "refused",
            identity: "a.b",
            peer: Some("127.0.0.1:1".into()),
            authenticator: None,
            credential: None,
            serial: None,
            sha256: None,
            not_after: None,
            code: Some("unauthenticated"),
            reason: Some("no token presented".into()),
        };
        log.record_refused(&ev).await.unwrap();
        log.record_issued(&ev).await.unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["decision"], "refused");
        assert_eq!(v["reason"], "no token presented");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(truncate("héllo", 2), "hé");
    }

    /// A writer that blocks until told to go on, or fails.
    struct Stuck(std::sync::mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn event() -> AuditEvent<'static> {
        AuditEvent {
            time: "2030-01-01T00:00:00Z".into(),
            decision: "issued",
            identity: "a.b",
            peer: None,
            authenticator: None,
            credential: None,
            serial: None,
            sha256: None,
            not_after: None,
            code: None,
            reason: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_sink_fails_issuance_closed_and_reports_unhealthy() {
        let (go, wait) = std::sync::mpsc::channel();
        let log = AuditLog::to_writer(Box::new(Stuck(wait)));
        assert!(log.healthy());
        assert_eq!(
            log.record_issued(&event()).await,
            Err(AuditFailure::Timeout)
        );
        assert!(!log.healthy());
        // A refusal is not held up by the stalled sink.
        let _ = log.record_refused(&event()).await;
        // Once the sink moves again, records are written and it is healthy again.
        for _ in 0..3 {
            go.send(()).unwrap();
        }
        tokio::time::resume();
        log.record_issued(&event()).await.unwrap();
        assert!(log.healthy());
    }

    #[tokio::test]
    async fn a_broken_sink_fails_issuance_closed() {
        let log = AuditLog::to_writer(Box::new(Broken));
        assert_eq!(
            log.record_issued(&event()).await,
            Err(AuditFailure::WriteFailed)
        );
        assert!(!log.healthy());
    }
}
