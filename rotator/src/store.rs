//! The rotator's cert dir: the floor's crash-safe [`Writer`] (the layout and every step of the
//! atomic swap live in [`proxy_lib::certdir`]) plus the lock that serializes swaps between a
//! daemon and one-shot `rotate`. The rotator's state file lives in the same dir.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use proxy_lib::certdir::Writer;
pub use proxy_lib::certdir::{
    DATA_TMP_PREFIX, DIR_MODE, FsOps, LEGACY_PREFIX, NewSet, RealFs, current_version,
    is_version_name, mode_and_gid, version_dirs,
};

/// The lock file that serializes swaps between a daemon and one-shot `rotate`.
pub const LOCK_FILE: &str = "..rotator.lock";

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A filesystem step failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The step.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl From<proxy_lib::fs::FsError> for StoreError {
    fn from(e: proxy_lib::fs::FsError) -> Self {
        StoreError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

/// A cert dir.
#[derive(Debug, Clone)]
pub struct Store {
    writer: Writer,
}

impl Store {
    /// A store over `dir`; the key is made readable by group `key_gid` (0640) when given.
    pub fn new(dir: impl Into<PathBuf>, key_gid: Option<u32>) -> Self {
        Self {
            writer: Writer::new(dir, key_gid),
        }
    }

    /// The cert dir.
    pub fn dir(&self) -> &Path {
        self.writer.dir()
    }

    /// Takes the swap lock (flock on `DIR/..rotator.lock`), creating the dir if needed. Blocks.
    pub fn lock(&self) -> Result<proxy_lib::fs::LockGuard, StoreError> {
        proxy_lib::fs::ensure_dir(self.dir(), DIR_MODE)?;
        Ok(proxy_lib::fs::lock_exclusive(&self.dir().join(LOCK_FILE))?)
    }

    /// Checks that the dir can be written before a cert is asked for
    /// ([`Writer::check_writable`]: a probe file written through `fs` and removed). Blocks.
    pub fn check_writable(&self, fs: &dyn FsOps) -> Result<(), StoreError> {
        Ok(self.writer.check_writable(fs)?)
    }

    /// Installs `set` as the current version through `fs` with the floor's crash-safe writer
    /// ([`Writer::write`]: version dir, `..data` renamed over, top-level symlinks, pruning to
    /// one previous version; the lock and state files are left alone). Blocks. The caller
    /// holds [`Store::lock`]. Returns the new version dir.
    pub fn swap(
        &self,
        fs: &dyn FsOps,
        set: &NewSet<'_>,
        now: SystemTime,
    ) -> Result<PathBuf, StoreError> {
        Ok(self.writer.write(fs, set, now)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    use proxy_lib::identity::Identity;
    use proxy_lib::test_util::TestPki;

    #[test]
    fn swaps_under_the_lock_keep_the_lock_and_state_files_and_one_previous_version() {
        let now = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let pki = TestPki::new(now);
        let id = Identity::parse("db.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let d = crate::testing::fast_tempdir();
        let dir = d.path().join("certs");
        let store = Store::new(&dir, None);
        let _lock = store.lock().unwrap();
        let state = crate::state::State {
            serial: Some("kept".into()),
            ..Default::default()
        };
        state.save(&dir).unwrap();
        let mut last = None;
        for i in 0..3 {
            let b = pki.leaf(&id, now, now + Duration::from_secs(86_400));
            let set = NewSet {
                chain: &b.chain,
                key: &b.key,
                anchors: b.anchors.certs(),
                anchors_sig: None,
            };
            last = Some(
                store
                    .swap(&RealFs, &set, now + Duration::from_secs(i))
                    .unwrap(),
            );
        }
        assert_eq!(proxy_lib::certdir::resolve_data_dir(&dir), last.unwrap());
        assert_eq!(version_dirs(&dir).len(), 2);
        assert!(dir.join(LOCK_FILE).is_file());
        assert_eq!(crate::state::State::load(&dir), state);
    }
}
