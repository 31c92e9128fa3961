//! What a host trusts, and whether it takes the bundle the issuer offers.
//!
//! `trust_anchors` is bootstrap trust only. Once the rotator has installed a *signed* trust
//! bundle (`ca.crt` with `ca.crt.sig` beside it, in the same version dir of the cert dir,
//! written in the same atomic swap as a cert and key), it trusts that bundle: for the issuer's
//! TLS, for validating new leaves, and as the set a next bundle must be signed by. Until then
//! it trusts `trust_anchors`, re-read on every use, and writes them as `ca.crt` as before.
//!
//! The issuer's bundle (`meshcerts.trust.v1.TrustBundle/Get`) is fetched with every renewal
//! and polled between renewals. A change is taken only as
//! [`proxy_lib::trust_bundle::evaluate`] allows (signed by the key of a trusted anchor, a
//! sequence above the installed one, CA certificates only), and only when the new set
//! validates the chain of the leaf installed with it. A refused change keeps the old set; the
//! reason goes to the state file (`status` turns WARNING) and to
//! `rotator_trust_bundle_refusals_total`.

use std::path::Path;

use proxy_lib::bundle::BundleError;
use proxy_lib::pem::PemError;
use proxy_lib::trust_bundle::{self, Signature, Trusted, Verdict};
use proxy_lib::verify::{TrustAnchors, Usage};
use rustls_pki_types::CertificateDer;

use crate::config::AnchorSource;

/// The anchors a host trusts now.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The anchors.
    pub anchors: TrustAnchors,
    /// The signature of the installed bundle; `None` on bootstrap anchors.
    pub signature: Option<Signature>,
}

impl Trust {
    /// The signature's text, to be written again with the next swap (`None` on bootstrap).
    pub fn signature_text(&self) -> Option<String> {
        self.signature.as_ref().map(Signature::to_text)
    }

    /// The anchors' fingerprint (hex SHA-256 over their DER).
    pub fn fingerprint(&self) -> String {
        trust_bundle::fingerprint(self.anchors.certs())
    }

    /// The installed sequence (`None` on bootstrap anchors).
    pub fn sequence(&self) -> Option<u64> {
        self.signature.as_ref().map(|s| s.sequence)
    }
}

/// The signed bundle in the current version of `dir`, if there is one. Blocks.
pub fn installed(dir: &Path) -> Result<Option<Trust>, String> {
    let read = |version: &Path| -> Result<Option<Trust>, BundleError> {
        let sig = match std::fs::read(version.join(trust_bundle::SIG_FILE)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PemError::Io {
                    path: version.join(trust_bundle::SIG_FILE),
                    source,
                }
                .into());
            }
        };
        let anchors = TrustAnchors::read(&version.join(trust_bundle::BUNDLE_FILE))?;
        let signature = Signature::parse(&sig).map_err(|e| BundleError::Untrusted {
            serial: String::new(),
            reason: format!("{}: {e}", trust_bundle::SIG_FILE),
        })?;
        Ok(Some(Trust {
            anchors,
            signature: Some(signature),
        }))
    };
    if !dir.join(proxy_lib::certdir::DATA_LINK).exists() {
        return Ok(None);
    }
    proxy_lib::certdir::read_snapshot(dir, read)
        .map(|(t, _)| t)
        .map_err(|e| format!("the installed trust bundle: {e}"))
}

/// What the host trusts now: the signed bundle installed in `dir`, else `bootstrap`. Blocks.
pub fn current(dir: &Path, bootstrap: &AnchorSource) -> Result<Trust, String> {
    if let Some(t) = installed(dir)? {
        return Ok(t);
    }
    let anchors = bootstrap
        .load()
        .map_err(|e| format!("trust_anchors: {e}"))?;
    Ok(Trust {
        anchors,
        signature: None,
    })
}

/// A bundle the issuer offered.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The anchors, DER.
    pub certs: Vec<CertificateDer<'static>>,
    /// Its signature, if any.
    pub signature: Option<Signature>,
}

impl Offer {
    /// Reads the service's answer.
    pub fn from_api(b: proxy_lib::trust_bundle::api::Bundle) -> Result<Self, String> {
        let signature = if b.signature.trim().is_empty() {
            None
        } else {
            Some(Signature::parse(b.signature.as_bytes()).map_err(|e| e.to_string())?)
        };
        Ok(Self {
            certs: b.anchors.into_iter().map(CertificateDer::from).collect(),
            signature,
        })
    }
}

/// Decides on `offer` for a host that trusts `trust` and installs the chain `chain` (leaf
/// first) with it: `Ok(None)` keeps the trusted set, `Ok(Some(new))` installs `new`, an error
/// says why a change was refused. `at` is a time inside the leaf's validity. Pure.
pub fn decide(
    trust: &Trust,
    offer: &Offer,
    chain: &[CertificateDer<'static>],
    at: std::time::SystemTime,
) -> Result<Option<Trust>, String> {
    let trusted = Trusted {
        certs: trust.anchors.certs(),
        sequence: trust.sequence(),
    };
    match trust_bundle::evaluate(&trusted, &offer.certs, offer.signature.as_ref()) {
        Ok(Verdict::Same) => Ok(None),
        Ok(Verdict::Accept) => {
            let anchors =
                TrustAnchors::from_certs(offer.certs.clone()).map_err(|e| e.to_string())?;
            if let Some((leaf, rest)) = chain.split_first() {
                for usage in [Usage::Server, Usage::Client] {
                    anchors.verify_leaf(leaf, rest, at, usage).map_err(|e| {
                        format!("the new bundle does not validate the installed certificate: {e}")
                    })?;
                }
            }
            Ok(Some(Trust {
                anchors,
                signature: offer.signature.clone(),
            }))
        }
        Err(e) => Err(e.to_string()),
    }
}
