//! A certificate chain, its private key and the trust anchors, loaded and checked as one unit.
//!
//! The on-disk layout they are read from belongs to [`crate::certdir`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::cert::{CertInfo, CertParseError};
use crate::certdir::{CA_FILE, CERT_FILE, KEY_FILE, SnapshotError};
use crate::pem::{self, PemError, PrivateKey};
use crate::verify::{TrustAnchors, Usage, VerifyError};

/// Why a bundle could not be loaded or is not fit to serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// A file could not be read or parsed.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The anchors are unusable.
    #[error(transparent)]
    Anchors(#[from] VerifyError),
    /// The leaf certificate is not valid DER.
    #[error("leaf certificate: {0}")]
    Leaf(#[from] CertParseError),
    /// The version dir vanished repeatedly while it was being read.
    #[error("{dir}: the certificate set kept changing while it was being read")]
    Unstable {
        /// The cert dir.
        dir: PathBuf,
    },
    /// The private key does not belong to the leaf certificate.
    #[error("private key does not match the certificate (serial {serial})")]
    KeyMismatch {
        /// Serial of the leaf.
        serial: String,
    },
    /// The private key is not usable for TLS.
    #[error("private key is not usable: {0}")]
    BadKey(String),
    /// The leaf is outside its validity window.
    #[error("certificate (serial {serial}) is not valid now: valid {not_before} .. {not_after}")]
    NotValidNow {
        /// Serial of the leaf.
        serial: String,
        /// RFC 3339.
        not_before: String,
        /// RFC 3339.
        not_after: String,
    },
    /// The chain does not validate against the anchors.
    #[error("certificate (serial {serial}) does not chain to the trust anchors: {reason}")]
    Untrusted {
        /// Serial of the leaf.
        serial: String,
        /// What path validation said.
        reason: String,
    },
}

/// A leaf + intermediates, the leaf's key, and the anchors, from one rotation.
#[derive(Clone)]
pub struct CertBundle {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKey,
    /// The trust anchors that came with it.
    pub anchors: TrustAnchors,
    /// Facts about the leaf.
    pub leaf: CertInfo,
}

impl CertBundle {
    /// Assembles a bundle and reads the leaf. Does not check it: see [`CertBundle::check`].
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKey,
        anchors: TrustAnchors,
    ) -> Result<Self, BundleError> {
        let first = chain
            .first()
            .ok_or_else(|| PemError::NoCertificate(CERT_FILE.into()))?;
        let leaf = CertInfo::from_der(first)?;
        Ok(Self {
            chain,
            key,
            anchors,
            leaf,
        })
    }

    /// Loads the current set from a cert dir, through a once-resolved `..data` (one consistent
    /// snapshot; retried if a pruned version dir vanishes mid-read, see
    /// [`crate::certdir::read_snapshot`]). A dir without `..data` is read as plain files.
    /// Blocks. Returns the bundle and the dir it was read from.
    pub fn load_dir(dir: &Path) -> Result<(Self, PathBuf), BundleError> {
        crate::certdir::read_snapshot(dir, Self::load_files)
    }

    /// Like [`CertBundle::load_dir`], with `anchors` (e.g. from a separate file) instead of
    /// the dir's `ca.crt`, which is then not read. Blocks.
    pub fn load_dir_with_anchors(
        dir: &Path,
        anchors: TrustAnchors,
    ) -> Result<(Self, PathBuf), BundleError> {
        crate::certdir::read_snapshot(dir, |version| {
            let (chain, key) = read_chain_and_key(version)?;
            Self::from_parts(chain, key, anchors.clone())
        })
    }

    /// Loads `tls.crt`, `tls.key` and `ca.crt` from one directory. Blocks.
    pub fn load_files(dir: &Path) -> Result<Self, BundleError> {
        let (chain, key) = read_chain_and_key(dir)?;
        let anchors = TrustAnchors::read(&dir.join(CA_FILE))?;
        Self::from_parts(chain, key, anchors)
    }

    /// Checks that the key matches the leaf, the leaf is valid at `now`, and the chain
    /// validates against the anchors for both server and client use. Pure.
    pub fn check(&self, now: SystemTime) -> Result<(), BundleError> {
        if !key_matches(&self.key, &self.leaf)? {
            return Err(BundleError::KeyMismatch {
                serial: self.leaf.serial.clone(),
            });
        }
        if !self.leaf.is_valid_at(now) {
            return Err(BundleError::NotValidNow {
                serial: self.leaf.serial.clone(),
                not_before: crate::clock::rfc3339(self.leaf.not_before),
                not_after: crate::clock::rfc3339(self.leaf.not_after),
            });
        }
        for usage in [Usage::Server, Usage::Client] {
            self.anchors
                .verify_leaf(&self.chain[0], &self.chain[1..], now, usage)
                .map_err(|e| BundleError::Untrusted {
                    serial: self.leaf.serial.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// The chain and key as a rustls `CertifiedKey`.
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, BundleError> {
        let signing = crate::crypto_provider()
            .key_provider
            .load_private_key(self.key.to_rustls())
            .map_err(|e| BundleError::BadKey(e.to_string()))?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            self.chain.clone(),
            signing,
        )))
    }
}

impl std::fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertBundle")
            .field("serial", &self.leaf.serial)
            .field("sha256", &self.leaf.sha256)
            .field("chain_len", &self.chain.len())
            .field("key", &self.key)
            .finish()
    }
}

/// Whether `key`'s public half is the leaf's public key.
pub fn key_matches(key: &PrivateKey, leaf: &CertInfo) -> Result<bool, BundleError> {
    let pair = key
        .to_rcgen()
        .map_err(|e| BundleError::BadKey(e.to_string()))?;
    Ok(leaf.is_certified_key(&pair))
}

type Chain = Vec<CertificateDer<'static>>;

fn read_chain_and_key(dir: &Path) -> Result<(Chain, PrivateKey), PemError> {
    let chain = pem::read_certs(&dir.join(CERT_FILE))?;
    let key = PrivateKey::read(&dir.join(KEY_FILE))?;
    Ok((chain, key))
}

impl SnapshotError for BundleError {
    fn vanished(&self) -> bool {
        matches!(self, BundleError::Pem(PemError::Io { source, .. })
            if source.kind() == io::ErrorKind::NotFound)
    }

    fn unstable(dir: &Path) -> Self {
        BundleError::Unstable {
            dir: dir.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certdir::DATA_LINK;
    use std::time::Duration;

    struct Pki {
        ca_der: CertificateDer<'static>,
        leaf_der: CertificateDer<'static>,
        leaf_key: PrivateKey,
        now: SystemTime,
    }

    fn pki() -> Pki {
        let now = rcgen::date_time_ymd(2030, 6, 1).into();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.not_before = rcgen::date_time_ymd(2030, 1, 1);
        ca.not_after = rcgen::date_time_ymd(2031, 1, 1);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut lp = rcgen::CertificateParams::new(vec![
            "a.b.serviceaccount.identity.linkerd.cluster.local".into(),
        ])
        .unwrap();
        lp.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        lp.not_before = rcgen::date_time_ymd(2030, 5, 31);
        lp.not_after = rcgen::date_time_ymd(2030, 6, 2);
        let leaf = lp.signed_by(&leaf_key, &issuer).unwrap();
        Pki {
            ca_der: ca_cert.der().clone(),
            leaf_der: leaf.der().clone(),
            leaf_key: PrivateKey::from_pkcs8_der(leaf_key.serialize_der()),
            now,
        }
    }

    #[test]
    fn check_accepts_a_good_set_and_refuses_bad_ones() {
        crate::install_crypto_provider();
        let p = pki();
        let anchors = TrustAnchors::from_certs(vec![p.ca_der.clone()]).unwrap();
        let b = CertBundle::from_parts(
            vec![p.leaf_der.clone()],
            p.leaf_key.clone(),
            anchors.clone(),
        )
        .unwrap();
        b.check(p.now).unwrap();
        b.certified_key().unwrap();

        let late = p.now + Duration::from_secs(86_400 * 3);
        assert!(matches!(
            b.check(late),
            Err(BundleError::NotValidNow { .. })
        ));

        let other = PrivateKey::from_pkcs8_der(rcgen::KeyPair::generate().unwrap().serialize_der());
        let wrong_key = CertBundle::from_parts(vec![p.leaf_der.clone()], other, anchors).unwrap();
        assert!(matches!(
            wrong_key.check(p.now),
            Err(BundleError::KeyMismatch { .. })
        ));

        let foreign = TrustAnchors::from_certs(vec![pki().ca_der]).unwrap();
        let untrusted = CertBundle::from_parts(vec![p.leaf_der], p.leaf_key, foreign).unwrap();
        assert!(matches!(
            untrusted.check(p.now),
            Err(BundleError::Untrusted { .. })
        ));
    }

    #[test]
    fn load_dir_reads_through_data_link() {
        let p = pki();
        let d = tempfile::tempdir().unwrap();
        let v = d.path().join("..v1");
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join(CERT_FILE), pem::certs_to_pem([&p.leaf_der])).unwrap();
        std::fs::write(v.join(KEY_FILE), p.leaf_key.to_pem().as_bytes()).unwrap();
        std::fs::write(v.join(CA_FILE), pem::certs_to_pem([&p.ca_der])).unwrap();
        std::os::unix::fs::symlink("..v1", d.path().join(DATA_LINK)).unwrap();
        let (b, from) = CertBundle::load_dir(d.path()).unwrap();
        assert_eq!(from, v);
        assert_eq!(b.chain, vec![p.leaf_der.clone()]);
        assert!(CertBundle::load_dir(&d.path().join("missing")).is_err());

        // With anchors from elsewhere the dir's ca.crt is not read.
        std::fs::remove_file(v.join(CA_FILE)).unwrap();
        assert!(CertBundle::load_dir(d.path()).is_err());
        let anchors = TrustAnchors::from_certs(vec![p.ca_der.clone()]).unwrap();
        let (b, from) = CertBundle::load_dir_with_anchors(d.path(), anchors).unwrap();
        assert_eq!((b.chain, from), (vec![p.leaf_der], v));
        assert_eq!(b.anchors.certs(), &[p.ca_der]);
    }
}
