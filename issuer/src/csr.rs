//! Validation of a PKCS#10 certificate signing request (DER, or PEM) against the identity it
//! is sent for. Pure: no IO and no clock. Only the public key leaves this module; everything
//! else the CSR asks for is checked and then ignored, because the leaf is built from policy.

use proxy_lib::identity::Identity;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::error::CsrError;

/// An uncompressed P-256 public key taken from a validated CSR.
#[derive(Clone, PartialEq, Eq)]
pub struct P256PublicKey {
    point: Vec<u8>,
}

impl P256PublicKey {
    /// The uncompressed SEC1 point (65 bytes).
    pub fn point(&self) -> &[u8] {
        &self.point
    }
}

impl std::fmt::Debug for P256PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("P256PublicKey")
    }
}

impl rcgen::PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A CSR that passed every check: what remains of it is its public key.
#[derive(Debug, Clone)]
pub struct ValidatedCsr {
    /// The requester's public key.
    pub public_key: P256PublicKey,
}

/// Validates `bytes` (DER, or PEM `CERTIFICATE REQUEST`) as a CSR for `identity`:
/// signature verified, ECDSA P-256 key, exactly one DNS SAN equal to the identity and no other
/// SAN, CN empty or equal to the identity (of any length), no CA request, no unknown extension.
pub fn validate(bytes: &[u8], identity: &Identity) -> Result<ValidatedCsr, CsrError> {
    let pem_der;
    let der: &[u8] = if proxy_lib::pem::is_pem(bytes) {
        pem_der = CertificateSigningRequestDer::from_pem_slice(bytes).map_err(|e| {
            CsrError::Malformed(proxy_lib::pem::PemError::parse("the request", e).to_string())
        })?;
        pem_der.as_ref()
    } else {
        bytes
    };
    if der.is_empty() {
        return Err(CsrError::Malformed("empty".into()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Malformed(format!("not a PKCS#10 request ({e})")))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(
            "trailing bytes after the request".into(),
        ));
    }
    let info = &csr.certification_request_info;
    let public_key = p256_key(&info.subject_pki)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    check_common_name(&csr, identity)?;
    check_extensions(&csr, identity)?;
    Ok(ValidatedCsr { public_key })
}

fn p256_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<P256PublicKey, CsrError> {
    let alg = &spki.algorithm;
    if alg.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        let name = x509_parser::oid_registry::OidRegistry::default()
            .with_crypto()
            .get(&alg.algorithm)
            .map(|e| e.sn().to_string())
            .unwrap_or_else(|| alg.algorithm.to_id_string());
        return Err(CsrError::KeyType(name));
    }
    let curve = alg
        .parameters
        .as_ref()
        .and_then(|p| x509_parser::der_parser::oid::Oid::try_from(p).ok());
    match curve {
        Some(c) if c == OID_EC_P256 => {}
        Some(c) => {
            let name = x509_parser::oid_registry::OidRegistry::default()
                .with_crypto()
                .get(&c)
                .map(|e| e.sn().to_string())
                .unwrap_or_else(|| c.to_id_string());
            return Err(CsrError::KeyType(format!("EC key on curve {name}")));
        }
        None => return Err(CsrError::KeyType("EC key without a named curve".into())),
    }
    let point = spki.subject_public_key.data.as_ref();
    if point.len() != 65 || point[0] != 0x04 {
        return Err(CsrError::KeyType(
            "P-256 key not in uncompressed form".into(),
        ));
    }
    Ok(P256PublicKey {
        point: point.to_vec(),
    })
}

fn check_common_name(
    csr: &X509CertificationRequest<'_>,
    identity: &Identity,
) -> Result<(), CsrError> {
    let subject = &csr.certification_request_info.subject;
    let cns: Vec<_> = subject.iter_common_name().collect();
    if cns.len() > 1 {
        return Err(CsrError::CommonName {
            cn: format!("{} common names", cns.len()),
        });
    }
    if let Some(cn) = cns.first() {
        let text = cn
            .as_str()
            .map_err(|_| CsrError::Malformed("common name is not a string".into()))?;
        if !text.is_empty() && !proxy_lib::identity::matches_san(text, identity.as_str()) {
            return Err(CsrError::CommonName {
                cn: text.to_string(),
            });
        }
    }
    Ok(())
}

fn check_extensions(
    csr: &X509CertificationRequest<'_>,
    identity: &Identity,
) -> Result<(), CsrError> {
    let mut dns: Vec<String> = Vec::new();
    let mut san_seen = false;
    for attr in csr.certification_request_info.iter_attributes() {
        let x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(req) =
            &attr.parsed_attribute()
        else {
            continue;
        };
        for ext in &req.extensions {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    if san_seen {
                        return Err(CsrError::Malformed(
                            "subjectAltName extension appears twice".into(),
                        ));
                    }
                    san_seen = true;
                    for name in &san.general_names {
                        match name {
                            GeneralName::DNSName(d) => dns.push(d.to_string()),
                            GeneralName::IPAddress(_) => return Err(CsrError::ForbiddenSan("IP")),
                            GeneralName::URI(_) => return Err(CsrError::ForbiddenSan("URI")),
                            GeneralName::RFC822Name(_) => {
                                return Err(CsrError::ForbiddenSan("email"));
                            }
                            _ => return Err(CsrError::ForbiddenSan("non-DNS")),
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => {
                    if bc.ca {
                        return Err(CsrError::CaRequested("basicConstraints CA:TRUE"));
                    }
                }
                ParsedExtension::KeyUsage(ku) => {
                    if ku.key_cert_sign() || ku.crl_sign() {
                        return Err(CsrError::CaRequested("keyCertSign or cRLSign key usage"));
                    }
                }
                // Harmless requests; the leaf's EKU and SKI come from policy anyway.
                ParsedExtension::ExtendedKeyUsage(_) | ParsedExtension::SubjectKeyIdentifier(_) => {
                }
                ParsedExtension::ParseError { .. } => {
                    return Err(CsrError::Malformed(format!(
                        "requested extension {} cannot be parsed",
                        ext.oid.to_id_string()
                    )));
                }
                _ => return Err(CsrError::UnknownExtension(ext.oid.to_id_string())),
            }
        }
    }
    if dns.len() != 1 || !proxy_lib::identity::matches_san(&dns[0], identity.as_str()) {
        return Err(CsrError::DnsNames {
            identity: identity.to_string(),
            found: dns,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SanType};

    const ID: &str =
        "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local";

    fn id() -> Identity {
        Identity::parse(ID).unwrap()
    }

    fn params(sans: &[&str], cn: Option<&str>) -> CertificateParams {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p
    }

    fn csr(p: &CertificateParams, key: &KeyPair) -> Vec<u8> {
        p.serialize_request(key).unwrap().der().to_vec()
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn accepts_linkerd_style_csr_der_and_pem_with_long_cn() {
        let key = p256();
        let p = params(&[ID], Some(ID));
        assert!(ID.len() > 64);
        let der = csr(&p, &key);
        let v = validate(&der, &id()).unwrap();
        assert_eq!(v.public_key.point(), key.public_key_raw());
        let pem = p.serialize_request(&key).unwrap().pem().unwrap();
        validate(pem.as_bytes(), &id()).unwrap();
        // empty CN (no CN at all) is fine too
        validate(&csr(&params(&[ID], None), &key), &id()).unwrap();
        validate(&csr(&params(&[ID], Some("")), &key), &id()).unwrap();
    }

    #[test]
    fn a_pem_request_cut_short_is_called_truncated() {
        let pem = params(&[ID], None)
            .serialize_request(&p256())
            .unwrap()
            .pem()
            .unwrap();
        let e = validate(&pem.as_bytes()[..pem.len() / 2], &id()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "certificate signing request is malformed: truncated PEM in the request: \
             no \"-----END CERTIFICATE REQUEST-----\" line"
        );
    }

    #[test]
    fn refuses_each_bad_request_with_a_naming_error() {
        let key = p256();
        let other = "other.ns.serviceaccount.identity.linkerd.cluster.local";
        let ca = {
            let mut p = params(&[ID], None);
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        };
        let unknown = {
            let mut p = params(&[ID], None);
            p.custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 2, 3, 4],
                    vec![5, 0],
                ));
            p
        };
        let with = |san: SanType| {
            let mut p = params(&[ID], None);
            p.subject_alt_names.push(san);
            p
        };
        type Case = (Vec<u8>, fn(&CsrError) -> bool);
        let cases: Vec<Case> = vec![
            (b"garbage".to_vec(), |e| matches!(e, CsrError::Malformed(_))),
            (Vec::new(), |e| matches!(e, CsrError::Malformed(_))),
            (csr(&params(&[other], None), &key), |e| {
                matches!(e, CsrError::DnsNames { .. })
            }),
            (csr(&params(&[], None), &key), |e| {
                matches!(e, CsrError::DnsNames { .. })
            }),
            (csr(&params(&[ID, other], None), &key), |e| {
                matches!(e, CsrError::DnsNames { .. })
            }),
            (csr(&params(&[ID], Some(other)), &key), |e| {
                matches!(e, CsrError::CommonName { .. })
            }),
            (
                csr(
                    &with(SanType::IpAddress("127.0.0.1".parse().unwrap())),
                    &key,
                ),
                |e| matches!(e, CsrError::ForbiddenSan("IP")),
            ),
            (
                csr(
                    &with(SanType::URI(
                        "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
                    )),
                    &key,
                ),
                |e| matches!(e, CsrError::ForbiddenSan("URI")),
            ),
            (
                csr(
                    &with(SanType::Rfc822Name("a@b.c".try_into().unwrap())),
                    &key,
                ),
                |e| matches!(e, CsrError::ForbiddenSan("email")),
            ),
            (csr(&ca, &key), |e| matches!(e, CsrError::CaRequested(_))),
            (
                csr(&unknown, &key),
                |e| matches!(e, CsrError::UnknownExtension(oid) if oid == "1.2.3.4"),
            ),
            (
                csr(
                    &params(&[ID], None),
                    &KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
                ),
                |e| matches!(e, CsrError::KeyType(k) if k.contains("secp384r1")),
            ),
            (
                csr(
                    &params(&[ID], None),
                    &KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
                ),
                |e| matches!(e, CsrError::KeyType(_)),
            ),
        ];
        for (i, (bytes, ok)) in cases.into_iter().enumerate() {
            let err = validate(&bytes, &id()).expect_err(&format!("case {i} accepted"));
            assert!(ok(&err), "case {i}: unexpected error {err}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn refuses_a_signature_made_by_another_key() {
        let der = tampered_csr(ID);
        assert_eq!(validate(&der, &id()).unwrap_err(), CsrError::BadSignature);
    }

    /// A P-256 CSR for `identity` whose SPKI was swapped for another key's after signing.
    pub(crate) fn tampered_csr(identity: &str) -> Vec<u8> {
        let p = params(&[identity], None);
        let a = p256();
        let b = p256();
        let mut der = csr(&p, &a);
        let pos = der
            .windows(65)
            .position(|w| w == a.public_key_raw())
            .unwrap();
        der[pos..pos + 65].copy_from_slice(b.public_key_raw());
        der
    }

    #[test]
    fn refuses_trailing_bytes() {
        let mut der = csr(&params(&[ID], None), &p256());
        der.push(0);
        assert!(matches!(validate(&der, &id()), Err(CsrError::Malformed(_))));
    }
}
