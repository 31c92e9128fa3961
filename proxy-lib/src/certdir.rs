//! The cert-dir layout and its one reader and one writer.
//!
//! Layout of a cert dir `DIR` (the model is Kubernetes' AtomicWriter):
//! ```text
//! DIR/..<yyyy_mm_dd_hh_mm_ss>.<random>/{tls.crt,tls.key,ca.crt}   one complete version
//!                                   (+ ca.crt.sig when ca.crt is a signed trust bundle)
//! DIR/..data -> ..<yyyy_mm_dd_hh_mm_ss>.<random>                  swapped by rename()
//! DIR/tls.crt -> ..data/tls.crt                                    (and tls.key, ca.crt)
//! ```
//! A version dir is never changed once `..data` points at it.
//!
//! Reading ([`read_snapshot`]): resolve `..data` once and read every file through the resolved
//! version dir, so the files always come from one version; when the writer prunes that version
//! mid-read, resolve again. A dir without `..data` is read as plain files.
//!
//! Writing ([`Writer::write`]): a fresh version dir whose files are each created with their
//! final mode and fsynced, the dir fsynced, a temporary symlink renamed over `..data`, `DIR`
//! fsynced, the top-level symlinks put in place (plain files left by an old script are first
//! hard-linked into `..pre-rotator.<time>/`), then every version dir but the new and the
//! previous one, and any temp file left by a crash ([`is_leftover`]), removed. A crash (or SIGKILL) after any
//! step leaves readers the old or the new complete set; the next write cleans up. Every change
//! goes through [`FsOps`], so tests can crash the write after any step.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::fs::{FsError, GROUP_SECRET_MODE, PUBLIC_MODE, SECRET_MODE};
use crate::pem::{PrivateKey, certs_to_pem};

/// The symlink naming the current version dir.
pub const DATA_LINK: &str = "..data";
/// Leaf followed by intermediates, PEM.
pub const CERT_FILE: &str = "tls.crt";
/// The leaf's private key, PEM.
pub const KEY_FILE: &str = "tls.key";
/// Trust anchor bundle, PEM.
pub const CA_FILE: &str = "ca.crt";
/// The three files of one version, in the order they are written.
pub const FILES: [&str; 3] = [CERT_FILE, KEY_FILE, CA_FILE];
/// Prefix of the temporary symlink that becomes `..data`.
pub const DATA_TMP_PREFIX: &str = "..data_tmp.";
/// Prefix of the dir where plain `tls.*` files from an old script are moved aside.
pub const LEGACY_PREFIX: &str = "..pre-rotator.";
/// Mode of the cert dir and its version dirs (the key file inside has its own).
pub const DIR_MODE: u32 = 0o755;

/// How many times [`read_snapshot`] resolves `..data` again after the version it was reading
/// vanished.
const READ_ATTEMPTS: usize = 5;

/// The directory `..data` points at (absolute), or `dir` itself when there is no `..data`.
pub fn resolve_data_dir(dir: &Path) -> PathBuf {
    let link = dir.join(DATA_LINK);
    match std::fs::read_link(&link) {
        Ok(target) if target.is_absolute() => target,
        Ok(target) => dir.join(target),
        Err(_) => dir.to_path_buf(),
    }
}

/// The name of the version dir `..data` points at, if any.
pub fn current_version(dir: &Path) -> Option<String> {
    std::fs::read_link(dir.join(DATA_LINK))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Whether `name` looks like a version dir written by [`Writer::write`].
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

/// Version dirs present in `dir`, sorted (for tests and `status`).
pub fn version_dirs(dir: &Path) -> Vec<String> {
    names_in(dir, is_version_name)
}

/// Whether `name` is a temporary name a write uses for a moment: the writer's own
/// (`..data_tmp.*`, `..tls.crt_tmp.*`, the writability probe `..probe_tmp.*`) and the temp file
/// of an atomic replace of a dotted file in the dir (`.<name>.tmp.<16 hex digits>`, as
/// [`write_file`] and [`crate::fs::write_atomic`] name it, e.g. `...rotator-state.json.tmp.*`).
/// One found between writes was left by a crash, and the next write (or
/// [`remove_leftovers`]) removes it.
pub fn is_leftover(name: &str) -> bool {
    if name.starts_with("..") && name.contains("_tmp.") {
        return true;
    }
    name.starts_with("..")
        && name
            .rsplit_once(".tmp.")
            .is_some_and(|(_, hex)| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The crash leftovers ([`is_leftover`]) present in `dir`, sorted (for tests and `status`).
pub fn leftovers(dir: &Path) -> Vec<String> {
    names_in(dir, is_leftover)
}

/// The names in `dir` that `select` picks, sorted (none for an unreadable dir).
fn names_in(dir: &Path, select: fn(&str) -> bool) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| select(n))
        .collect();
    v.sort();
    v
}

/// Mode and group of a file (for tests and `status`).
pub fn mode_and_gid(path: &Path) -> io::Result<(u32, u32)> {
    let m = std::fs::metadata(path)?;
    Ok((m.mode() & 0o7777, m.gid()))
}

/// An error of a snapshot read, as [`read_snapshot`] needs to see it.
pub trait SnapshotError {
    /// Whether a file of the version being read was not found (the version may have been
    /// pruned mid-read).
    fn vanished(&self) -> bool;
    /// The error for a dir whose version kept vanishing while it was read.
    fn unstable(dir: &Path) -> Self;
}

/// Runs `read` on the version dir `..data` resolves to (or `dir` itself without `..data`) and
/// returns what it read and that version dir. When a file of a linked version vanished
/// ([`SnapshotError::vanished`]), `..data` is resolved again, a few times, before giving up
/// with [`SnapshotError::unstable`]. A plain dir is never retried. Blocks as `read` does.
pub fn read_snapshot<T, E: SnapshotError>(
    dir: &Path,
    mut read: impl FnMut(&Path) -> Result<T, E>,
) -> Result<(T, PathBuf), E> {
    for _ in 0..READ_ATTEMPTS {
        let version = resolve_data_dir(dir);
        match read(&version) {
            Ok(v) => return Ok((v, version)),
            Err(e) if e.vanished() && version != dir => continue,
            Err(e) => return Err(e),
        }
    }
    Err(E::unstable(dir))
}

/// The filesystem operations a write performs. Each call is one "step" a test can crash at.
pub trait FsOps {
    /// Creates a directory with exactly `mode`.
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
        crate::fs::create_new(path, data, mode, gid).map_err(|e| e.source)
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        crate::fs::fsync_dir(path).map_err(|e| e.source)
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

/// What a write installs: the chain (leaf first), the key, the anchors.
pub struct NewSet<'a> {
    /// Leaf followed by intermediates (DER).
    pub chain: &'a [CertificateDer<'static>],
    /// The leaf's key.
    pub key: &'a PrivateKey,
    /// The anchors (DER).
    pub anchors: &'a [CertificateDer<'static>],
    /// The detached signature of the anchors, when they are a signed trust bundle
    /// ([`crate::trust_bundle`]): written as `ca.crt.sig` in the same version dir.
    pub anchors_sig: Option<&'a str>,
}

/// The crash-safe writer of one cert dir. It takes no lock: callers that may write the same
/// dir concurrently serialise themselves (the rotator holds its store lock).
#[derive(Debug, Clone)]
pub struct Writer {
    dir: PathBuf,
    key_gid: Option<u32>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError::new(op, path, source)
}

impl Writer {
    /// A writer over `dir`; the key is created readable by group `key_gid` (0640) when given,
    /// by its owner alone (0600) otherwise.
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

    /// Checks through `fs` that a write can succeed before anything is asked for: creates the dir
    /// if missing, writes a probe file of a few KiB (`..probe_tmp.*`, fsynced) and removes it.
    /// A read-only or full filesystem, or a dir the process may not write, fails here with the
    /// OS error. Blocks.
    pub fn check_writable(&self, fs: &dyn FsOps) -> Result<(), FsError> {
        let dir = &self.dir;
        crate::fs::ensure_dir(dir, DIR_MODE)?;
        let probe = dir.join(format!("..probe_tmp.{:016x}", rand::random::<u64>()));
        fs.write_new(&probe, &[0; PROBE_SIZE], SECRET_MODE, None)
            .map_err(io_err("write a probe file in", dir))?;
        match fs.remove_file(&probe) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(FsError::new("remove the probe file", &probe, e))
            }
            _ => Ok(()),
        }
    }

    /// Installs `set` as the current version through `fs` (the steps are in the module doc;
    /// `now` names the version dir). Creates the dir if missing. Only version dirs, crash
    /// leftovers ([`is_leftover`]) and the top-level `tls.*` names are ever changed: other files
    /// in the dir (a caller's lock or state file) are left alone. Returns the new version dir.
    /// Blocks.
    pub fn write(
        &self,
        fs: &dyn FsOps,
        set: &NewSet<'_>,
        now: SystemTime,
    ) -> Result<PathBuf, FsError> {
        let dir = &self.dir;
        crate::fs::ensure_dir(dir, DIR_MODE)?;
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
        let cert_pem = certs_to_pem(set.chain);
        // Zeroized on drop.
        let key_pem = set.key.to_pem();
        let ca_pem = certs_to_pem(set.anchors);
        let files = [
            (CERT_FILE, cert_pem.as_bytes(), PUBLIC_MODE, None),
            (KEY_FILE, key_pem.as_bytes(), key_mode, self.key_gid),
            (CA_FILE, ca_pem.as_bytes(), PUBLIC_MODE, None),
        ];
        for (file, data, mode, gid) in files {
            let path = version.join(file);
            fs.write_new(&path, data, mode, gid)
                .map_err(io_err("write", &path))?;
        }
        drop(key_pem);
        if let Some(sig) = set.anchors_sig {
            let path = version.join(crate::trust_bundle::SIG_FILE);
            fs.write_new(&path, sig.as_bytes(), PUBLIC_MODE, None)
                .map_err(io_err("write", &path))?;
        }
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
    fn link_top_level(&self, fs: &dyn FsOps, now: SystemTime) -> Result<(), FsError> {
        let dir = &self.dir;
        let mut changed = false;
        let mut legacy: Option<PathBuf> = None;
        for f in FILES {
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
    /// crash. Nothing else is touched.
    fn prune(&self, fs: &dyn FsOps, keep: &str, previous: Option<&str>) -> Result<(), FsError> {
        let dir = &self.dir;
        let mut removed = false;
        let entries = std::fs::read_dir(dir).map_err(io_err("list", dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..")
                || name == DATA_LINK
                || name == keep
                || Some(name.as_str()) == previous
                || name.starts_with(LEGACY_PREFIX)
            {
                continue;
            }
            let path = entry.path();
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if is_dir && is_version_name(&name) {
                fs.remove_dir_all(&path).map_err(io_err("remove", &path))?;
                removed = true;
            } else if !is_dir && is_leftover(&name) {
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

/// Removes every crash leftover ([`is_leftover`], never a dir) from `dir` through `fs`, fsyncing
/// `dir` when something went. The caller serialises this with every write into `dir` (the
/// rotator holds its store lock), so no leftover is a write in progress. Blocks.
pub fn remove_leftovers(fs: &dyn FsOps, dir: &Path) -> Result<usize, FsError> {
    let mut removed = 0;
    for name in leftovers(dir) {
        let path = dir.join(&name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        match fs.remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FsError::new("remove", &path, e)),
        }
    }
    if removed > 0 {
        fs.fsync_dir(dir).map_err(io_err("fsync", dir))?;
    }
    Ok(removed)
}

/// Replaces `path` atomically through `fs`: the data goes to `.<name>.tmp.<random>` beside it
/// (created with its final `mode`, written, fsynced), which is renamed over `path`, and the
/// directory is fsynced. On a failure the temp file is removed when `fs` still can; one a
/// crash leaves behind is a leftover ([`is_leftover`]). Blocks.
pub fn write_file(fs: &dyn FsOps, path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{:016x}", rand::random::<u64>()));
    let written = fs
        .write_new(&tmp, data, mode, None)
        .map_err(io_err("write", &tmp))
        .and_then(|()| fs.rename(&tmp, path).map_err(io_err("rename into", path)));
    if let Err(e) = written {
        let _ = fs.remove_file(&tmp);
        return Err(e);
    }
    fs.fsync_dir(dir).map_err(io_err("fsync", dir))
}

/// The size of the writability probe: a block or so, enough that a full filesystem refuses it.
const PROBE_SIZE: usize = 8192;

/// A fresh version dir name, `..<yyyy_mm_dd_hh_mm_ss>.<random>` (Kubernetes' form).
fn version_name(now: SystemTime) -> String {
    format!("..{}.{:010}", version_stamp(now), rand::random::<u32>())
}

/// `yyyy_mm_dd_hh_mm_ss` in UTC.
fn version_stamp(now: SystemTime) -> String {
    // `2026-11-27T07:36:06Z` → `2026_11_27_07_36_06`.
    crate::clock::rfc3339(now.max(std::time::UNIX_EPOCH))
        .trim_end_matches('Z')
        .replace(['-', 'T', ':'], "_")
}

#[cfg(test)]
mod tests;
