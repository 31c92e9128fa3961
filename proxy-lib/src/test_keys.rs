//! Test fixture: private keys made by the `openssl` CLI in every encoding [`crate::key`] reads
//! (certify them with [`crate::test_util::TestPki::leaf_for_key`]).
//!
//! With `REQUIRE_INTEROP=1` (set by CI) a missing openssl fails the test; otherwise
//! [`openssl_keys`] returns `None` and the caller skips with a printed reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::key::{KeyAlgorithm, KeyFormat};

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
    use KeyAlgorithm::{EcdsaP256 as Ec, Rsa};
    use KeyFormat::{Pkcs1, Pkcs8, Sec1};
    let table: [(&'static str, KeyFormat, KeyAlgorithm, &Vec<u8>); 10] = [
        ("sec1.pem", Sec1, Ec, &ec),
        ("sec1.der", Sec1, Ec, &ec),
        ("pkcs1.pem", Pkcs1, Rsa, &rsa),
        ("pkcs1.der", Pkcs1, Rsa, &rsa),
        ("sec1-p8.pem", Pkcs8, Ec, &ec),
        ("sec1-p8.der", Pkcs8, Ec, &ec),
        ("pkcs1-p8.pem", Pkcs8, Rsa, &rsa),
        ("pkcs1-p8.der", Pkcs8, Rsa, &rsa),
        ("genpkey.pem", Pkcs8, Ec, &gen_ec),
        ("genpkey.der", Pkcs8, Ec, &gen_ec),
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
