//! Fresh P-256 keys and the DER certificate signing requests sent with them.

use proxy_lib::identity::Identity;
use proxy_lib::pem::PrivateKey;

/// Why a key or CSR could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate a key and CSR: {0}")]
pub struct KeygenError(String);

/// A new key and the CSR for it.
#[derive(Clone)]
pub struct KeyAndCsr {
    /// The private key (PKCS#8, zeroized on drop).
    pub key: PrivateKey,
    /// The CSR, DER.
    pub csr_der: Vec<u8>,
    /// The public key, DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key", &self.key)
            .field("csr_len", &self.csr_der.len())
            .finish()
    }
}

/// Generates a P-256 key in-process and a DER CSR with one DNS SAN = `identity`, and
/// CN = `identity` when `with_cn` (what a real linkerd2-proxy sends), otherwise an empty
/// subject.
pub fn generate(identity: &Identity, with_cn: bool) -> Result<KeyAndCsr, KeygenError> {
    let err = |e: rcgen::Error| KeygenError(e.to_string());
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params =
        rcgen::CertificateParams::new(vec![identity.as_str().to_string()]).map_err(err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    if with_cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, identity.as_str());
    }
    let csr = params.serialize_request(&pair).map_err(err)?;
    let spki_der = rcgen::PublicKeyData::subject_public_key_info(&pair);
    // serialize_der copies the secret; the copy is moved straight into a zeroizing holder,
    // and rcgen zeroizes the pair when it drops.
    let key = PrivateKey::from_pkcs8_der(pair.serialize_der());
    Ok(KeyAndCsr {
        key,
        csr_der: csr.der().to_vec(),
        spki_der,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn csr_carries_one_dns_san_and_verifies() {
        let id = Identity::parse("db.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
        for with_cn in [false, true] {
            let k = generate(&id, with_cn).unwrap();
            let (_, csr) = X509CertificationRequest::from_der(&k.csr_der).unwrap();
            csr.verify_signature().unwrap();
            assert_eq!(
                csr.certification_request_info.subject_pki.raw,
                &k.spki_der[..]
            );
            let cn: Vec<_> = csr
                .certification_request_info
                .subject
                .iter_common_name()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            assert_eq!(
                cn,
                if with_cn {
                    vec![id.to_string()]
                } else {
                    vec![]
                }
            );
            let mut sans = Vec::new();
            for ext in csr.requested_extensions().into_iter().flatten() {
                if let ParsedExtension::SubjectAlternativeName(s) = ext {
                    for n in &s.general_names {
                        sans.push(format!("{n:?}"));
                    }
                }
            }
            assert_eq!(sans, vec![format!("DNSName({:?})", id.as_str())]);
            // The key is a P-256 PKCS#8 key matching the CSR.
            let pair = k.key.to_rcgen().unwrap();
            assert!(pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256));
            assert!(!format!("{k:?}").contains("BEGIN"));
        }
    }
}
