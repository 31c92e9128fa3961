//! The small state file `DIR/..rotator-state.json`: when the current cert was received, the
//! last success, the last error and the planned next renewal, for `status` and restarts.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The state file's name inside the cert dir.
pub const STATE_FILE: &str = "..rotator-state.json";

/// What the rotator remembers between runs. Times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// Serial of the cert the rotator installed last.
    pub serial: Option<String>,
    /// When that cert was received.
    pub received: Option<u64>,
    /// Last successful rotation.
    pub last_success: Option<u64>,
    /// Last failure, if it came after the last success.
    pub last_error: Option<String>,
    /// When the last failure happened.
    pub last_error_at: Option<u64>,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// The planned next renewal.
    pub next_renewal: Option<u64>,
    /// Serial of an installed cert whose reload hooks or verify failed: the next `rotate`
    /// runs them again rather than saying "not due".
    pub unfinished: Option<String>,
}

impl State {
    /// Reads the state file; a missing or unreadable file reads as empty. Blocks.
    pub fn load(dir: &Path) -> Self {
        std::fs::read(dir.join(STATE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Writes the state file atomically (0644), creating the cert dir (0755) when it does not
    /// exist yet, as on a host that never got a cert. Blocks.
    pub fn save(&self, dir: &Path) -> Result<(), proxy_lib::fs::FsError> {
        let json = serde_json::to_vec_pretty(self).expect("state serializes");
        proxy_lib::fs::ensure_dir(dir, crate::store::DIR_MODE)?;
        proxy_lib::fs::write_atomic(
            &dir.join(STATE_FILE),
            &json,
            proxy_lib::fs::PUBLIC_MODE,
            None,
        )
    }

    /// The time the current cert was received, if the state is about `serial`.
    pub fn received_for(&self, serial: &str) -> Option<u64> {
        (self.serial.as_deref() == Some(serial))
            .then_some(self.received)
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_missing_reads_empty() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(State::load(d.path()), State::default());
        let s = State {
            serial: Some("ab".into()),
            received: Some(5),
            failures: 2,
            unfinished: Some("ab".into()),
            ..State::default()
        };
        s.save(d.path()).unwrap();
        assert_eq!(State::load(d.path()), s);
        // A file from before `unfinished` existed still reads.
        std::fs::write(d.path().join(STATE_FILE), r#"{"serial":"ab","failures":1}"#).unwrap();
        assert_eq!(State::load(d.path()).failures, 1);
        assert_eq!(s.received_for("ab"), Some(5));
        assert_eq!(s.received_for("cd"), None);
    }

    #[test]
    fn saving_into_a_cert_dir_not_made_yet_creates_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("var/lib/mesh-identity");
        let s = State {
            last_error: Some("cannot reach the issuer".into()),
            ..State::default()
        };
        s.save(&dir).unwrap();
        assert!(dir.is_dir());
        assert_eq!(State::load(&dir), s);
    }
}
