//! The audit log: one JSON line per Certify decision (issued or refused), to stdout or a file.
//! It records who asked for what and the outcome, never the token, a key or the CSR.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;

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
    /// The identity asked for (truncated to 256 characters).
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
    /// Why it was refused.
    pub reason: Option<String>,
}

/// The audit sink.
pub struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Opens the target (a file is created 0600 if missing and appended to). Blocks.
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
        Ok(Self {
            sink: Mutex::new(sink),
        })
    }

    /// An audit log writing to `w` (tests, embedding).
    pub fn to_writer(w: Box<dyn Write + Send>) -> Self {
        Self {
            sink: Mutex::new(w),
        }
    }

    /// Writes one line. A write failure is logged, never fatal to the request.
    pub fn record(&self, event: &AuditEvent<'_>) {
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(error) => {
                tracing::error!(%error, "audit event not serialisable");
                return;
            }
        };
        line.push(b'\n');
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = sink.write_all(&line).and_then(|()| sink.flush()) {
            tracing::error!(%error, "audit log write failed");
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

    #[test]
    fn writes_one_json_line_per_event_to_a_0600_file() {
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
        log.record(&ev);
        log.record(&ev);
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["decision"], "refused");
        assert_eq!(v["reason"], "no token presented");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(truncate("héllo", 2), "hé");
    }
}
