//! `linkerd-bootstrap`: the key and CSR a real linkerd2-proxy reads at start-up from its
//! `LINKERD2_PROXY_IDENTITY_DIR` (`key.p8`, PKCS#8 DER, 0600; `csr.der`, CN and one DNS SAN
//! = identity).

use std::path::{Path, PathBuf};

use proxy_lib::fs::{PUBLIC_MODE, SECRET_MODE};
use proxy_lib::identity::Identity;

/// The key file linkerd2-proxy reads.
pub const KEY_P8: &str = "key.p8";
/// The CSR file linkerd2-proxy reads.
pub const CSR_DER: &str = "csr.der";

/// Why bootstrap failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// A file is already there; an existing key is never replaced.
    #[error("{0} already exists; remove it first to make a new key")]
    Exists(PathBuf),
    /// Key generation failed.
    #[error(transparent)]
    Keygen(#[from] crate::keygen::KeygenError),
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] proxy_lib::fs::FsError),
}

/// Writes `DIR/key.p8` (0600, created with that mode) and `DIR/csr.der`. Refuses to
/// overwrite either. Blocks.
pub fn write(dir: &Path, identity: &Identity) -> Result<(PathBuf, PathBuf), BootstrapError> {
    let key_path = dir.join(KEY_P8);
    let csr_path = dir.join(CSR_DER);
    for p in [&key_path, &csr_path] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(BootstrapError::Exists(p.clone()));
        }
    }
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(|e| proxy_lib::fs::FsError::new("create", dir, e))?;
    }
    let k = crate::keygen::generate(identity, true)?;
    proxy_lib::fs::create_new(&key_path, k.key.pkcs8_der(), SECRET_MODE, None)?;
    proxy_lib::fs::create_new(&csr_path, &k.csr_der, PUBLIC_MODE, None)?;
    proxy_lib::fs::fsync_dir(dir)?;
    Ok((key_path, csr_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use x509_parser::prelude::*;

    #[test]
    fn writes_a_p256_pkcs8_key_0600_and_a_matching_csr_and_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("identity");
        let id = Identity::parse("db.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let (key, csr) = write(&dir, &id).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        let der = std::fs::read(&key).unwrap();
        let pair = rcgen::KeyPair::try_from(der.as_slice()).unwrap();
        assert!(pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256));
        let csr_der = std::fs::read(&csr).unwrap();
        let (_, req) = X509CertificationRequest::from_der(&csr_der).unwrap();
        req.verify_signature().unwrap();
        assert_eq!(
            req.certification_request_info.subject_pki.raw,
            rcgen::PublicKeyData::subject_public_key_info(&pair).as_slice()
        );
        let cn: Vec<_> = req
            .certification_request_info
            .subject
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, vec![id.as_str()]);
        assert!(matches!(write(&dir, &id), Err(BootstrapError::Exists(_))));
        assert_eq!(std::fs::read(&key).unwrap(), der);
    }
}
