//! Private keys: the one loader for every key file in the workspace.
//!
//! A key file may be PEM or a single DER object, in any of the three encodings openssl
//! writes:
//! - PKCS#8 `PRIVATE KEY` (`openssl genpkey`, `openssl pkcs8 -topk8 -nocrypt`),
//! - SEC1 `EC PRIVATE KEY` (`openssl ecparam -genkey`; the curve must be named),
//! - PKCS#1 `RSA PRIVATE KEY` (`openssl genrsa -traditional`).
//!
//! Whatever the file held, a [`PrivateKey`] holds it as PKCS#8 DER: the form both rustls and
//! rcgen (which, built on ring, accepts PKCS#8 only) take. SEC1 and PKCS#1 keys are parsed and
//! re-wrapped in a PKCS#8 `PrivateKeyInfo` by the RustCrypto `sec1`, `pkcs1` and `pkcs8`
//! crates. Only algorithms the workspace can use are accepted (ECDSA P-256 and P-384, RSA,
//! Ed25519); an encrypted key is refused with a message saying so. Key bytes are zeroized when
//! dropped and never appear in `Debug` output or error messages.

use std::fmt;
use std::path::Path;

use pkcs8::der::asn1::ObjectIdentifier;
use pkcs8::der::{Decode, SecretDocument};
use pkcs8::{AlgorithmIdentifierRef, PrivateKeyInfo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use crate::pem::{self, PemError};

const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// The encoding a key file used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// PKCS#8 `PrivateKeyInfo` (`PRIVATE KEY`).
    Pkcs8,
    /// SEC1 `ECPrivateKey` (`EC PRIVATE KEY`).
    Sec1,
    /// PKCS#1 `RSAPrivateKey` (`RSA PRIVATE KEY`).
    Pkcs1,
}

impl fmt::Display for KeyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyFormat::Pkcs8 => "PKCS#8",
            KeyFormat::Sec1 => "SEC1 (EC PRIVATE KEY)",
            KeyFormat::Pkcs1 => "PKCS#1 (RSA PRIVATE KEY)",
        })
    }
}

/// The algorithm of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// RSA.
    Rsa,
    /// Ed25519.
    Ed25519,
}

impl KeyAlgorithm {
    /// Whether this is an ECDSA key.
    pub fn is_ecdsa(self) -> bool {
        matches!(self, KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384)
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::EcdsaP256 => "ECDSA P-256",
            KeyAlgorithm::EcdsaP384 => "ECDSA P-384",
            KeyAlgorithm::Rsa => "RSA",
            KeyAlgorithm::Ed25519 => "Ed25519",
        })
    }
}

/// A private key held in memory as PKCS#8 DER: zeroized when dropped, redacted in `Debug`.
#[derive(Clone)]
pub struct PrivateKey {
    pkcs8: Zeroizing<Vec<u8>>,
    format: KeyFormat,
}

impl PrivateKey {
    /// Wraps PKCS#8 DER bytes made in-process (e.g. by rcgen); no parsing is done.
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        Self {
            pkcs8: Zeroizing::new(der),
            format: KeyFormat::Pkcs8,
        }
    }

    /// Parses a private key: PEM (`PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY`; other
    /// blocks such as `EC PARAMETERS` are skipped) or one DER object in any of the three
    /// encodings. `what` names the source (usually the path) in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self, PemError> {
        let bad = |reason: String| PemError::Malformed {
            what: what.to_string(),
            reason,
        };
        if pem::is_pem(bytes) {
            if is_encrypted(bytes) {
                return Err(bad("the private key is encrypted; store it unencrypted \
                     (e.g. openssl pkcs8 -topk8 -nocrypt)"
                    .into()));
            }
            let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
                rustls_pki_types::pem::Error::NoItemsFound => bad("no private key found".into()),
                e => PemError::parse(what, e),
            })?;
            let key = Zeroizing::new(key);
            let (format, der) = match &*key {
                PrivateKeyDer::Pkcs8(k) => (KeyFormat::Pkcs8, k.secret_pkcs8_der()),
                PrivateKeyDer::Sec1(k) => (KeyFormat::Sec1, k.secret_sec1_der()),
                PrivateKeyDer::Pkcs1(k) => (KeyFormat::Pkcs1, k.secret_pkcs1_der()),
                _ => return Err(bad("unsupported private key encoding".into())),
            };
            return Self::from_der_as(der, format)
                .map_err(|reason| bad(format!("{format} key: {reason}")));
        }
        if bytes.first() != Some(&0x30) {
            return Err(bad("not PEM and not a DER private key".into()));
        }
        let format = if PrivateKeyInfo::from_der(bytes).is_ok() {
            KeyFormat::Pkcs8
        } else if sec1::EcPrivateKey::from_der(bytes).is_ok() {
            KeyFormat::Sec1
        } else if pkcs1::RsaPrivateKey::from_der(bytes).is_ok() {
            KeyFormat::Pkcs1
        } else {
            return Err(bad("DER is not a PKCS#8, SEC1 or PKCS#1 private key".into()));
        };
        Self::from_der_as(bytes, format).map_err(|reason| bad(format!("{format} key: {reason}")))
    }

    /// Reads a private key file (see [`PrivateKey::from_bytes`]). Blocks.
    pub fn read(path: &Path) -> Result<Self, PemError> {
        let bytes = Zeroizing::new(pem::read(path)?);
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    fn from_der_as(der: &[u8], format: KeyFormat) -> Result<Self, String> {
        let pkcs8 = match format {
            KeyFormat::Pkcs8 => {
                algorithm_of(&PrivateKeyInfo::from_der(der).map_err(|e| e.to_string())?)?;
                Zeroizing::new(der.to_vec())
            }
            KeyFormat::Sec1 => {
                let ec = sec1::EcPrivateKey::from_der(der).map_err(|e| e.to_string())?;
                let curve = ec
                    .parameters
                    .and_then(|p| p.named_curve())
                    .ok_or("the key does not name its curve (use -param_enc named_curve)")?;
                wrap(
                    AlgorithmIdentifierRef {
                        oid: sec1::ALGORITHM_OID,
                        parameters: Some((&curve).into()),
                    },
                    der,
                )?
            }
            KeyFormat::Pkcs1 => {
                pkcs1::RsaPrivateKey::from_der(der).map_err(|e| e.to_string())?;
                wrap(pkcs1::ALGORITHM_ID, der)?
            }
        };
        Ok(Self { pkcs8, format })
    }

    /// The encoding the key was loaded from.
    pub fn format(&self) -> KeyFormat {
        self.format
    }

    /// The key's algorithm, or why it is not one the workspace can use.
    pub fn algorithm(&self) -> Result<KeyAlgorithm, String> {
        algorithm_of(&PrivateKeyInfo::from_der(&self.pkcs8).map_err(|e| e.to_string())?)
    }

    /// The PKCS#8 DER bytes.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key as PKCS#8 PEM text (zeroized when dropped).
    pub fn to_pem(&self) -> Zeroizing<String> {
        let block = ::pem::Pem::new("PRIVATE KEY", self.pkcs8.to_vec());
        let text = Zeroizing::new(::pem::encode_config(&block, pem::pem_config()));
        let mut contents = block.into_contents();
        zeroize::Zeroize::zeroize(&mut contents);
        text
    }

    /// A rustls key: an owned PKCS#8 copy. rustls needs it by value; rustls-pki-types can
    /// zeroize it but does not on drop, so keep such copies short-lived (build the config and
    /// drop them).
    pub fn to_rustls(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.to_vec()))
    }

    /// An rcgen key pair, for signing with this key.
    pub fn to_rcgen(&self) -> Result<rcgen::KeyPair, PemError> {
        rcgen::KeyPair::try_from(self.pkcs8.as_slice()).map_err(|e| PemError::Malformed {
            what: "private key".into(),
            reason: e.to_string(),
        })
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey([secret key elided])")
    }
}

/// Wraps a SEC1 or PKCS#1 key in a PKCS#8 `PrivateKeyInfo`.
fn wrap(algorithm: AlgorithmIdentifierRef<'_>, der: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    let info = PrivateKeyInfo::new(algorithm, der);
    algorithm_of(&info)?;
    let doc = SecretDocument::try_from(info).map_err(|e| e.to_string())?;
    Ok(Zeroizing::new(doc.as_bytes().to_vec()))
}

fn algorithm_of(info: &PrivateKeyInfo<'_>) -> Result<KeyAlgorithm, String> {
    let oid = info.algorithm.oid;
    if oid == sec1::ALGORITHM_OID {
        let curve = info
            .algorithm
            .parameters_oid()
            .map_err(|_| "the EC key does not name its curve".to_string())?;
        return if curve == OID_P256 {
            Ok(KeyAlgorithm::EcdsaP256)
        } else if curve == OID_P384 {
            Ok(KeyAlgorithm::EcdsaP384)
        } else {
            Err(format!(
                "EC key on curve {curve}, which is not supported (use P-256 or P-384)"
            ))
        };
    }
    if oid == pkcs1::ALGORITHM_OID {
        return Ok(KeyAlgorithm::Rsa);
    }
    if oid == OID_ED25519 {
        return Ok(KeyAlgorithm::Ed25519);
    }
    Err(format!(
        "key algorithm {oid} is not supported (use ECDSA P-256/P-384, RSA or Ed25519)"
    ))
}

fn is_encrypted(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;
    use sec1::der::Encode;

    /// Every encoding openssl writes loads, reports its format and algorithm, and yields the
    /// same public key openssl prints, through both rcgen and rustls.
    #[test]
    fn openssl_keys_in_every_encoding_load_for_rustls_and_rcgen() {
        let dir = tempfile::tempdir().unwrap();
        let Some(keys) = crate::test_keys::openssl_keys(dir.path()) else {
            return;
        };
        let provider = crate::crypto_provider();
        for k in keys {
            let key = PrivateKey::read(&k.path).unwrap_or_else(|e| panic!("{}: {e}", k.name));
            assert_eq!(key.format(), k.format, "{}", k.name);
            assert_eq!(key.algorithm(), Ok(k.algorithm), "{}", k.name);
            let pair = key.to_rcgen().unwrap_or_else(|e| panic!("{}: {e}", k.name));
            assert_eq!(pair.subject_public_key_info(), k.spki_der, "{}", k.name);
            let signer = provider
                .key_provider
                .load_private_key(key.to_rustls())
                .unwrap_or_else(|e| panic!("{}: rustls: {e}", k.name));
            assert_eq!(
                signer.public_key().map(|p| p.as_ref().to_vec()),
                Some(k.spki_der.clone()),
                "{}",
                k.name
            );
            // The PKCS#8 form round-trips through PEM unchanged.
            let again = PrivateKey::from_bytes(key.to_pem().as_bytes(), k.name).unwrap();
            assert_eq!(again.pkcs8_der(), key.pkcs8_der(), "{}", k.name);
        }
    }

    fn sec1_of(pair: &rcgen::KeyPair) -> Zeroizing<Vec<u8>> {
        let der = pair.serialize_der();
        let info = PrivateKeyInfo::from_der(&der).unwrap();
        Zeroizing::new(info.private_key.to_vec())
    }

    #[test]
    fn sec1_without_a_named_curve_and_unknown_der_are_refused_by_name() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let sec1 = sec1_of(&pair);
        let mut ec = sec1::EcPrivateKey::from_der(&sec1).unwrap();
        ec.parameters = None;
        let bare = Zeroizing::new(ec.to_der().unwrap());
        let e = PrivateKey::from_bytes(&bare, "/etc/k.der")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/k.der: SEC1 (EC PRIVATE KEY) key: the key does not name its curve"),
            "{e}"
        );
        ec.parameters = Some(sec1::EcParameters::NamedCurve(OID_P256));
        let named = Zeroizing::new(ec.to_der().unwrap());
        let key = PrivateKey::from_bytes(&named, "k").unwrap();
        assert_eq!(key.format(), KeyFormat::Sec1);
        let pem = ::pem::encode(&::pem::Pem::new("EC PRIVATE KEY", named.to_vec()));
        let from_pem = PrivateKey::from_bytes(pem.as_bytes(), "k").unwrap();
        assert_eq!(from_pem.pkcs8_der(), key.pkcs8_der());
        assert_eq!(
            key.to_rcgen().unwrap().subject_public_key_info(),
            pair.subject_public_key_info()
        );
        let e = PrivateKey::from_bytes(b"\x30\x03\x02\x01\x05", "k").unwrap_err();
        assert_eq!(
            e.to_string(),
            "k: DER is not a PKCS#8, SEC1 or PKCS#1 private key"
        );
        assert!(format!("{key:?}").contains("elided"));
    }

    #[test]
    fn an_unsupported_curve_and_an_encrypted_key_say_so() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let sec1 = sec1_of(&pair);
        let mut ec = sec1::EcPrivateKey::from_der(&sec1).unwrap();
        // secp256k1
        ec.parameters = Some(sec1::EcParameters::NamedCurve(
            ObjectIdentifier::new_unwrap("1.3.132.0.10"),
        ));
        let der = Zeroizing::new(ec.to_der().unwrap());
        let e = PrivateKey::from_bytes(&der, "k").unwrap_err().to_string();
        assert!(
            e.contains("curve 1.3.132.0.10, which is not supported"),
            "{e}"
        );
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = PrivateKey::from_bytes(encrypted.as_bytes(), "tls.key")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("tls.key: the private key is encrypted"),
            "{e}"
        );
    }
}
