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
    proxy_lib::fs::ensure_dir(dir, crate::store::DIR_MODE)?;
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

    // What linkerd2-proxy does with the files at start-up (identity-client `Documents::load`:
    // DIR/csr.der and DIR/key.p8 read raw, neither may be empty; the key loaded by ring's
    // PKCS#8 ECDSA P-256 loader and used with the ECDSA_NISTP256_SHA256 scheme only), and
    // what Linkerd's identity controller checks in the CSR (`checkCSR`: exactly one DNS name
    // equal to the identity, CN empty or the identity, no email/IP/URI names).
    #[test]
    fn the_files_are_what_linkerd2_proxy_and_linkerds_controller_accept() {
        let d = tempfile::tempdir().unwrap();
        // A long name, as real identities often are (over 64 characters).
        let id = Identity::parse(
            "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local",
        )
        .unwrap();
        assert!(id.as_str().len() > 64);
        write(d.path(), &id).unwrap();
        let key_p8 = std::fs::read(d.path().join("key.p8")).unwrap();
        let csr_der = std::fs::read(d.path().join("csr.der")).unwrap();
        assert!(!key_p8.is_empty() && !csr_der.is_empty());
        // DER, not PEM.
        assert_eq!(key_p8[0], 0x30);
        assert_eq!(csr_der[0], 0x30);
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(
                key_p8.clone().into(),
            ))
            .expect("key.p8 loads with ring's PKCS#8 loader");
        assert_eq!(signing.algorithm(), rustls::SignatureAlgorithm::ECDSA);
        assert!(
            signing
                .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
                .is_some(),
            "a P-256 key usable with the proxy's only signature scheme"
        );
        let (rest, req) = X509CertificationRequest::from_der(&csr_der).unwrap();
        assert!(rest.is_empty());
        req.verify_signature().unwrap();
        let cn: Vec<_> = req
            .certification_request_info
            .subject
            .iter_common_name()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        assert_eq!(cn, vec![id.to_string()]);
        let mut names = Vec::new();
        for ext in req.requested_extensions().into_iter().flatten() {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for n in &san.general_names {
                        names.push(match n {
                            GeneralName::DNSName(d) => d.to_string(),
                            other => panic!("a non-DNS name {other:?} would be refused"),
                        });
                    }
                }
                other => panic!("unexpected requested extension {other:?}"),
            }
        }
        assert_eq!(names, vec![id.to_string()]);
    }
}
