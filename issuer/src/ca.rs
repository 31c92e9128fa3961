//! The issuer CA: anchors (`ca.crt`, one or more roots), issuer chain (`issuer.crt`: the issuer
//! certificate, then any intermediates up to the anchor) and key (`issuer.key`), loaded and
//! validated as one unit. Only a pair that matches and whose every link is a valid CA with
//! keyCertSign, a pathlen that allows what is below it, chaining to an anchor, is accepted.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proxy_lib::cert::CertInfo;
use proxy_lib::pem::{self, PrivateKey};
use proxy_lib::validity::Window;
use proxy_lib::verify::{TrustAnchors, Usage};
use rcgen::{Issuer, KeyPair, PublicKeyData, SigningKey};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroize;

use crate::error::{Error, Result};

pub mod chain;
pub mod ops;

pub use chain::{CaError, Link, LinkInfo, Part};

/// Anchor bundle file name.
pub const ANCHORS_FILE: &str = "ca.crt";
/// Issuer certificate file name.
pub const ISSUER_CERT_FILE: &str = "issuer.crt";
/// Issuer key file name.
pub const ISSUER_KEY_FILE: &str = "issuer.key";

/// A signing key (the issuer's, the anchor's at init, the serving certificate's): zeroized
/// on drop, redacted in `Debug`.
pub struct IssuerKey(KeyPair);

impl IssuerKey {
    /// Wraps a key pair.
    pub fn new(pair: KeyPair) -> Self {
        Self(pair)
    }

    /// A fresh ECDSA P-256 key.
    pub fn generate() -> std::result::Result<Self, rcgen::Error> {
        KeyPair::generate().map(Self)
    }

    /// The key as PKCS#8 DER (zeroized when dropped).
    pub fn pkcs8_der(&self) -> zeroize::Zeroizing<Vec<u8>> {
        zeroize::Zeroizing::new(self.0.serialize_der())
    }
}

impl Drop for IssuerKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuerKey([secret key elided])")
    }
}

impl PublicKeyData for IssuerKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        PublicKeyData::algorithm(&self.0)
    }
}

impl SigningKey for IssuerKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// Paths of the three CA files in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// `ca.crt`.
    pub anchors: PathBuf,
    /// `issuer.crt`.
    pub cert: PathBuf,
    /// `issuer.key`.
    pub key: PathBuf,
}

impl CaFiles {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            anchors: dir.join(ANCHORS_FILE),
            cert: dir.join(ISSUER_CERT_FILE),
            key: dir.join(ISSUER_KEY_FILE),
        }
    }

    /// The three paths.
    pub fn all(&self) -> [&Path; 3] {
        [&self.anchors, &self.cert, &self.key]
    }
}

/// A validated issuer CA, ready to sign.
pub struct Ca {
    anchors: TrustAnchors,
    path: chain::Path,
    info: CertInfo,
    issuer: Issuer<'static, IssuerKey>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("anchors", &self.anchors)
            .field("serial", &self.info.serial)
            .field("subject", &self.info.subject)
            .field("chain_len", &self.path.chain.len())
            .field("not_after", &proxy_lib::clock::rfc3339(self.info.not_after))
            .field("key", &"[secret key elided]")
            .finish()
    }
}

impl Ca {
    /// Reads and validates the CA files at `now`. Blocks. Errors name the file at fault.
    pub fn load(files: &CaFiles, now: SystemTime) -> Result<Self> {
        let anchors = read_material(&files.anchors)?;
        let cert = read_material(&files.cert)?;
        let key = zeroize::Zeroizing::new(read_material(&files.key)?);
        Self::from_pem(&anchors, &cert, &key, now, files)
    }

    /// THE validating constructor, used by file loads and reloads and by every other CA
    /// source: anchors (a PEM bundle, possibly several roots), the issuer chain (PEM: the
    /// issuer certificate first, then each intermediate up to, not including, the anchor; a
    /// trailing copy of the anchor is tolerated) and the issuer key (PEM or DER, PKCS#8 or
    /// SEC1), as bytes. `files` only names the sources in errors (for a source that is not
    /// files, paths such as `secret/linkerd/linkerd-identity-issuer/tls.crt` do).
    pub fn from_pem(
        anchors: &[u8],
        cert: &[u8],
        key: &[u8],
        now: SystemTime,
        files: &CaFiles,
    ) -> Result<Self> {
        let bad = |p: &Path, reason: String| Error::CaMaterial {
            path: p.to_path_buf(),
            reason,
        };
        let anchors = TrustAnchors::from_bytes(anchors, &files.anchors.display().to_string())
            .map_err(|e| bad(&files.anchors, e.to_string()))?;
        let certs = pem::certs_from_bytes(cert, &files.cert.display().to_string())
            .map_err(|e| bad(&files.cert, e.to_string()))?;
        let key =
            read_key(key, &files.key.display().to_string()).map_err(|e| bad(&files.key, e))?;
        Self::from_parts(anchors, certs, key, now).map_err(|source| Error::CaInvalid {
            path: match source.part() {
                Part::Anchors => files.anchors.clone(),
                Part::Chain => files.cert.clone(),
                Part::Key => files.key.clone(),
            },
            source: Box::new(source),
        })
    }

    /// Validates an issuer chain (issuer certificate first, then intermediates; trailing
    /// anchors are dropped) and the issuer key against `anchors` at `now`: every link is
    /// checked (see [`chain::check`]), the key must match the issuer certificate, and a
    /// throwaway leaf signed with the pair must path-validate for client and server use.
    pub fn from_parts(
        anchors: TrustAnchors,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKey,
        now: SystemTime,
    ) -> std::result::Result<Self, CaError> {
        let chain = chain::without_anchors(chain, anchors.certs());
        let path = chain::check(chain, anchors.certs(), now)?;
        let cert = &path.chain[0];
        let info = CertInfo::from_der(cert).map_err(|e| CaError::Malformed {
            index: 0,
            reason: e.to_string(),
        })?;
        let pair = key.to_rcgen().map_err(|e| CaError::Key(e.to_string()))?;
        if !info.is_certified_key(&pair) {
            return Err(CaError::KeyMismatch {
                serial: info.serial,
            });
        }
        let issuer = Issuer::from_ca_cert_der(cert, IssuerKey(pair))
            .map_err(|e| CaError::Unusable(e.to_string()))?;
        let ca = Self {
            anchors,
            path,
            info,
            issuer,
        };
        ca.self_test(now)?;
        Ok(ca)
    }

    /// Mints a throwaway leaf with this pair and path-validates it against the anchors: proves
    /// the key signs what the certificate claims, the names line up byte for byte, and the
    /// chain leads to an anchor.
    fn self_test(&self, now: SystemTime) -> std::result::Result<(), CaError> {
        let unusable = |e: &dyn std::fmt::Display| CaError::Unusable(e.to_string());
        let key = KeyPair::generate().map_err(|e| unusable(&e))?;
        let id = proxy_lib::identity::Identity::parse(
            "self-test.issuer.serviceaccount.identity.linkerd.invalid",
        )
        .map_err(|e| unusable(&e))?;
        let grant = proxy_lib::validity::Window::grant(
            now,
            Duration::from_secs(60),
            Duration::ZERO,
            self.window(),
        );
        let leaf =
            crate::signer::sign_leaf(self, &id, &key, &grant, crate::signer::LeafKind::Workload)
                .map_err(|e| unusable(&e))?;
        let (_, parsed) = X509Certificate::from_der(&leaf.der).map_err(|e| unusable(&e))?;
        let (_, issuer) = X509Certificate::from_der(self.cert()).map_err(|e| unusable(&e))?;
        if parsed.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(unusable(
                &"the issuer subject name cannot be reproduced byte for byte (unsupported DN \
                  encoding)",
            ));
        }
        self.anchors
            .verify_leaf(&leaf.der, self.chain(), now, Usage::Client)
            .map_err(|e| CaError::Untrusted(e.to_string()))?;
        // linkerd2-proxy verifies its new leaf as a server certificate before using it, and
        // peers verify it as a client certificate: an extendedKeyUsage on the issuer that
        // leaves out serverAuth (or clientAuth) makes every leaf it signs unusable.
        self.anchors
            .verify_leaf(&leaf.der, self.chain(), now, Usage::Server)
            .map_err(|e| CaError::NotForServers(e.to_string()))
    }

    /// The trust anchors.
    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }

    /// The issuer certificate (DER).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.path.chain[0]
    }

    /// The issuer certificate followed by the intermediates up to (not including) the
    /// anchor: what a leaf it signs is presented with.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.path.chain
    }

    /// Every link of the path, issuer first, ending with the anchor it chains to.
    pub fn links(&self) -> &[LinkInfo] {
        &self.path.links
    }

    /// Facts about the issuer certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Where every link of the path (anchor included) is valid: what a leaf may be granted,
    /// and the life the CA has left.
    pub fn window(&self) -> Window {
        self.path.window()
    }

    /// The rcgen issuer (DN, key id, key).
    pub(crate) fn issuer(&self) -> &Issuer<'static, IssuerKey> {
        &self.issuer
    }
}

/// Reads a CA file (PEM or DER bytes). Blocks. A missing or unreadable file is
/// [`Error::CaUnreadable`], anything else [`Error::CaMaterial`], both naming the file.
pub fn read_material(path: &Path) -> Result<Vec<u8>> {
    pem::read(path).map_err(|e| match e {
        pem::PemError::Io { source, .. } => Error::CaUnreadable {
            path: path.to_path_buf(),
            source,
        },
        other => Error::CaMaterial {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// The certificates in `bytes` read from `path` (PEM, or one DER certificate); an error
/// names the file.
pub fn certs_in(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    pem::certs_from_bytes(bytes, &path.display().to_string()).map_err(|e| Error::CaMaterial {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads an issuer key: PEM or DER, PKCS#8, SEC1 (`openssl ecparam -genkey`) or PKCS#1 (see
/// [`proxy_lib::key`]). The issuer signs with ECDSA only (P-256 or P-384, as Linkerd's issuer
/// must): an RSA or Ed25519 key is refused with a message saying so.
pub fn read_key(bytes: &[u8], what: &str) -> std::result::Result<PrivateKey, String> {
    let key = PrivateKey::from_bytes(bytes, what).map_err(|e| e.to_string())?;
    match key.algorithm() {
        Ok(a) if a.is_ecdsa() => Ok(key),
        Ok(a) => Err(format!(
            "{what}: the issuer key is {a} ({} encoding); the issuer signs with ECDSA only: \
             use a P-256 or P-384 key",
            key.format()
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_lib::test_util::TestPki;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};

    fn now() -> SystemTime {
        rcgen::date_time_ymd(2030, 6, 1).into()
    }

    fn ca_from(
        pki: &TestPki,
        cert: CertificateDer<'static>,
        key: &KeyPair,
        at: SystemTime,
    ) -> std::result::Result<Ca, String> {
        Ca::from_parts(
            pki.anchors(),
            vec![cert],
            PrivateKey::from_pkcs8_der(key.serialize_der()),
            at,
        )
        .map_err(|e| e.to_string())
    }

    fn issuer_variant(
        pki: &TestPki,
        f: impl FnOnce(&mut CertificateParams),
    ) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        (issuer_cert_for(pki, &key, f), key)
    }

    /// An issuer CA certificate for `key`, signed by the anchor, changed by `f`.
    fn issuer_cert_for(
        pki: &TestPki,
        key: &KeyPair,
        f: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(Vec::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "identity.linkerd.cluster.local");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.use_authority_key_identifier_extension = true;
        p.not_before = (now() - Duration::from_secs(3600)).into();
        p.not_after = (now() + Duration::from_secs(86_400)).into();
        f(&mut p);
        let anchor = Issuer::from_ca_cert_der(&pki.anchor, &pki.anchor_key).unwrap();
        p.signed_by(key, &anchor).unwrap().der().clone()
    }

    #[test]
    fn accepts_a_good_pair() {
        let pki = TestPki::new(now());
        let ca = ca_from(&pki, pki.issuer.clone(), &pki.issuer_key, now()).unwrap();
        assert_eq!(ca.cert(), &pki.issuer);
        assert!(!format!("{ca:?}").contains("BEGIN"));
    }

    #[test]
    fn refuses_bad_pairs_with_reasons() {
        let pki = TestPki::new(now());
        let other = TestPki::new(now());
        // key of another pair
        let e = ca_from(&pki, pki.issuer.clone(), &other.issuer_key, now()).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        // signed by another anchor
        let e = ca_from(&pki, other.issuer.clone(), &other.issuer_key, now()).unwrap_err();
        assert!(e.contains("does not chain"), "{e}");
        // expired (checked at a later time)
        let late = now() + Duration::from_secs(2 * 365 * 86_400);
        let e = ca_from(&pki, pki.issuer.clone(), &pki.issuer_key, late).unwrap_err();
        assert!(e.contains("not valid now"), "{e}");
        // not a CA
        let (c, k) = issuer_variant(&pki, |p| p.is_ca = IsCa::ExplicitNoCa);
        let e = ca_from(&pki, c, &k, now()).unwrap_err();
        assert!(e.contains("not a CA"), "{e}");
        // pathlen other than 0 (or none)
        let (c, k) = issuer_variant(&pki, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1))
        });
        let e = ca_from(&pki, c, &k, now()).unwrap_err();
        assert!(e.contains("pathlen 0 or none, has 1"), "{e}");
        // ... while no pathlen at all (cert-manager's issuer) is fine
        let (c, k) = issuer_variant(&pki, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
        });
        ca_from(&pki, c, &k, now()).unwrap();
        // no keyCertSign
        let (c, k) = issuer_variant(&pki, |p| {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature]
        });
        let e = ca_from(&pki, c, &k, now()).unwrap_err();
        assert!(e.contains("keyCertSign"), "{e}");
        // an EKU on the issuer without serverAuth: leaves would fail linkerd2-proxy's check
        let (c, k) = issuer_variant(&pki, |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
        });
        let e = ca_from(&pki, c, &k, now()).unwrap_err();
        assert!(e.contains("server use"), "{e}");
        // ... while one that lists both (cert-manager's usual issuer) is fine
        let (c, k) = issuer_variant(&pki, |p| {
            p.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ]
        });
        ca_from(&pki, c, &k, now()).unwrap();
        // a good variant passes, so the helper itself is sound
        let (c, k) = issuer_variant(&pki, |_| {});
        ca_from(&pki, c, &k, now()).unwrap();
    }

    /// openssl-made issuer keys: ECDSA in SEC1 and PKCS#8 (PEM or DER) load and sign; RSA,
    /// whether PKCS#1 or PKCS#8, is refused with a message naming the file and saying why.
    #[test]
    fn loads_an_openssl_made_issuer_key_in_every_encoding_and_refuses_rsa() {
        let d = tempfile::tempdir().unwrap();
        let Some(keys) = proxy_lib::test_keys::openssl_keys(d.path()) else {
            return;
        };
        let pki = TestPki::new(now());
        let dir = d.path().join("ca");
        std::fs::create_dir(&dir).unwrap();
        let files = CaFiles::in_dir(&dir);
        std::fs::write(&files.anchors, pem::certs_to_pem([&pki.anchor])).unwrap();
        let (mut loaded, mut refused) = (0, 0);
        for k in keys {
            let pair = PrivateKey::read(&k.path).unwrap().to_rcgen().unwrap();
            let cert = issuer_cert_for(&pki, &pair, |_| {});
            std::fs::write(&files.cert, pem::der_to_pem("CERTIFICATE", &cert)).unwrap();
            std::fs::copy(&k.path, &files.key).unwrap();
            let r = Ca::load(&files, now());
            if k.algorithm.is_ecdsa() {
                let ca = r.unwrap_or_else(|e| panic!("{}: {e}", k.name));
                assert_eq!(ca.cert(), &cert, "{}", k.name);
                loaded += 1;
            } else {
                let e = r.expect_err(k.name).to_string();
                assert!(e.contains(&files.key.display().to_string()), "{e}");
                assert!(
                    e.contains("the issuer key is RSA") && e.contains("ECDSA only"),
                    "{e}"
                );
                refused += 1;
            }
        }
        assert_eq!((loaded, refused), (6, 4));
    }

    #[test]
    fn load_names_the_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let files = CaFiles::in_dir(d.path());
        std::fs::write(&files.anchors, "x").unwrap();
        let e = Ca::load(&files, now()).unwrap_err().to_string();
        assert!(e.contains("issuer.crt"), "{e}");
    }
}
