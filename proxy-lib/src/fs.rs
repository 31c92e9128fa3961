//! Atomic, mode-correct file writes: a file is either absent, the old one, or the complete new
//! one, and a secret file is never readable by anyone it should not be, not even for an instant.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Mode for private keys and token files.
pub const SECRET_MODE: u32 = 0o600;
/// Mode for private keys readable by a configured group.
pub const GROUP_SECRET_MODE: u32 = 0o640;
/// Mode for public material.
pub const PUBLIC_MODE: u32 = 0o644;

/// A failed file operation, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct FsError {
    /// What was being done.
    pub op: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl FsError {
    /// Wraps an IO error with context.
    pub fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Creates `path` exclusively (never overwriting) with exactly `mode` (and group `gid` when
/// given, set before any byte is written), writes `data` and fsyncs it. Blocks.
pub fn create_new(path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> Result<(), FsError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| FsError::new("create", path, e))?;
    let res = (|| {
        set_owner_mode(&f, mode, gid)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(path);
        return Err(FsError::new("write", path, e));
    }
    Ok(())
}

/// Replaces `path` atomically: writes a temporary file beside it with the final mode, fsyncs
/// it, renames it over `path` and fsyncs the directory. Blocks.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> Result<(), FsError> {
    replace_via_temp(path, data, mode, gid, None)
}

/// Like [`write_atomic`], but the new file keeps the owner and group the old one had, so a
/// command run as root that rewrites a service's file (the issuer's token store) does not take
/// it away from the service. The temporary file is `mode` and the caller's until it is handed
/// over, just before the rename. Blocks.
pub fn write_atomic_keeping_owner(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    replace_via_temp(path, data, mode, None, owner_of(path))
}

/// Writes a temporary file beside `path` (`mode`, group `gid`, then handed to `owner` when
/// given), renames it over `path` and fsyncs the directory; the temp file never outlives a
/// failure.
fn replace_via_temp(
    path: &Path,
    data: &[u8],
    mode: u32,
    gid: Option<u32>,
    owner: Option<(u32, u32)>,
) -> Result<(), FsError> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{:016x}", rand::random::<u64>()));
    create_new(&tmp, data, mode, gid)?;
    let handed = match owner {
        Some(owner) => chown_to(&tmp, owner),
        None => Ok(()),
    };
    let renamed = handed.and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| FsError::new("rename into", path, e))
    });
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir)
}

/// The owner and group of `path`, when it exists.
pub fn owner_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.uid(), m.gid()))
}

/// Gives `path` to `owner` (uid, gid) unless it already has them. Blocks.
pub fn chown_to(path: &Path, owner: (u32, u32)) -> Result<(), FsError> {
    if owner_of(path) == Some(owner) {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(owner.0), Some(owner.1))
        .map_err(|e| FsError::new("hand over (chown)", path, e))
}

/// Creates `dir` and any missing parents with exactly `mode`, whatever the umask (under
/// `umask 000` a plain `create_dir_all` makes world-writable dirs; under `077` ones the
/// service's group cannot enter), unless it exists. Dirs that exist are left as they are.
/// Blocks.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), FsError> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.is_dir()).collect();
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => std::fs::set_permissions(d, Permissions::from_mode(mode))
                .map_err(|e| FsError::new("chmod", d, e))?,
            // Made meanwhile by someone else: theirs to keep as it is.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(FsError::new("create", d, e)),
        }
    }
    Ok(())
}

/// Fsyncs a directory so that renames and creations in it survive a crash. Blocks.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FsError::new("fsync", dir, e))
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn set_owner_mode(f: &File, mode: u32, gid: Option<u32>) -> io::Result<()> {
    if let Some(gid) = gid {
        std::os::unix::fs::fchown(f, None, Some(gid))?;
    }
    // The umask may have narrowed the mode given to open(2): set it exactly, while the file
    // is still empty.
    f.set_permissions(Permissions::from_mode(mode))
}

/// What tells one version of a file from another, for "has this file changed" checks: its
/// device, inode, size and modification time (to the nanosecond). A file replaced by rename,
/// rewritten in place or touched gets a different stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

impl FileStamp {
    /// The stamp of the file at `path` (symlinks followed), `None` when it cannot be stat'ed
    /// (absent, or not accessible). Blocks (one `stat`).
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.modified().ok(),
        })
    }
}

/// Holds an exclusive advisory lock (flock) on a lock file until dropped.
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
}

/// Takes an exclusive lock on `path` (created 0600 if missing), waiting for other holders.
/// The lock file must be a regular file: a symlink planted in its place is refused, not
/// followed (a root process would otherwise create or truncate whatever it points at).
/// Blocks.
pub fn lock_exclusive(path: &Path) -> Result<LockGuard, FsError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(SECRET_MODE)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                FsError::new(
                    "open lock",
                    path,
                    io::Error::other("is a symlink; refusing to follow it"),
                )
            } else {
                FsError::new("open lock", path, e)
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| FsError::new("stat lock", path, e))?;
    if !meta.file_type().is_file() {
        return Err(FsError::new(
            "open lock",
            path,
            io::Error::other("is not a regular file"),
        ));
    }
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| FsError::new("lock", path, e.into()))?;
    Ok(LockGuard { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn create_new_refuses_to_overwrite_and_sets_exact_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        create_new(&p, b"one", SECRET_MODE, None).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert!(create_new(&p, b"two", SECRET_MODE, None).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
    }

    #[test]
    fn write_atomic_keeping_owner_keeps_the_owner_and_replaces_the_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        // A new file: ours.
        write_atomic_keeping_owner(&p, b"a", SECRET_MODE).unwrap();
        let me = owner_of(&p).unwrap();
        // As root, a file that belongs to someone else stays theirs after the rewrite.
        let other = (me.0 + 4242, me.1 + 4242);
        if rustix::process::geteuid().is_root() {
            chown_to(&p, other).unwrap();
            write_atomic_keeping_owner(&p, b"b", SECRET_MODE).unwrap();
            assert_eq!(owner_of(&p), Some(other));
        } else {
            write_atomic_keeping_owner(&p, b"b", SECRET_MODE).unwrap();
            assert_eq!(owner_of(&p), Some(me));
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"b");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temp file left");
    }

    #[test]
    fn file_stamp_changes_with_replacement_size_and_mtime_and_not_otherwise() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        assert_eq!(FileStamp::of(&p), None);
        std::fs::write(&p, b"one").unwrap();
        let first = FileStamp::of(&p).unwrap();
        assert_eq!(FileStamp::of(&p), Some(first));
        // Same size, new mtime.
        let f = File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::UNIX_EPOCH).unwrap();
        let touched = FileStamp::of(&p).unwrap();
        assert_ne!(touched, first);
        // Replaced by rename with the same size and mtime: another inode.
        let tmp = d.path().join("g");
        std::fs::write(&tmp, b"two").unwrap();
        File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH)
            .unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        let replaced = FileStamp::of(&p).unwrap();
        assert_ne!(replaced, touched);
        // Grown in place.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"!")
            .unwrap();
        assert_ne!(FileStamp::of(&p).unwrap(), replaced);
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        write_atomic(&p, b"a", GROUP_SECRET_MODE, None).unwrap();
        write_atomic(&p, b"b", SECRET_MODE, None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"b");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn ensure_dir_sets_exact_modes_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        // ensure_dir's result does not depend on the umask: it chmods what it creates.
        ensure_dir(&deep, 0o750).unwrap();
        for p in [d.path().join("a"), d.path().join("a/b"), deep.clone()] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().mode() & 0o777,
                0o750,
                "{p:?}"
            );
        }
        // An existing dir is left alone.
        std::fs::set_permissions(&deep, Permissions::from_mode(0o700)).unwrap();
        ensure_dir(&deep, 0o755).unwrap();
        assert_eq!(std::fs::metadata(&deep).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_planted_lock_symlink_is_refused_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere");
        let lock = d.path().join("..lock");
        std::os::unix::fs::symlink(&target, &lock).unwrap();
        let e = lock_exclusive(&lock).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        assert!(
            !target.exists(),
            "nothing was created where the link points"
        );
        let dir_lock = d.path().join("dir-lock");
        std::fs::create_dir(&dir_lock).unwrap();
        assert!(lock_exclusive(&dir_lock).is_err());
        let real = d.path().join("real.lock");
        let _held = lock_exclusive(&real).unwrap();
        assert_eq!(std::fs::metadata(&real).unwrap().mode() & 0o777, 0o600);
    }
}
