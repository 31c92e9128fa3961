//! The small state file `DIR/..rotator-state.json`: when the current cert was received, the
//! last success, the last error and the planned next renewal, for `status` and restarts. The
//! rotator keeps the same state in memory too ([`Ledger`]), with the changes the file could not
//! take, so a running daemon reports them (`/status`) when its filesystem is full or read-only.

use std::path::Path;

use proxy_lib::certdir::FsOps;
use proxy_lib::fs::{FsError, LockGuard};
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
    /// Why the last trust bundle the issuer offered was refused, while it still is.
    pub bundle_error: Option<String>,
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
    ///
    /// This writes without the store lock: the rotator changes the file through [`update`] or
    /// [`update_locked`], which read, change and write it under the lock.
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

    /// Applies one transition's changes, in order.
    pub fn apply(&mut self, changes: &[Change]) {
        for c in changes {
            match c {
                Change::Installed { serial, received } => {
                    self.serial = Some(serial.clone());
                    self.received = Some(*received);
                }
                Change::Succeeded { at } => self.succeed(*at),
                Change::Completed { at } => {
                    if self.unfinished.is_some() {
                        self.succeed(*at);
                    }
                }
                Change::Failed {
                    at,
                    error,
                    installed,
                } => {
                    self.last_error = Some(error.clone());
                    self.last_error_at = Some(*at);
                    self.failures = self.failures.saturating_add(1);
                    if let Some(serial) = installed {
                        self.unfinished = Some(serial.clone());
                    }
                }
                Change::NextRenewal(t) => self.next_renewal = Some(*t),
                Change::Bundle { error } => self.bundle_error.clone_from(error),
            }
        }
    }

    fn succeed(&mut self, at: u64) {
        self.last_success = Some(at);
        self.last_error = None;
        self.last_error_at = None;
        self.failures = 0;
        self.unfinished = None;
    }

    /// The time the current cert was received, if the state is about `serial`.
    pub fn received_for(&self, serial: &str) -> Option<u64> {
        (self.serial.as_deref() == Some(serial))
            .then_some(self.received)
            .flatten()
    }
}

/// One change a transition makes to the state file. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new cert was installed (written together with the swap).
    Installed {
        /// Its serial.
        serial: String,
        /// When it was received.
        received: u64,
    },
    /// A rotation succeeded: records the success and clears the failures, the last error and
    /// an unfinished rotation.
    Succeeded {
        /// When.
        at: u64,
    },
    /// The reload and verify of the cert on disk passed: a success when a rotation was left
    /// unfinished, nothing otherwise.
    Completed {
        /// When.
        at: u64,
    },
    /// An attempt failed; a cert installed before the failure stays to be reloaded and
    /// verified (`unfinished`).
    Failed {
        /// When.
        at: u64,
        /// What failed.
        error: String,
        /// The serial installed before the failure, if any.
        installed: Option<String>,
    },
    /// The planned next renewal.
    NextRenewal(u64),
    /// The issuer's trust bundle was fetched: refused (why), or taken or unchanged (`None`).
    Bundle {
        /// Why it was refused.
        error: Option<String>,
    },
}

/// Applies `changes` to the state file in `dir` in one read-modify-write under the store lock
/// (`lock` proves the caller holds it), writing through `fs` (atomically: a temp file renamed
/// over) only when something changed. Temp files a crash left in the dir (the state file's and
/// the swap's) are removed first: under the lock no write is in progress. Returns the state
/// after the changes. Blocks.
pub fn update_locked(
    dir: &Path,
    fs: &dyn FsOps,
    lock: &LockGuard,
    changes: &[Change],
) -> Result<State, FsError> {
    apply_locked(dir, fs, lock, None, changes)
}

/// [`update_locked`], with the changes applied to `base` rather than to the file when given
/// (the daemon's own state, after a write that failed). Blocks.
fn apply_locked(
    dir: &Path,
    fs: &dyn FsOps,
    _lock: &LockGuard,
    base: Option<&State>,
    changes: &[Change],
) -> Result<State, FsError> {
    if let Err(e) = proxy_lib::certdir::remove_leftovers(fs, dir) {
        tracing::debug!(error = %e, "cannot remove the temp files a crash left");
    }
    let on_disk = State::load(dir);
    let mut state = base.unwrap_or(&on_disk).clone();
    state.apply(changes);
    if state != on_disk {
        let json = serde_json::to_vec_pretty(&state).expect("state serializes");
        let path = dir.join(STATE_FILE);
        proxy_lib::certdir::write_file(fs, &path, &json, proxy_lib::fs::PUBLIC_MODE)?;
    }
    Ok(state)
}

/// [`update_locked`], taking and releasing the store lock around it. Blocks (waits for the
/// lock while another process swaps).
pub fn update(
    dir: &Path,
    fs: &dyn FsOps,
    changes: &[Change],
) -> Result<State, crate::store::StoreError> {
    let lock = crate::store::Store::new(dir, None).lock()?;
    Ok(update_locked(dir, fs, &lock, changes)?)
}

/// The rotator's own record of its state: the state after the last transition, changes the
/// file could not take included, and why the file could not take them. `status` is answered
/// from it by a running daemon (`/status`), so a failure on a full or read-only filesystem,
/// where the state file itself cannot be written, is still reported.
#[derive(Debug, Default)]
pub struct Ledger {
    state: Option<State>,
    /// Why the state file is behind (the last write failed), if it is.
    unsaved: Option<String>,
}

impl Ledger {
    /// Applies one transition's `changes`: to the state file in `dir` under the store lock
    /// (the caller's `lock`, or taken here), and in memory whether or not the file could be
    /// written. After a failed write the next one writes the state held here, which has every
    /// change since (a one-shot `rotate` could not have written the same filesystem meanwhile).
    /// Returns the state after the changes. Blocks.
    pub fn record(
        &mut self,
        dir: &Path,
        fs: &dyn FsOps,
        lock: Option<&LockGuard>,
        changes: &[Change],
    ) -> &State {
        let base = self
            .unsaved
            .is_some()
            .then_some(self.state.as_ref())
            .flatten();
        let written = (|| -> Result<State, String> {
            let taken;
            let lock = match lock {
                Some(lock) => lock,
                None => {
                    taken = crate::store::Store::new(dir, None)
                        .lock()
                        .map_err(|e| e.to_string())?;
                    &taken
                }
            };
            apply_locked(dir, fs, lock, base, changes).map_err(|e| e.to_string())
        })();
        match written {
            Ok(state) => {
                self.state = Some(state);
                self.unsaved = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the state file");
                let mut state = self.state.take().unwrap_or_else(|| State::load(dir));
                state.apply(changes);
                self.state = Some(state);
                self.unsaved = Some(format!("cannot write the state file: {e}"));
            }
        }
        self.state.get_or_insert_default()
    }

    /// The state after the last transition (`None` before the first), and why the state file
    /// is behind it, if it is.
    pub fn snapshot(&self) -> (Option<State>, Option<String>) {
        (self.state.clone(), self.unsaved.clone())
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
    fn changes_apply_under_the_lock_and_an_unchanged_state_is_not_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let failed = |at| Change::Failed {
            at,
            error: "reload failed".into(),
            installed: Some("ab".into()),
        };
        let fs = &proxy_lib::certdir::RealFs;
        let s = update(
            d.path(),
            fs,
            &[failed(5), failed(6), Change::NextRenewal(9)],
        )
        .unwrap();
        assert_eq!((s.failures, s.last_error_at), (2, Some(6)));
        assert_eq!(
            (s.unfinished.as_deref(), s.next_renewal),
            (Some("ab"), Some(9))
        );
        assert_eq!(State::load(d.path()), s);
        // Completed only counts as a success while a rotation is unfinished.
        let s = update(d.path(), fs, &[Change::Completed { at: 7 }]).unwrap();
        assert_eq!(
            (s.failures, s.last_success, s.unfinished),
            (0, Some(7), None)
        );
        let s = update(d.path(), fs, &[Change::Completed { at: 8 }]).unwrap();
        assert_eq!(s.last_success, Some(7));
        // Nothing changes: the file is left as it is.
        let file = d.path().join(STATE_FILE);
        std::fs::write(&file, serde_json::to_vec(&s).unwrap()).unwrap();
        let before = std::fs::read(&file).unwrap();
        update(d.path(), fs, &[Change::NextRenewal(9)]).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), before);
        assert!(d.path().join(crate::store::LOCK_FILE).is_file());
    }

    #[test]
    fn every_update_removes_the_temp_files_a_crash_left() {
        let d = tempfile::tempdir().unwrap();
        let fs = &proxy_lib::certdir::RealFs;
        update(d.path(), fs, &[Change::NextRenewal(1)]).unwrap();
        let stale = [
            format!(".{STATE_FILE}.tmp.00000000deadbeef"),
            "..data_tmp.0000000000000001".to_string(),
        ];
        for name in &stale {
            std::fs::write(d.path().join(name), b"{").unwrap();
        }
        // Even an update that changes nothing (and so writes nothing) tidies up.
        update(d.path(), fs, &[Change::NextRenewal(1)]).unwrap();
        for name in &stale {
            assert!(!d.path().join(name).exists(), "{name} survived");
        }
        assert_eq!(State::load(d.path()).next_renewal, Some(1));
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
