//! Test fixture: private keys made by the `openssl` CLI in every encoding [`crate::key`] reads,
//! and workload leaves for them.
//!
//! With `REQUIRE_INTEROP=1` (set by CI) a missing openssl fails the test; otherwise
//! [`openssl_keys`] returns `None` and the caller skips with a printed reason.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType};

use crate::bundle::CertBundle;
use crate::identity::Identity;
use crate::key::{KeyAlgorithm, KeyFormat, PrivateKey};
use crate::test_util::TestPki;

/// One openssl-made key file.
#[derive(Debug)]
pub struct OpensslKey {
    /// A short name for messages, e.g. `sec1.pem`.
    pub name: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The encoding openssl wrote.
    pub format: KeyFormat,
    /// The key's algorithm.
    pub algorithm: KeyAlgorithm,
    /// The public key as openssl prints it (`pkey -pubout`, SubjectPublicKeyInfo DER).
    pub spki_der: Vec<u8>,
}

/// Runs openssl in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether openssl can run here; panics instead of saying no when `REQUIRE_INTEROP=1`.
pub fn have_openssl() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("REQUIRE_INTEROP").is_ok_and(|v| v == "1") {
            panic!("openssl is not installed but REQUIRE_INTEROP=1: interop tests must run");
        }
        eprintln!("skipping: openssl is not installed (set REQUIRE_INTEROP=1 to make this fail)");
    }
    ok
}

/// Makes, in `dir`, a P-256 key in SEC1 (`ecparam -genkey`), an RSA-2048 key in PKCS#1
/// (`genrsa -traditional`), each of them again as PKCS#8 (`pkcs8 -topk8 -nocrypt`), and a
/// PKCS#8 key from `genpkey`; each as PEM and as DER. `None` when openssl is missing (see
/// [`have_openssl`]).
pub fn openssl_keys(dir: &Path) -> Option<Vec<OpensslKey>> {
    if !have_openssl() {
        return None;
    }
    for line in [
        "ecparam -name prime256v1 -genkey -noout -out sec1.pem",
        "ec -in sec1.pem -outform DER -out sec1.der",
        "genrsa -traditional -out pkcs1.pem 2048",
        "rsa -in pkcs1.pem -traditional -outform DER -out pkcs1.der",
        "pkcs8 -topk8 -nocrypt -in sec1.pem -out sec1-p8.pem",
        "pkcs8 -topk8 -nocrypt -in sec1.pem -outform DER -out sec1-p8.der",
        "pkcs8 -topk8 -nocrypt -in pkcs1.pem -out pkcs1-p8.pem",
        "pkcs8 -topk8 -nocrypt -in pkcs1.pem -outform DER -out pkcs1-p8.der",
        "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out genpkey.pem",
        "pkcs8 -topk8 -nocrypt -in genpkey.pem -outform DER -out genpkey.der",
    ] {
        openssl(dir, &line.split(' ').collect::<Vec<_>>());
    }
    let spki = |src: &str| {
        let out = format!("{src}.pub");
        openssl(
            dir,
            &[
                "pkey", "-in", src, "-pubout", "-outform", "DER", "-out", &out,
            ],
        );
        std::fs::read(dir.join(out)).expect("read public key")
    };
    let (ec, rsa, gen_ec) = (spki("sec1.pem"), spki("pkcs1.pem"), spki("genpkey.pem"));
    let table: [(&'static str, KeyFormat, KeyAlgorithm, &Vec<u8>); 10] = [
        ("sec1.pem", KeyFormat::Sec1, KeyAlgorithm::EcdsaP256, &ec),
        ("sec1.der", KeyFormat::Sec1, KeyAlgorithm::EcdsaP256, &ec),
        ("pkcs1.pem", KeyFormat::Pkcs1, KeyAlgorithm::Rsa, &rsa),
        ("pkcs1.der", KeyFormat::Pkcs1, KeyAlgorithm::Rsa, &rsa),
        (
            "sec1-p8.pem",
            KeyFormat::Pkcs8,
            KeyAlgorithm::EcdsaP256,
            &ec,
        ),
        (
            "sec1-p8.der",
            KeyFormat::Pkcs8,
            KeyAlgorithm::EcdsaP256,
            &ec,
        ),
        ("pkcs1-p8.pem", KeyFormat::Pkcs8, KeyAlgorithm::Rsa, &rsa),
        ("pkcs1-p8.der", KeyFormat::Pkcs8, KeyAlgorithm::Rsa, &rsa),
        (
            "genpkey.pem",
            KeyFormat::Pkcs8,
            KeyAlgorithm::EcdsaP256,
            &gen_ec,
        ),
        (
            "genpkey.der",
            KeyFormat::Pkcs8,
            KeyAlgorithm::EcdsaP256,
            &gen_ec,
        ),
    ];
    Some(
        table
            .into_iter()
            .map(|(name, format, algorithm, spki_der)| OpensslKey {
                name,
                path: dir.join(name),
                format,
                algorithm,
                spki_der: spki_der.clone(),
            })
            .collect(),
    )
}

impl TestPki {
    /// A workload leaf for `identity` whose key is `key` (any algorithm rcgen can sign a
    /// certificate for), chained through the issuer, valid `[not_before, not_after]`.
    pub fn leaf_for_key(
        &self,
        identity: &Identity,
        key: &PrivateKey,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertBundle {
        let pair = key.to_rcgen().expect("rcgen reads the key");
        let mut p = CertificateParams::new(vec![identity.to_string()]).expect("params");
        p.subject_alt_names.push(SanType::URI(
            identity.spiffe_id().try_into().expect("ia5 string"),
        ));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        let issuer = Issuer::from_ca_cert_der(&self.issuer, &self.issuer_key).expect("issuer");
        let cert = p.signed_by(&pair, &issuer).expect("sign leaf");
        CertBundle::from_parts(
            vec![cert.der().clone(), self.issuer.clone()],
            key.clone(),
            self.anchors(),
        )
        .expect("bundle")
    }
}
