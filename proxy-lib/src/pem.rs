//! PEM/DER loading of certificates (private keys: [`crate::key`]).
//!
//! Files may hold PEM (any number of blocks) or a single DER object; parsing is done by
//! `rustls-pki-types`. Errors name the file and what was wrong, never the key bytes.

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Private keys are loaded by [`crate::key`]; the type lives on here under its old path.
pub use crate::key::PrivateKey;

/// Why certificates or a key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are neither PEM nor DER of the expected kind.
    #[error("{what}: {reason}")]
    Malformed {
        /// What was being parsed (usually a path).
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// A PEM block has no END line: the file was cut short (a partial copy, a full disk).
    #[error("truncated PEM in {what}: no \"{end_line}\" line")]
    Truncated {
        /// What was being parsed (usually a path).
        what: String,
        /// The END line that is missing.
        end_line: String,
    },
    /// No certificate was found.
    #[error("{0}: no certificate found")]
    NoCertificate(String),
}

impl PemError {
    /// Describes a PEM parse error from `rustls-pki-types` for `what` in words (its own
    /// `Display` prints the offending lines as byte arrays).
    pub fn parse(what: &str, error: rustls_pki_types::pem::Error) -> Self {
        use rustls_pki_types::pem::Error as E;
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        let reason = match error {
            // `end_marker` is the block's label (`CERTIFICATE`).
            E::MissingSectionEnd { end_marker } => {
                return PemError::Truncated {
                    what: what.to_string(),
                    end_line: format!("-----END {}-----", lossy(&end_marker)),
                };
            }
            E::IllegalSectionStart { line } => {
                format!("malformed PEM BEGIN line {:?}", lossy(&line))
            }
            E::Base64Decode(e) => format!("PEM body is not valid base64 ({e})"),
            other => other.to_string(),
        };
        PemError::Malformed {
            what: what.to_string(),
            reason,
        }
    }
}

/// Reads a file into memory. Blocks.
pub fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether `bytes` look like PEM text (after leading whitespace).
pub fn is_pem(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    bytes[start..].starts_with(b"-----BEGIN")
}

/// Parses every certificate in PEM text, or one DER certificate. `what` names the source in errors.
pub fn certs_from_bytes(
    bytes: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    if !is_pem(bytes) {
        if bytes.first() == Some(&0x30) {
            return Ok(vec![CertificateDer::from(bytes.to_vec())]);
        }
        return Err(PemError::Malformed {
            what: what.to_string(),
            reason: "not PEM and not a DER certificate".into(),
        });
    }
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::parse(what, e))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

/// Reads every certificate in a PEM (or DER) file. Blocks.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    certs_from_bytes(&read(path)?, &path.display().to_string())
}

/// PEM text for a list of DER certificates.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    let mut out = String::new();
    for c in certs {
        out.push_str(&der_to_pem("CERTIFICATE", c.as_ref()));
    }
    out
}

/// PEM text for one DER object with the given label.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    ::pem::encode_config(&::pem::Pem::new(label, der.to_vec()), pem_config())
}

pub(crate) fn pem_config() -> ::pem::EncodeConfig {
    ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_round_trip_through_pem_and_der() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        let pem = certs_to_pem([&der, &der]);
        assert_eq!(
            pem,
            format!("{}{}", cert.pem(), cert.pem()).replace("\r\n", "\n")
        );
        let back = certs_from_bytes(pem.as_bytes(), "t").unwrap();
        assert_eq!(back, vec![der.clone(), der.clone()]);
        assert_eq!(certs_from_bytes(der.as_ref(), "t").unwrap(), vec![der]);
        assert!(certs_from_bytes(b"garbage", "t").is_err());
        assert!(
            certs_from_bytes(
                b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn key_round_trips_and_debug_is_redacted() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let key = PrivateKey::from_bytes(pair.serialize_pem().as_bytes(), "k").unwrap();
        assert_eq!(key.pkcs8_der(), pair.serialize_der().as_slice());
        let again = PrivateKey::from_bytes(key.to_pem().as_bytes(), "k").unwrap();
        assert_eq!(again.pkcs8_der(), key.pkcs8_der());
        assert_eq!(*key.to_pem(), pair.serialize_pem().replace("\r\n", "\n"));
        assert!(!format!("{key:?}").contains(&format!("{:?}", &key.pkcs8_der()[..8])));
        assert!(PrivateKey::from_bytes(b"nope", "k").is_err());
    }

    #[test]
    fn a_truncated_pem_is_named_as_such_not_as_bytes() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = cert.pem();
        let cut = &pem.as_bytes()[..pem.len() / 2];
        let e = certs_from_bytes(cut, "/etc/mesh/tls.crt").unwrap_err();
        assert!(matches!(e, PemError::Truncated { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "truncated PEM in /etc/mesh/tls.crt: no \"-----END CERTIFICATE-----\" line"
        );
        let key_pem = key.serialize_pem();
        let e = PrivateKey::from_bytes(&key_pem.as_bytes()[..key_pem.len() - 30], "tls.key")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("truncated PEM in tls.key: no \"-----END"),
            "{e}"
        );
        // The key's bytes never show up in the message.
        assert!(!e.contains(&key_pem[40..60]), "{e}");
        let e = PrivateKey::from_bytes(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "k",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "k: no private key found");
    }
}
