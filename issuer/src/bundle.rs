//! The trust bundle the issuer hands to hosts, and the offline `issuer ca sign-bundle`.
//!
//! The issuer serves the anchors it uses (its `ca.crt`, or the trust-roots ConfigMap's
//! `ca-bundle.crt`) over `meshcerts.trust.v1.TrustBundle/Get` ([`proxy_lib::trust_bundle::api`])
//! beside Certify, on the same port and TLS. When `ca.crt.sig` beside `ca.crt` (or the
//! ConfigMap's `ca-bundle.crt.sig`, the same bytes) holds a signature over exactly those
//! anchors, by the key of one of them, the signature goes with them; otherwise the
//! bundle goes out unsigned, and hosts keep the set they have (they accept no change without
//! a signature). The issuer never signs a bundle itself: `issuer ca sign-bundle` does, offline,
//! with an anchor's key. The signature file is read on every request (the ConfigMap comes
//! with its watch), so a published bundle is served as soon as the CA reload has taken the
//! new anchors (within seconds).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use proxy_lib::pem::{self, PrivateKey};
use proxy_lib::trust_bundle::{self, Signature, api};
use rustls_pki_types::CertificateDer;

use crate::error::{Error, Result};
use crate::service::Shared;

/// The signature file beside an anchors file: `<anchors>.sig`.
pub fn sig_path(anchors: &Path) -> PathBuf {
    let mut name = anchors.file_name().unwrap_or_default().to_os_string();
    name.push(".sig");
    anchors.with_file_name(name)
}

/// Where the detached signature of the anchors is published.
#[derive(Debug, Clone)]
pub enum Published {
    /// `ca.crt.sig` beside `ca.crt` (file CA source), read on every request.
    File(PathBuf),
    /// The trust-roots ConfigMap's [`TRUST_ROOTS_SIG_KEY`] (`kubernetes` CA source), as its
    /// watch last saw it.
    ///
    /// [`TRUST_ROOTS_SIG_KEY`]: crate::kubernetes::ca::TRUST_ROOTS_SIG_KEY
    ConfigMap(Arc<crate::kubernetes::ca::KubeCaSource>),
}

impl Published {
    /// The signature text as published now, if any, and where it was read from.
    fn read(&self) -> Option<(Vec<u8>, String)> {
        match self {
            Self::File(p) => std::fs::read(p)
                .ok()
                .map(|text| (text, p.display().to_string())),
            Self::ConfigMap(src) => src.signature().map(|text| (text, src.signature_source())),
        }
    }
}

/// The bundle to serve now: the anchors in use, and the signature published at `sig` when it
/// is one over exactly them by one of them (otherwise the anchors go out unsigned, and the
/// reason is logged at debug level). Blocks (reads the small signature file).
pub fn current(shared: &Shared, sig: Option<&Published>) -> api::Bundle {
    let ca = shared.ca.load();
    let anchors = ca.anchors().certs();
    let signature = sig
        .and_then(Published::read)
        .and_then(|(text, source)| match published(&text, anchors) {
            Ok(s) => Some(s.to_text()),
            Err(reason) => {
                tracing::debug!(%source, %reason, "serving the anchors unsigned");
                None
            }
        })
        .unwrap_or_default();
    api::Bundle {
        anchors: anchors.iter().map(|c| c.to_vec()).collect(),
        signature,
    }
}

/// A published signature, if it is one over `anchors` by one of them.
fn published(
    text: &[u8],
    anchors: &[CertificateDer<'static>],
) -> std::result::Result<Signature, String> {
    let sig = Signature::parse(text).map_err(|e| e.to_string())?;
    trust_bundle::verify(&sig, anchors, anchors)
        .map_err(|e| format!("the signature does not match the anchors in use: {e}"))?;
    Ok(sig)
}

/// The `TrustBundle` service over `shared`, with the signature published at `sig`.
pub fn service(shared: Arc<Shared>, sig: Option<Published>) -> api::TrustBundleServer {
    api::TrustBundleServer::new(Arc::new(move || Ok(current(&shared, sig.as_ref()))))
}

/// Counts one certificate issued by `ca` under the anchor it chains to
/// (`issuer_certify_by_anchor_total{anchor}`, the anchor's SHA-256 short form): during an
/// anchor rotation it shows when every host renews under the new anchor.
pub fn count_issued(metrics: &crate::metrics::Metrics, ca: &crate::ca::Ca) {
    if let Some(anchor) = ca.links().last() {
        metrics.issued_under(trust_bundle::short(&anchor.sha256));
    }
}

/// What `issuer ca sign-bundle` wrote.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The files written: `ca.crt.sig`, then `ca.crt`.
    pub files: Vec<PathBuf>,
    /// The sequence signed.
    pub sequence: u64,
    /// The anchors' fingerprint.
    pub fingerprint: String,
    /// The SHA-256 of the signing anchor.
    pub signer: String,
    /// How many anchors.
    pub count: usize,
}

/// `issuer ca sign-bundle`: signs the anchors in `bundle` at `sequence` (default: `now` in
/// Unix seconds) with `anchor_key` (ECDSA P-256, the key of an anchor in the bundle: a host
/// accepts it when that anchor is one it trusts already), and writes `OUT/ca.crt.sig` then
/// `OUT/ca.crt` (each atomically). Refuses a sequence not above the one of a signature already
/// in `out` (hosts would refuse it as a rollback). Blocks.
pub fn sign_bundle(
    anchor_key: &Path,
    bundle: &Path,
    out: &Path,
    sequence: Option<u64>,
    now: SystemTime,
) -> Result<Signed> {
    let material = |path: &Path, reason: String| Error::CaMaterial {
        path: path.to_path_buf(),
        reason,
    };
    let certs = pem::read_certs(bundle).map_err(|e| material(bundle, e.to_string()))?;
    let key = PrivateKey::read(anchor_key).map_err(|e| material(anchor_key, e.to_string()))?;
    let sequence = sequence.unwrap_or_else(|| proxy_lib::clock::unix_secs(now));
    let sig_file = out.join(trust_bundle::SIG_FILE);
    if let Ok(text) = std::fs::read(&sig_file)
        && let Ok(old) = Signature::parse(&text)
        && old.sequence >= sequence
    {
        return Err(material(
            &sig_file,
            format!(
                "holds sequence {}; a new bundle needs a higher one (hosts refuse a lower or \
                 equal sequence), e.g. --sequence {}",
                old.sequence,
                old.sequence + 1
            ),
        ));
    }
    let sig =
        trust_bundle::sign(&key, sequence, &certs).map_err(|e| material(bundle, e.to_string()))?;
    let signer = trust_bundle::verify(&sig, &certs, &certs).map_err(|_| {
        material(
            anchor_key,
            format!(
                "this key belongs to none of the {} anchor(s) in {}: sign with the key of an \
                 anchor the bundle keeps and the hosts trust now",
                certs.len(),
                bundle.display()
            ),
        )
    })?;
    let signer = proxy_lib::cert::sha256_hex(signer);
    proxy_lib::fs::ensure_dir(out, 0o755)?;
    let ca_file = out.join(trust_bundle::BUNDLE_FILE);
    let public = proxy_lib::fs::PUBLIC_MODE;
    proxy_lib::fs::write_atomic(&sig_file, sig.to_text().as_bytes(), public, None)?;
    proxy_lib::fs::write_atomic(&ca_file, pem::certs_to_pem(&certs).as_bytes(), public, None)?;
    Ok(Signed {
        files: vec![sig_file, ca_file],
        sequence,
        fingerprint: trust_bundle::fingerprint(&certs),
        signer,
        count: certs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_lib::test_util::TestPki;

    fn write_key(dir: &Path, pki: &TestPki) -> PathBuf {
        let p = dir.join("anchor.key");
        let key = PrivateKey::from_pkcs8_der(pki.anchor_key.serialize_der());
        std::fs::write(&p, key.to_pem().as_bytes()).unwrap();
        p
    }

    #[test]
    fn sign_bundle_writes_a_signature_hosts_accept_and_refuses_a_foreign_key_or_old_sequence() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000);
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (TestPki::new(now), TestPki::new(now));
        let both = d.path().join("both.pem");
        std::fs::write(&both, pem::certs_to_pem([&old.anchor, &new.anchor])).unwrap();
        let key = write_key(d.path(), &old);
        let out = d.path().join("ca");
        let s = sign_bundle(&key, &both, &out, Some(10), now).unwrap();
        assert_eq!((s.sequence, s.count), (10, 2));
        assert_eq!(s.signer, proxy_lib::cert::sha256_hex(&old.anchor));
        let certs = pem::read_certs(&out.join("ca.crt")).unwrap();
        let sig = Signature::parse(&std::fs::read(out.join("ca.crt.sig")).unwrap()).unwrap();
        let trusted = [old.anchor.clone()];
        let host = trust_bundle::Trusted {
            certs: &trusted,
            sequence: Some(3),
        };
        assert_eq!(
            trust_bundle::evaluate(&host, &certs, Some(&sig)),
            Ok(trust_bundle::Verdict::Accept)
        );

        // Not above the sequence published already.
        let e = sign_bundle(&key, &both, &out, Some(10), now).unwrap_err();
        assert!(e.to_string().contains("--sequence 11"), "{e}");
        // A key of no anchor in the bundle.
        let stranger = TestPki::new(now);
        let other = d.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let e = sign_bundle(&write_key(&other, &stranger), &both, &out, Some(11), now).unwrap_err();
        assert!(e.to_string().contains("belongs to none"), "{e}");
        assert_eq!(
            Signature::parse(&std::fs::read(out.join("ca.crt.sig")).unwrap())
                .unwrap()
                .sequence,
            10,
            "nothing written"
        );
    }
}
