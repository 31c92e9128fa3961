//! Signed trust-anchor bundles: the format, signing (offline, with an anchor's key) and the
//! rule by which a host accepts a new bundle.
//!
//! A bundle is a list of trust-anchor certificates (PEM on disk, `ca.crt`). Its detached
//! signature (`ca.crt.sig`, a few lines of text) is
//!
//! ```text
//! mesh-trust-bundle-signature v1
//! sequence: 1764690000
//! key: <hex SHA-256 of the signer's SubjectPublicKeyInfo DER>
//! signature: <hex ECDSA P-256 / SHA-256 signature, ASN.1 DER>
//! ```
//!
//! The signature covers the bundle's certificates, not their PEM text (re-encoding a bundle
//! does not break it), together with the sequence: the signed message is
//! `b"mesh-trust-bundle v1\n"`, the sequence as 8 big-endian bytes, the number of
//! certificates as 4 big-endian bytes, then each certificate's DER preceded by its length as
//! 4 big-endian bytes.
//!
//! A host accepts a bundle *change* ([`evaluate`]) only when
//! - it is signed by the key of an anchor the host trusts now (its installed bundle, or its
//!   bootstrap anchors before the first signed one), so a stolen issuer key cannot plant a
//!   root of its own;
//! - its sequence is above the one of the bundle installed (an old signed bundle cannot be
//!   replayed to roll back);
//! - it holds only CA certificates, at least one.
//!
//! The caller also checks that the new set validates the chain of the leaf it installs with it.

use std::fmt;

#[cfg(feature = "trust-api")]
pub mod api;

use rcgen::PublicKeyData as _;
use ring::signature::{self, EcdsaKeyPair, UnparsedPublicKey};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::key::PrivateKey;

/// The anchors file of a cert dir (and of the issuer's CA dir).
pub const BUNDLE_FILE: &str = "ca.crt";
/// The detached signature beside it.
pub const SIG_FILE: &str = "ca.crt.sig";

const SIG_HEADER: &str = "mesh-trust-bundle-signature v1";
const MESSAGE_DOMAIN: &[u8] = b"mesh-trust-bundle v1\n";

/// Why a signature could not be made, read or checked, or a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustBundleError {
    /// The signature file is not in the format above.
    #[error("malformed bundle signature: {0}")]
    Malformed(String),
    /// The signing key is not an ECDSA P-256 key.
    #[error("the anchor key cannot sign bundles: {0}")]
    BadKey(String),
    /// A certificate of the bundle (or of the trusted set) cannot be read.
    #[error("bundle certificate #{index}: {reason}")]
    BadCert {
        /// Its position.
        index: usize,
        /// What was wrong.
        reason: String,
    },
    /// The bundle holds no certificate.
    #[error("the bundle holds no certificate")]
    Empty,
    /// A certificate of the bundle is not a CA certificate.
    #[error("bundle certificate #{index} ({subject}) is not a CA certificate")]
    NotCa {
        /// Its position.
        index: usize,
        /// Its subject.
        subject: String,
    },
    /// A changed bundle came without a signature.
    #[error("the bundle changed but carries no signature")]
    Unsigned,
    /// The signer's key is not the key of a trusted anchor.
    #[error("the bundle is signed by key {key}, which is not the key of a trusted anchor")]
    UnknownSigner {
        /// The signer's key id (short form).
        key: String,
    },
    /// The signature does not verify.
    #[error("the bundle signature does not verify with the key of anchor {anchor}")]
    BadSignature {
        /// The anchor's fingerprint (short form).
        anchor: String,
    },
    /// The sequence is not above the installed one.
    #[error("bundle sequence {offered} is not above the installed {installed} (a rollback)")]
    Rollback {
        /// The offered sequence.
        offered: u64,
        /// The installed sequence.
        installed: u64,
    },
}

/// A detached bundle signature.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    /// Higher than every earlier bundle's.
    pub sequence: u64,
    /// Hex SHA-256 of the signer's SubjectPublicKeyInfo DER.
    pub key_id: String,
    /// ECDSA P-256 / SHA-256, ASN.1 DER.
    pub signature: Vec<u8>,
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signature")
            .field("sequence", &self.sequence)
            .field("key_id", &short(&self.key_id))
            .finish()
    }
}

impl Signature {
    /// Parses the text form.
    pub fn parse(text: &[u8]) -> Result<Self, TrustBundleError> {
        let bad = |m: &str| TrustBundleError::Malformed(m.to_string());
        let text = std::str::from_utf8(text).map_err(|_| bad("not UTF-8 text"))?;
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(SIG_HEADER) {
            return Err(bad(&format!("the first line is not {SIG_HEADER:?}")));
        }
        let (mut sequence, mut key_id, mut sig) = (None, None, None);
        for line in lines {
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| bad(&format!("line {line:?} is not `key: value`")))?;
            let v = v.trim();
            match k.trim() {
                "sequence" => {
                    sequence = Some(
                        v.parse::<u64>()
                            .map_err(|e| bad(&format!("sequence: {e}")))?,
                    )
                }
                "key" => {
                    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(bad("key: not 64 hex digits"));
                    }
                    key_id = Some(v.to_ascii_lowercase());
                }
                "signature" => {
                    sig = Some(hex::decode(v).map_err(|e| bad(&format!("signature: {e}")))?)
                }
                other => return Err(bad(&format!("unknown field {other:?}"))),
            }
        }
        Ok(Self {
            sequence: sequence.ok_or_else(|| bad("no sequence"))?,
            key_id: key_id.ok_or_else(|| bad("no key"))?,
            signature: sig.ok_or_else(|| bad("no signature"))?,
        })
    }

    /// The text form (what `ca.crt.sig` holds).
    pub fn to_text(&self) -> String {
        format!(
            "{SIG_HEADER}\nsequence: {}\nkey: {}\nsignature: {}\n",
            self.sequence,
            self.key_id,
            hex::encode(&self.signature)
        )
    }
}

/// The message a signature covers (see the module doc).
pub fn signed_message(sequence: u64, certs: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut m = MESSAGE_DOMAIN.to_vec();
    m.extend_from_slice(&sequence.to_be_bytes());
    m.extend_from_slice(&(certs.len() as u32).to_be_bytes());
    for c in certs {
        m.extend_from_slice(&(c.len() as u32).to_be_bytes());
        m.extend_from_slice(c);
    }
    m
}

/// Signs `certs` at `sequence` with an anchor's ECDSA P-256 `key` (offline:
/// `issuer ca sign-bundle`). Checks the bundle first ([`check_certs`]).
pub fn sign(
    key: &PrivateKey,
    sequence: u64,
    certs: &[CertificateDer<'_>],
) -> Result<Signature, TrustBundleError> {
    check_certs(certs)?;
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key.pkcs8_der(),
        &rng,
    )
    .map_err(|e| TrustBundleError::BadKey(format!("not an ECDSA P-256 key ({e})")))?;
    let spki = key
        .to_rcgen()
        .map_err(|e| TrustBundleError::BadKey(e.to_string()))?
        .subject_public_key_info();
    let sig = pair
        .sign(&rng, &signed_message(sequence, certs))
        .map_err(|e| TrustBundleError::BadKey(format!("signing failed: {e}")))?;
    Ok(Signature {
        sequence,
        key_id: sha256_hex(&spki),
        signature: sig.as_ref().to_vec(),
    })
}

/// Checks that `certs` is a usable bundle: at least one certificate, each a CA certificate.
pub fn check_certs(certs: &[CertificateDer<'_>]) -> Result<(), TrustBundleError> {
    if certs.is_empty() {
        return Err(TrustBundleError::Empty);
    }
    for (index, c) in certs.iter().enumerate() {
        let (_, x) =
            x509_parser::parse_x509_certificate(c).map_err(|e| TrustBundleError::BadCert {
                index,
                reason: e.to_string(),
            })?;
        if !x.is_ca() {
            return Err(TrustBundleError::NotCa {
                index,
                subject: x.subject().to_string(),
            });
        }
    }
    Ok(())
}

/// Hex SHA-256 of a certificate's SubjectPublicKeyInfo DER (the `key` of a signature by it).
pub fn key_id(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    Ok(sha256_hex(x.public_key().raw))
}

/// Verifies `sig` over `certs` with the key of one of `trusted`. Returns the signing anchor.
pub fn verify<'a>(
    sig: &Signature,
    certs: &[CertificateDer<'_>],
    trusted: &'a [CertificateDer<'static>],
) -> Result<&'a CertificateDer<'static>, TrustBundleError> {
    for (index, anchor) in trusted.iter().enumerate() {
        let (_, x) =
            x509_parser::parse_x509_certificate(anchor).map_err(|e| TrustBundleError::BadCert {
                index,
                reason: format!("trusted anchor: {e}"),
            })?;
        if sha256_hex(x.public_key().raw) != sig.key_id {
            continue;
        }
        let point = &x.public_key().subject_public_key.data;
        let key = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, point.as_ref());
        return match key.verify(&signed_message(sig.sequence, certs), &sig.signature) {
            Ok(()) => Ok(anchor),
            Err(_) => Err(TrustBundleError::BadSignature {
                anchor: short(&crate::cert::sha256_hex(anchor)).to_string(),
            }),
        };
    }
    Err(TrustBundleError::UnknownSigner {
        key: short(&sig.key_id).to_string(),
    })
}

/// What a host trusts now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted<'a> {
    /// The anchors.
    pub certs: &'a [CertificateDer<'static>],
    /// The sequence of the signed bundle installed; `None` while on bootstrap anchors.
    pub sequence: Option<u64>,
}

/// What [`evaluate`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The offered bundle is the trusted set (or an unsigned copy of it): nothing to do.
    Same,
    /// A signed bundle to install (its certificates and signature).
    Accept,
}

/// Decides whether a host that trusts `trusted` takes the offered bundle `certs` with `sig`.
/// Pure. See the module doc for the rules.
pub fn evaluate(
    trusted: &Trusted<'_>,
    certs: &[CertificateDer<'_>],
    sig: Option<&Signature>,
) -> Result<Verdict, TrustBundleError> {
    let same = trusted.certs.len() == certs.len()
        && trusted
            .certs
            .iter()
            .zip(certs)
            .all(|(a, b)| a.as_ref() == b.as_ref());
    let Some(sig) = sig else {
        return if same {
            Ok(Verdict::Same)
        } else {
            Err(TrustBundleError::Unsigned)
        };
    };
    match trusted.sequence {
        Some(installed) if sig.sequence == installed && same => return Ok(Verdict::Same),
        Some(installed) if sig.sequence <= installed => {
            return Err(TrustBundleError::Rollback {
                offered: sig.sequence,
                installed,
            });
        }
        _ => {}
    }
    check_certs(certs)?;
    verify(sig, certs, trusted.certs)?;
    Ok(Verdict::Accept)
}

/// The fingerprint of a set of anchors: hex SHA-256 over each certificate's DER in order.
pub fn fingerprint(certs: &[CertificateDer<'_>]) -> String {
    let mut h = Sha256::new();
    for c in certs {
        h.update(c.as_ref());
    }
    hex::encode(h.finalize())
}

/// The short form of a hex fingerprint (its first 16 digits), for labels and messages.
pub fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestPki;
    use std::time::SystemTime;

    fn key_of(pki: &TestPki) -> PrivateKey {
        PrivateKey::from_pkcs8_der(pki.anchor_key.serialize_der())
    }

    #[test]
    fn a_signature_round_trips_and_verifies_with_the_anchor_key() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000);
        let (old, new) = (TestPki::new(now), TestPki::new(now));
        let both = vec![old.anchor.clone(), new.anchor.clone()];
        let sig = sign(&key_of(&old), 7, &both).unwrap();
        let text = sig.to_text();
        let back = Signature::parse(text.as_bytes()).unwrap();
        assert_eq!(back, sig);
        assert_eq!(back.key_id, key_id(&old.anchor).unwrap());
        let trusted = [old.anchor.clone()];
        assert_eq!(verify(&back, &both, &trusted).unwrap(), &old.anchor);

        // Accepted by a host on the old anchor, bootstrap or signed before.
        for sequence in [None, Some(6)] {
            let t = Trusted {
                certs: &trusted,
                sequence,
            };
            assert_eq!(evaluate(&t, &both, Some(&back)), Ok(Verdict::Accept));
        }
        // The set already installed: nothing to do, signed or not.
        let t = Trusted {
            certs: &both,
            sequence: Some(7),
        };
        assert_eq!(evaluate(&t, &both, Some(&back)), Ok(Verdict::Same));
        assert_eq!(evaluate(&t, &both, None), Ok(Verdict::Same));
    }

    #[test]
    fn tampered_foreign_unsigned_and_rolled_back_bundles_are_refused() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000);
        let (old, new, thief) = (TestPki::new(now), TestPki::new(now), TestPki::new(now));
        let trusted = [old.anchor.clone()];
        let t = Trusted {
            certs: &trusted,
            sequence: Some(5),
        };
        let both = vec![old.anchor.clone(), new.anchor.clone()];
        let sig = sign(&key_of(&old), 6, &both).unwrap();

        // Tampered: another set under the same signature, or another sequence.
        let planted = vec![old.anchor.clone(), thief.anchor.clone()];
        assert!(matches!(
            evaluate(&t, &planted, Some(&sig)),
            Err(TrustBundleError::BadSignature { .. })
        ));
        let mut bumped = sig.clone();
        bumped.sequence = 9;
        assert!(matches!(
            evaluate(&t, &both, Some(&bumped)),
            Err(TrustBundleError::BadSignature { .. })
        ));
        let mut flipped = sig.clone();
        let last = flipped.signature.len() - 1;
        flipped.signature[last] ^= 1;
        assert!(evaluate(&t, &both, Some(&flipped)).is_err());

        // Signed by a key the host does not trust (a stolen issuer's own root).
        let foreign = sign(&key_of(&thief), 6, &planted).unwrap();
        assert!(matches!(
            evaluate(&t, &planted, Some(&foreign)),
            Err(TrustBundleError::UnknownSigner { .. })
        ));
        // Unsigned change.
        assert_eq!(evaluate(&t, &both, None), Err(TrustBundleError::Unsigned));
        // Rollback: an older (or equal) sequence.
        let old_sig = sign(&key_of(&old), 5, &both).unwrap();
        assert_eq!(
            evaluate(&t, &both, Some(&old_sig)),
            Err(TrustBundleError::Rollback {
                offered: 5,
                installed: 5
            })
        );
        // Not a CA, or nothing at all.
        let leaf = old
            .leaf(
                &crate::identity::Identity::parse(
                    "a.b.serviceaccount.identity.linkerd.cluster.local",
                )
                .unwrap(),
                now,
                now + std::time::Duration::from_secs(60),
            )
            .chain[0]
            .clone();
        assert!(matches!(
            sign(&key_of(&old), 6, &[leaf]),
            Err(TrustBundleError::NotCa { index: 0, .. })
        ));
        assert_eq!(sign(&key_of(&old), 6, &[]), Err(TrustBundleError::Empty));
    }

    #[test]
    fn malformed_signature_files_name_what_is_wrong() {
        for (text, want) in [
            ("", "first line"),
            ("mesh-trust-bundle-signature v1\nsequence: x\n", "sequence"),
            (
                "mesh-trust-bundle-signature v1\nsequence: 1\nkey: abc\n",
                "key",
            ),
            (
                "mesh-trust-bundle-signature v1\nsequence: 1\nkey: {k}\n",
                "no signature",
            ),
            ("mesh-trust-bundle-signature v1\nwhat: 1\n", "unknown field"),
        ] {
            let text = text.replace("{k}", &"a".repeat(64));
            let e = Signature::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }
}
