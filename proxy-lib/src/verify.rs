//! Path validation of certificate chains against trust anchors (webpki, ring algorithms).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};

use crate::pem::{self, PemError};

/// Why a chain did not validate, or anchors could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The anchors file could not be read or parsed.
    #[error(transparent)]
    Load(#[from] PemError),
    /// An anchor certificate is not usable as a trust anchor.
    #[error("trust anchor #{index} is not a usable certificate: {reason}")]
    BadAnchor {
        /// Position in the bundle, from 0.
        index: usize,
        /// What webpki said.
        reason: String,
    },
    /// The bundle holds no anchors.
    #[error("the trust anchor bundle is empty")]
    NoAnchors,
    /// The leaf does not chain to any anchor (or is expired, not yet valid, wrong usage...).
    #[error("certificate does not validate against the trust anchors: {0}")]
    Untrusted(String),
}

/// What the leaf will be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server authentication (serverAuth EKU).
    Server,
    /// TLS client authentication (clientAuth EKU).
    Client,
}

/// A validated set of trust anchors (the contents of `ca.crt`).
#[derive(Clone)]
pub struct TrustAnchors {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustAnchors {
    /// Builds anchors from DER certificates.
    pub fn from_certs(certs: Vec<CertificateDer<'static>>) -> Result<Self, VerifyError> {
        if certs.is_empty() {
            return Err(VerifyError::NoAnchors);
        }
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(index, c)| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| VerifyError::BadAnchor {
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { certs, anchors })
    }

    /// Parses anchors from PEM text (or one DER certificate).
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self, VerifyError> {
        Self::from_certs(pem::certs_from_bytes(bytes, what)?)
    }

    /// Reads anchors from a PEM file. Blocks.
    pub fn read(path: &Path) -> Result<Self, VerifyError> {
        Self::from_certs(pem::read_certs(path)?)
    }

    /// The anchor certificates, as given.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The anchors as a rustls root store.
    pub fn root_store(&self) -> rustls::RootCertStore {
        rustls::RootCertStore {
            roots: self.anchors.clone(),
        }
    }

    /// Validates `leaf` (an end-entity cert) with `intermediates` against these anchors at
    /// `now`, for `usage`. Pure.
    pub fn verify_leaf(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
        usage: Usage,
    ) -> Result<(), VerifyError> {
        let ee = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| VerifyError::Untrusted(format!("leaf: {e:?}")))?;
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
        let usage = match usage {
            Usage::Server => webpki::KeyUsage::server_auth(),
            Usage::Client => webpki::KeyUsage::client_auth(),
        };
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &self.anchors,
            intermediates,
            time,
            usage,
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| VerifyError::Untrusted(format!("{e:?}")))
    }
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("count", &self.certs.len())
            .finish()
    }
}
