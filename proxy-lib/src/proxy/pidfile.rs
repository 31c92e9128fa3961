//! The pidfile: written (atomically, 0644) once the proxy can take signals, removed on clean
//! exit.

use std::path::{Path, PathBuf};

use crate::fs::{FsError, PUBLIC_MODE, write_atomic};

/// A written pidfile; removed when dropped.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
}

impl Pidfile {
    /// Writes this process's pid to `path`. Blocks.
    pub fn create(path: &Path) -> Result<Self, FsError> {
        let pid = std::process::id();
        write_atomic(path, format!("{pid}\n").as_bytes(), PUBLIC_MODE, None)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            tracing::warn!(%error, path = %self.path.display(), "cannot remove pidfile");
        }
    }
}
