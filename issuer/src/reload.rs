//! CA reload: a cheap fingerprint of the three CA files polled about once a second with a
//! debounce (a change is acted on once it has been stable for one poll), and SIGHUP; with
//! the `kubernetes` source, every change the watch sees. Only a pair that validates is
//! swapped in; a refused pair is logged and counted, the old one kept, whatever the source.

use proxy_lib::fs::FileStamp;
use rustls_pki_types::CertificateDer;

use crate::ca::{Ca, CaFiles};
use crate::error::Result;
use crate::metrics::ResultLabel;
use crate::service::Shared;

/// What the CA files look like on disk (the [`FileStamp`] of each; `None` = absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Vec<Option<FileStamp>>);

/// Fingerprints the CA files. Blocks (three `stat`s).
pub fn fingerprint(files: &CaFiles) -> Fingerprint {
    Fingerprint(files.all().iter().map(|p| FileStamp::of(p)).collect())
}

/// Debounced change detection over successive fingerprints. Pure.
#[derive(Debug, Clone)]
pub struct Watch {
    applied: Fingerprint,
    pending: Option<Fingerprint>,
}

impl Watch {
    /// Starts from the fingerprint of the material in use.
    pub fn new(applied: Fingerprint) -> Self {
        Self {
            applied,
            pending: None,
        }
    }

    /// Feeds one poll; true when a change has been stable for one poll and should be loaded.
    pub fn poll(&mut self, current: Fingerprint) -> bool {
        if current == self.applied {
            self.pending = None;
            return false;
        }
        if self.pending.as_ref() == Some(&current) {
            self.applied = current;
            self.pending = None;
            return true;
        }
        self.pending = Some(current);
        false
    }

    /// Records that the files as they are now were just tried (e.g. after SIGHUP).
    pub fn tried(&mut self, current: Fingerprint) {
        self.applied = current;
        self.pending = None;
    }
}

/// Loads the CA files and swaps them in if they validate at the shared clock's now; otherwise
/// logs, counts and keeps the CA in use. Returns the issuer certificate replaced (see
/// [`apply`]) or the load error. Blocks.
pub fn reload(shared: &Shared, files: &CaFiles) -> Result<Option<CertificateDer<'static>>> {
    apply(shared, Ca::load(files, shared.clock.now()))
}

/// Swaps in a CA that validated (any source) or, for a load error, logs and counts the
/// refusal and keeps the CA in use. Returns the issuer certificate the new CA replaced (when
/// it brought another issuer; the caller records it so a restart still knows it), or the
/// load error.
pub fn apply(shared: &Shared, loaded: Result<Ca>) -> Result<Option<CertificateDer<'static>>> {
    match loaded {
        Ok(ca) => {
            let old = shared.ca.load();
            let changed = old.cert() != ca.cert();
            let replaced = changed.then(|| old.cert().clone());
            let not_after = ca.window().not_after;
            tracing::info!(
                serial = %ca.info().serial,
                not_after = %proxy_lib::clock::rfc3339(not_after),
                changed,
                "issuer ca loaded"
            );
            shared
                .metrics
                .ca_expiration
                .set(proxy_lib::clock::unix_secs(not_after) as i64);
            shared.issuers.observe(ca.cert(), shared.clock.now());
            shared.ca.store(std::sync::Arc::new(ca));
            shared
                .metrics
                .ca_reloads
                .get_or_create(&ResultLabel { result: "loaded" })
                .inc();
            Ok(replaced)
        }
        Err(error) => {
            tracing::error!(%error, "issuer ca refused; keeping the one in use");
            shared
                .metrics
                .ca_reloads
                .get_or_create(&ResultLabel { result: "refused" })
                .inc();
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct fingerprints for distinct `n` (the watch only compares them).
    fn fp(n: usize) -> Fingerprint {
        Fingerprint(vec![None; n])
    }

    #[test]
    fn acts_once_a_change_is_stable_for_one_poll() {
        let mut w = Watch::new(fp(1));
        assert!(!w.poll(fp(1)));
        assert!(!w.poll(fp(2))); // changed: wait
        assert!(!w.poll(fp(3))); // still changing: wait
        assert!(w.poll(fp(3))); // stable: load
        assert!(!w.poll(fp(3))); // done
        w.tried(fp(4));
        assert!(!w.poll(fp(4)));
    }

    #[test]
    fn fingerprint_sees_replacement_and_absence() {
        let d = tempfile::tempdir().unwrap();
        let files = CaFiles::in_dir(d.path());
        let empty = fingerprint(&files);
        assert!(empty.0.iter().all(Option::is_none));
        std::fs::write(&files.cert, "a").unwrap();
        let one = fingerprint(&files);
        assert_ne!(one, empty);
        proxy_lib::fs::write_atomic(&files.cert, b"a", 0o644, None).unwrap();
        assert_ne!(fingerprint(&files), one);
    }
}
