//! Facts read from one X.509 certificate: names, validity, key, serial and fingerprint.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::validity::Window;

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate is not valid X.509 DER: {0}")]
pub struct CertParseError(pub String);

/// What the rest of the workspace needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex without separators.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256: String,
    /// Subject, as text.
    pub subject: String,
    /// Issuer, as text.
    pub issuer: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// DNS subject alternative names.
    pub dns_sans: Vec<String>,
    /// URI subject alternative names.
    pub uri_sans: Vec<String>,
    /// Count of SANs of any other kind (IP, email, ...).
    pub other_sans: usize,
    /// Basic constraints CA flag (false when absent).
    pub is_ca: bool,
    /// The DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// Subject key identifier, when present.
    pub ski: Option<Vec<u8>>,
    /// Authority key identifier (key id), when present.
    pub aki: Option<Vec<u8>>,
}

impl CertInfo {
    /// Parses DER. Pure.
    pub fn from_der(der: &[u8]) -> Result<Self, CertParseError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| CertParseError(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertParseError(
                "trailing bytes after the certificate".into(),
            ));
        }
        let mut info = CertInfo {
            serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
            sha256: sha256_hex(der),
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: asn1_time(cert.validity().not_before),
            not_after: asn1_time(cert.validity().not_after),
            dns_sans: Vec::new(),
            uri_sans: Vec::new(),
            other_sans: 0,
            is_ca: false,
            spki_der: cert.public_key().raw.to_vec(),
            ski: None,
            aki: None,
        };
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::DNSName(d) => info.dns_sans.push(d.to_string()),
                            GeneralName::URI(u) => info.uri_sans.push(u.to_string()),
                            _ => info.other_sans += 1,
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => info.is_ca = bc.ca,
                ParsedExtension::SubjectKeyIdentifier(k) => info.ski = Some(k.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    info.aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// The validity window `[not_before, not_after]`.
    pub fn window(&self) -> Window {
        Window::new(self.not_before, self.not_after)
    }

    /// Whether `now` lies inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.window().contains(now)
    }

    /// Whether `key` is this certificate's key pair: the SubjectPublicKeyInfo derived from the
    /// key is the one the certificate carries. The one key-matches-cert rule.
    pub fn is_certified_key(&self, key: &impl rcgen::PublicKeyData) -> bool {
        key.subject_public_key_info() == self.spki_der
    }

    /// The full lifetime, notAfter − notBefore.
    pub fn lifetime(&self) -> Duration {
        self.window().lifetime()
    }
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn asn1_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_validity_and_fingerprint() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://td/ns/n/sa/s".try_into().unwrap(),
        ));
        p.not_before = rcgen::date_time_ymd(2030, 1, 1);
        p.not_after = rcgen::date_time_ymd(2030, 1, 2);
        let cert = p.self_signed(&key).unwrap();
        let info = CertInfo::from_der(cert.der()).unwrap();
        assert_eq!(info.dns_sans, vec!["a.test"]);
        assert_eq!(info.uri_sans, vec!["spiffe://td/ns/n/sa/s"]);
        assert_eq!(info.lifetime(), Duration::from_secs(86_400));
        assert_eq!(info.sha256, sha256_hex(cert.der()));
        assert_eq!(
            info.spki_der,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
        assert!(info.is_certified_key(&key));
        assert!(!info.is_certified_key(&rcgen::KeyPair::generate().unwrap()));
        assert!(!info.is_ca);
        assert!(CertInfo::from_der(b"\x30\x03abc").is_err());
    }
}
