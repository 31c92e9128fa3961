//! The cert dir and its atomic swap, modelled on Kubernetes' AtomicWriter: each rotation
//! writes a uniquely named hidden version dir, then replaces the `..data` symlink by
//! `rename()`; `DIR/tls.crt` etc. are symlinks into `..data`.
//!
//! Every filesystem change goes through the [`FsOps`] trait, so tests can "crash" the swap
//! after any step and check that a reader still sees one complete set.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use proxy_lib::bundle::{CA_FILE, CERT_FILE, DATA_LINK, KEY_FILE};
use proxy_lib::fs::{GROUP_SECRET_MODE, PUBLIC_MODE, SECRET_MODE};
use proxy_lib::pem::{PrivateKey, certs_to_pem};
use rustls_pki_types::CertificateDer;

/// Prefix of the temporary symlink that becomes `..data`.
pub const DATA_TMP_PREFIX: &str = "..data_tmp.";
/// Prefix of the dir where plain `tls.*` files from an old script are moved aside.
pub const LEGACY_PREFIX: &str = "..pre-rotator.";
/// The lock file that serializes swaps between a daemon and one-shot `rotate`.
pub const LOCK_FILE: &str = "..rotator.lock";
/// Mode of the cert dir and its version dirs (the key file inside has its own).
pub const DIR_MODE: u32 = 0o755;

/// The filesystem operations a swap performs. Each call is one "step" a test can crash at.
pub trait FsOps {
    /// Creates a directory with `mode`.
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()>;
    /// Creates `path` exclusively with its final `mode` (and group), writes `data`, fsyncs.
    fn write_new(&self, path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> io::Result<()>;
    /// Fsyncs a directory.
    fn fsync_dir(&self, path: &Path) -> io::Result<()>;
    /// Creates a symlink `link` pointing at `target`.
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    /// Creates a hard link.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Renames `from` over `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file or symlink.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory tree.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl FsOps for RealFs {
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        std::fs::DirBuilder::new().mode(mode).create(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    fn write_new(&self, path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> io::Result<()> {
        proxy_lib::fs::create_new(path, data, mode, gid).map_err(|e| e.source)
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        proxy_lib::fs::fsync_dir(path).map_err(|e| e.source)
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::hard_link(from, to)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
}

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

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What a swap writes: the chain (leaf first), the key, the anchors.
pub struct NewSet<'a> {
    /// Leaf followed by intermediates (DER).
    pub chain: &'a [CertificateDer<'static>],
    /// The leaf's key.
    pub key: &'a PrivateKey,
    /// The anchors (DER).
    pub anchors: &'a [CertificateDer<'static>],
}

/// A cert dir.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    key_gid: Option<u32>,
}

impl Store {
    /// A store over `dir`; the key is made readable by group `key_gid` (0640) when given.
    pub fn new(dir: impl Into<PathBuf>, key_gid: Option<u32>) -> Self {
        Self {
            dir: dir.into(),
            key_gid,
        }
    }

    /// The cert dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the swap lock (flock on `DIR/..rotator.lock`), creating the dir if needed. Blocks.
    pub fn lock(&self) -> Result<proxy_lib::fs::LockGuard, StoreError> {
        ensure_dir(&self.dir)?;
        Ok(proxy_lib::fs::lock_exclusive(&self.dir.join(LOCK_FILE))?)
    }

    /// Installs `set` as the current version through `fs`. Blocks. The caller holds
    /// [`Store::lock`].
    ///
    /// Steps: version dir with the three files (each created with its final mode and
    /// fsynced), fsync it, `..data_tmp.*` symlink renamed over `..data`, fsync DIR,
    /// top-level symlinks (plain files from an old script are first hard-linked into
    /// `..pre-rotator.<time>/`), fsync DIR, then prune every version dir but the new and the
    /// previous one, and any crash leftovers. Returns the new version dir.
    pub fn swap(
        &self,
        fs: &dyn FsOps,
        set: &NewSet<'_>,
        now: SystemTime,
    ) -> Result<PathBuf, StoreError> {
        let dir = &self.dir;
        ensure_dir(dir)?;
        let previous = current_version(dir);

        let name = version_name(now);
        let version = dir.join(&name);
        fs.create_dir(&version, DIR_MODE)
            .map_err(io_err("create version dir", &version))?;
        let key_mode = if self.key_gid.is_some() {
            GROUP_SECRET_MODE
        } else {
            SECRET_MODE
        };
        let cert_path = version.join(CERT_FILE);
        fs.write_new(
            &cert_path,
            certs_to_pem(set.chain).as_bytes(),
            PUBLIC_MODE,
            None,
        )
        .map_err(io_err("write", &cert_path))?;
        let key_path = version.join(KEY_FILE);
        let key_pem = set.key.to_pem();
        fs.write_new(&key_path, key_pem.as_bytes(), key_mode, self.key_gid)
            .map_err(io_err("write", &key_path))?;
        drop(key_pem);
        let ca_path = version.join(CA_FILE);
        fs.write_new(
            &ca_path,
            certs_to_pem(set.anchors).as_bytes(),
            PUBLIC_MODE,
            None,
        )
        .map_err(io_err("write", &ca_path))?;
        fs.fsync_dir(&version).map_err(io_err("fsync", &version))?;

        let tmp = dir.join(format!("{DATA_TMP_PREFIX}{:016x}", rand::random::<u64>()));
        fs.symlink(Path::new(&name), &tmp)
            .map_err(io_err("symlink", &tmp))?;
        let data = dir.join(DATA_LINK);
        fs.rename(&tmp, &data)
            .map_err(io_err("rename over", &data))?;
        fs.fsync_dir(dir).map_err(io_err("fsync", dir))?;

        self.link_top_level(fs, now)?;
        self.prune(fs, &name, previous.as_deref())?;
        Ok(version)
    }

    /// Makes `DIR/tls.crt` etc. symlinks into `..data`, moving plain files aside first.
    fn link_top_level(&self, fs: &dyn FsOps, now: SystemTime) -> Result<(), StoreError> {
        let dir = &self.dir;
        let mut changed = false;
        let mut legacy: Option<PathBuf> = None;
        for f in [CERT_FILE, KEY_FILE, CA_FILE] {
            let link = dir.join(f);
            let want = Path::new(DATA_LINK).join(f);
            match std::fs::symlink_metadata(&link) {
                Ok(m) if m.file_type().is_symlink() => {
                    if std::fs::read_link(&link).ok().as_deref() == Some(want.as_path()) {
                        continue;
                    }
                }
                Ok(m) if m.is_file() => {
                    // A plain file from an old cron script: keep a copy, then replace it.
                    let aside = match &legacy {
                        Some(d) => d.clone(),
                        None => {
                            let d = dir.join(format!("{LEGACY_PREFIX}{}", version_stamp(now)));
                            if !d.exists() {
                                fs.create_dir(&d, 0o700).map_err(io_err("create", &d))?;
                            }
                            legacy = Some(d.clone());
                            d
                        }
                    };
                    let to = aside.join(f);
                    if !to.exists() {
                        fs.hard_link(&link, &to)
                            .map_err(io_err("move aside", &link))?;
                    }
                    tracing::info!(file = %link.display(), to = %to.display(), "moved a plain file aside");
                }
                Ok(_) | Err(_) => {}
            }
            let tmp = dir.join(format!("..{f}_tmp.{:016x}", rand::random::<u64>()));
            fs.symlink(&want, &tmp).map_err(io_err("symlink", &tmp))?;
            fs.rename(&tmp, &link)
                .map_err(io_err("rename over", &link))?;
            changed = true;
        }
        if changed {
            fs.fsync_dir(dir).map_err(io_err("fsync", dir))?;
        }
        Ok(())
    }

    /// Removes every version dir except `keep` and `previous`, and temp symlinks left by a
    /// crash.
    fn prune(&self, fs: &dyn FsOps, keep: &str, previous: Option<&str>) -> Result<(), StoreError> {
        let dir = &self.dir;
        let mut removed = false;
        let entries = std::fs::read_dir(dir).map_err(io_err("list", dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..")
                || name == DATA_LINK
                || name == LOCK_FILE
                || name == keep
                || Some(name.as_str()) == previous
                || name.starts_with(LEGACY_PREFIX)
                || name == crate::state::STATE_FILE
            {
                continue;
            }
            let path = entry.path();
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if is_dir && is_version_name(&name) {
                fs.remove_dir_all(&path).map_err(io_err("remove", &path))?;
                removed = true;
            } else if !is_dir && name.contains("_tmp.") {
                fs.remove_file(&path).map_err(io_err("remove", &path))?;
                removed = true;
            }
        }
        if removed {
            fs.fsync_dir(dir).map_err(io_err("fsync", dir))?;
        }
        Ok(())
    }
}

fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    Ok(proxy_lib::fs::ensure_dir(dir, DIR_MODE)?)
}

/// The name of the version dir `..data` points at, if any.
pub fn current_version(dir: &Path) -> Option<String> {
    std::fs::read_link(dir.join(DATA_LINK))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// A fresh version dir name, `..<yyyy_mm_dd_hh_mm_ss>.<random>` (Kubernetes' form).
fn version_name(now: SystemTime) -> String {
    format!("..{}.{:010}", version_stamp(now), rand::random::<u32>())
}

fn version_stamp(now: SystemTime) -> String {
    let t: chrono::DateTime<chrono::Utc> = now.into();
    t.format("%Y_%m_%d_%H_%M_%S").to_string()
}

/// Whether `name` looks like a version dir written by [`Store::swap`].
pub fn is_version_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("..") else {
        return false;
    };
    let Some((stamp, random)) = rest.split_once('.') else {
        return false;
    };
    stamp.len() == 19
        && stamp.bytes().all(|b| b.is_ascii_digit() || b == b'_')
        && !random.is_empty()
        && random.bytes().all(|b| b.is_ascii_digit())
}

/// Version dirs present in `dir` (for tests and `status`).
pub fn version_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_version_name(n))
        .collect();
    v.sort();
    v
}

/// Mode and group of a file (for tests and `status`).
pub fn mode_and_gid(path: &Path) -> io::Result<(u32, u32)> {
    let m = std::fs::metadata(path)?;
    Ok((m.mode() & 0o7777, m.gid()))
}

#[cfg(test)]
mod tests;
