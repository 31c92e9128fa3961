//! Checks an issuer's answer before anything touches disk: it must chain to the anchors,
//! carry exactly our DNS and SPIFFE names, hold our public key, and be valid now.

use std::time::{Duration, SystemTime};

use proxy_lib::cert::CertInfo;
use proxy_lib::clock::rfc3339;
use proxy_lib::identity::{Identity, matches_san};
use proxy_lib::pem;
use proxy_lib::verify::{TrustAnchors, Usage};
use rustls_pki_types::CertificateDer;

/// Why an answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidateError {
    /// The answer held no leaf certificate.
    #[error("the issuer returned no certificate")]
    Empty,
    /// The leaf or an intermediate is not a certificate.
    #[error("the issuer returned a malformed certificate: {0}")]
    Malformed(String),
    /// The names are not exactly ours.
    #[error(
        "the certificate names {dns:?} / {uris:?} (plus {other} other SANs), expected exactly DNS {expected_dns:?} and URI {expected_uri:?}"
    )]
    Names {
        /// DNS SANs found.
        dns: Vec<String>,
        /// URI SANs found.
        uris: Vec<String>,
        /// Other SANs found.
        other: usize,
        /// The identity.
        expected_dns: String,
        /// Its SPIFFE ID.
        expected_uri: String,
    },
    /// The leaf is a CA.
    #[error("the certificate is a CA certificate")]
    IsCa,
    /// The public key is not the one we generated.
    #[error("the certificate is for another public key (serial {serial})")]
    WrongKey {
        /// Serial.
        serial: String,
    },
    /// The validity window is not sane at `now`.
    #[error("the certificate (serial {serial}) is not usable now: {reason}")]
    Validity {
        /// Serial.
        serial: String,
        /// What was wrong.
        reason: String,
    },
    /// The chain does not validate against the anchors.
    #[error("the certificate (serial {serial}) does not chain to the trust anchors: {reason}")]
    Untrusted {
        /// Serial.
        serial: String,
        /// What path validation said.
        reason: String,
    },
}

/// A validated answer: the chain to write (leaf first) and facts about the leaf.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Leaf followed by intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf.
    pub leaf: CertInfo,
}

/// Validates a leaf (DER, or PEM) and intermediates against `identity`, our public key
/// `spki_der`, `anchors` and `now` (allowing `skew` of notBefore in the future). Pure.
pub fn validate(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    identity: &Identity,
    spki_der: &[u8],
    anchors: &TrustAnchors,
    now: SystemTime,
    skew: Duration,
) -> Result<Validated, ValidateError> {
    if leaf.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ValidateError::Empty);
    }
    let leaf_der = one_cert(leaf, "leaf")?;
    let info =
        CertInfo::from_der(&leaf_der).map_err(|e| ValidateError::Malformed(e.to_string()))?;
    let mut chain = vec![leaf_der];
    for (i, der) in intermediates.iter().enumerate() {
        chain.extend(
            pem::certs_from_bytes(der, &format!("intermediate #{i}"))
                .map_err(|e| ValidateError::Malformed(e.to_string()))?,
        );
    }
    for c in &chain[1..] {
        CertInfo::from_der(c).map_err(|e| ValidateError::Malformed(e.to_string()))?;
    }
    let serial = info.serial.clone();

    let spiffe = identity.spiffe_id();
    let dns_ok = info.dns_sans.len() == 1 && matches_san(&info.dns_sans[0], identity.as_str());
    let uri_ok = info.uri_sans.len() == 1 && info.uri_sans[0] == spiffe;
    if !dns_ok || !uri_ok || info.other_sans != 0 {
        return Err(ValidateError::Names {
            dns: info.dns_sans.clone(),
            uris: info.uri_sans.clone(),
            other: info.other_sans,
            expected_dns: identity.to_string(),
            expected_uri: spiffe,
        });
    }
    if info.is_ca {
        return Err(ValidateError::IsCa);
    }
    if info.spki_der != spki_der {
        return Err(ValidateError::WrongKey { serial });
    }
    let validity = |reason: String| ValidateError::Validity {
        serial: serial.clone(),
        reason,
    };
    if info.not_after <= info.not_before {
        return Err(validity(format!(
            "notAfter {} is not after notBefore {}",
            rfc3339(info.not_after),
            rfc3339(info.not_before)
        )));
    }
    if info.not_after <= now {
        return Err(validity(format!("expired at {}", rfc3339(info.not_after))));
    }
    if info.not_before > now + skew {
        return Err(validity(format!(
            "valid only from {}, more than {} in the future",
            rfc3339(info.not_before),
            proxy_lib::human::duration(skew)
        )));
    }
    // Path validation at a time inside the window (notBefore may be up to `skew` ahead).
    let at = now.max(info.not_before);
    for usage in [Usage::Server, Usage::Client] {
        anchors
            .verify_leaf(&chain[0], &chain[1..], at, usage)
            .map_err(|e| ValidateError::Untrusted {
                serial: serial.clone(),
                reason: e.to_string(),
            })?;
    }
    Ok(Validated { chain, leaf: info })
}

fn one_cert(bytes: &[u8], what: &str) -> Result<CertificateDer<'static>, ValidateError> {
    let mut certs =
        pem::certs_from_bytes(bytes, what).map_err(|e| ValidateError::Malformed(e.to_string()))?;
    if certs.len() != 1 {
        return Err(ValidateError::Malformed(format!(
            "{what}: expected one certificate, got {}",
            certs.len()
        )));
    }
    Ok(certs.remove(0))
}

#[cfg(test)]
mod tests;
