//! The pidfile: written (atomically, 0644) once the proxy can take signals, removed on clean
//! exit — but only while it still names this process.
//!
//! A pidfile naming a live `mtls-proxy` (another instance) makes the proxy refuse to start, so
//! the rotator's SIGHUP never reaches the wrong one. A pidfile left by a dead process, or naming
//! a pid the kernel has since given to another program, is stale and taken over.

use std::path::{Path, PathBuf};

use crate::fs::{FsError, PUBLIC_MODE, write_atomic};
use crate::process;

/// The program name a live pidfile holder must run to count as another instance (besides
/// whatever name this process itself runs under, for a renamed binary).
pub const PROCESS_NAME: &str = "mtls-proxy";

/// Why the pidfile could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PidfileError {
    /// Another instance holds it.
    #[error(
        "another mtls-proxy (pid {pid}) is running with pidfile {}; stop it or give this one another --pidfile",
        path.display()
    )]
    Running {
        /// The pidfile.
        path: PathBuf,
        /// The other instance.
        pid: i32,
    },
    /// It could not be written.
    #[error("cannot write the pidfile: {0}")]
    Write(#[from] FsError),
}

/// A written pidfile; removed when dropped if it still names this process.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
}

impl Pidfile {
    /// Fails when `path` names another live instance; a missing or stale pidfile is fine.
    /// Blocks briefly (reads the file and `/proc`).
    pub fn check(path: &Path) -> Result<(), PidfileError> {
        let Ok(pid) = process::read_pid(path) else {
            return Ok(());
        };
        if pid != own_pid() && is_instance(pid) {
            return Err(PidfileError::Running {
                path: path.to_path_buf(),
                pid,
            });
        }
        Ok(())
    }

    /// Writes this process's pid to `path`, after [`Pidfile::check`]; a stale pidfile is
    /// replaced (and said so). Blocks.
    pub fn create(path: &Path) -> Result<Self, PidfileError> {
        Self::check(path)?;
        if let Ok(stale) = process::read_pid(path)
            && stale != own_pid()
        {
            tracing::info!(path = %path.display(), pid = stale, "taking over a stale pidfile");
        }
        write_atomic(
            path,
            format!("{}\n", own_pid()).as_bytes(),
            PUBLIC_MODE,
            None,
        )?;
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
        let path = self.path.display();
        match process::read_pid(&self.path) {
            Ok(pid) if pid == own_pid() => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(%error, %path, "cannot remove pidfile");
                }
            }
            Ok(pid) => {
                tracing::info!(%path, pid, "pidfile now names another process; left in place");
            }
            Err(reason) => tracing::debug!(%path, %reason, "pidfile already gone"),
        }
    }
}

fn own_pid() -> i32 {
    std::process::id() as i32
}

/// Whether `pid` runs `mtls-proxy`, or the same program as this process.
fn is_instance(pid: i32) -> bool {
    let theirs = process::names(pid);
    process::name_matches(&theirs, PROCESS_NAME)
        || process::names(own_pid())
            .iter()
            .any(|mine| process::name_matches(&theirs, mine))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written_pid(path: &Path) -> i32 {
        process::read_pid(path).unwrap()
    }

    #[test]
    fn a_stale_pidfile_is_taken_over_and_a_foreign_one_is_never_removed() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.pid");
        // A dead pid: a child that has been reaped.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        std::fs::write(&path, format!("{dead_pid}\n")).unwrap();
        let p = Pidfile::create(&path).unwrap();
        assert_eq!(written_pid(&path), own_pid());
        drop(p);
        assert!(!path.exists(), "our own pidfile is removed");

        // A live pid running another program, and garbage: stale too.
        let other = Reaped(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap(),
        );
        for text in [format!("{}\n", other.0.id()), "garbage".to_string()] {
            std::fs::write(&path, text).unwrap();
            Pidfile::check(&path).unwrap();
            let p = Pidfile::create(&path).unwrap();
            assert_eq!(written_pid(&path), own_pid());
            // Someone else took the pidfile meanwhile: it is theirs, left in place.
            std::fs::write(&path, format!("{}\n", other.0.id())).unwrap();
            drop(p);
            assert_eq!(written_pid(&path), other.0.id() as i32);
        }
    }

    /// Kills and reaps the child when dropped, also when the test fails.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
