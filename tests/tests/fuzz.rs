//! Property-based fuzzing of everything that parses bytes from the other side: the issuer's
//! CSR check, PEM/DER certificate and key loading, and the rotator's check of an issuer's
//! answer. Arbitrary bytes and mutations of valid inputs (bit flips, truncations, splices)
//! must give an error, never a panic; a mutated input that still passes must still satisfy
//! what passing promises (the CSR's key is the one that signed it; the answer's leaf carries
//! our key and identity and chains to the anchors).
//!
//! `FUZZ_CASES` scales the number of cases of each property (default 17,000: the suite's six
//! properties make 102,000 in CI; set it higher for a longer local run).

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::test_util::TestPki;
use rcgen::{CertificateParams, KeyPair};

const ID: &str = "db.ext.serviceaccount.identity.linkerd.cluster.local";

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(17_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

fn identity() -> Identity {
    Identity::parse(ID).unwrap()
}

/// A valid CSR for [`ID`] and a valid issuer answer for it, made once.
struct Fixture {
    csr: Vec<u8>,
    spki: Vec<u8>,
    pki: TestPki,
    leaf: Vec<u8>,
    now: SystemTime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let now = SystemClock.now();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![ID.to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        let csr = p.serialize_request(&key).unwrap().der().to_vec();
        let pki = TestPki::new(now);
        let leaf_params = TestPki::leaf_params(
            &identity(),
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        );
        let leaf = pki.sign(&leaf_params, &key).to_vec();
        Fixture {
            csr,
            spki: rcgen::PublicKeyData::subject_public_key_info(&key),
            pki,
            leaf,
            now,
        }
    })
}

/// A mutation of `base`: some bytes flipped, then maybe cut short or with bytes inserted.
fn mutated(base: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    (
        prop::collection::vec((0..len, 1u8..=255), 1..4),
        prop::option::of(0..len),
        prop::option::of((0..len, prop::collection::vec(any::<u8>(), 1..8))),
    )
        .prop_map(move |(flips, cut, insert)| {
            let mut v = base.to_vec();
            for (i, x) in flips {
                v[i] ^= x;
            }
            if let Some((at, bytes)) = insert {
                let at = at.min(v.len());
                v.splice(at..at, bytes);
            }
            if let Some(cut) = cut {
                v.truncate(cut.max(1));
            }
            v
        })
}

fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        // DER-looking: a SEQUENCE tag and a length, then noise.
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|mut v| {
            v.splice(0..0, [0x30, 0x82, (v.len() >> 8) as u8, v.len() as u8]);
            v
        }),
        // PEM-looking: armour around noise.
        "[A-Za-z0-9+/=\n]{0,300}".prop_map(|body| {
            format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n").into_bytes()
        }),
    ]
}

#[test]
fn the_issuers_csr_check_never_panics_on_arbitrary_bytes() {
    let id = identity();
    runner()
        .run(&garbage(), |bytes| {
            prop_assert!(issuer::csr::validate(&bytes, &id).is_err());
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_mutated_csr_is_refused_or_still_carries_the_signing_key() {
    let f = fixture();
    let id = identity();
    runner()
        .run(&mutated(&f.csr), |bytes| {
            if let Ok(v) = issuer::csr::validate(&bytes, &id) {
                // The signature still verified, so the key is the one that signed.
                prop_assert!(f.spki.ends_with(v.public_key.point()));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn pem_der_certificate_and_key_loading_never_panics() {
    runner()
        .run(&garbage(), |bytes| {
            let _ = proxy_lib::pem::certs_from_bytes(&bytes, "fuzz");
            let _ = proxy_lib::key::PrivateKey::from_bytes(&bytes, "fuzz");
            let _ = proxy_lib::cert::CertInfo::from_der(&bytes);
            let _ = proxy_lib::verify::TrustAnchors::from_bytes(&bytes, "fuzz");
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_mutated_certificate_never_panics_the_parsers() {
    let f = fixture();
    runner()
        .run(&mutated(&f.leaf), |bytes| {
            let _ = proxy_lib::cert::CertInfo::from_der(&bytes);
            let _ = proxy_lib::verify::TrustAnchors::from_bytes(&bytes, "fuzz");
            Ok(())
        })
        .unwrap();
}

fn check_answer(leaf: &[u8], intermediates: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let f = fixture();
    let r = rotator::validate::validate(
        leaf,
        intermediates,
        &identity(),
        &f.spki,
        &f.pki.anchors(),
        f.now,
        Duration::from_secs(60),
    );
    if let Ok(v) = r {
        // Passing promises our key, our identity and a chain to the anchors.
        prop_assert!(v.leaf.dns_sans == [ID.to_string()]);
        prop_assert!(
            f.pki
                .anchors()
                .verify_leaf(
                    &v.chain[0],
                    &v.chain[1..],
                    f.now,
                    proxy_lib::verify::Usage::Client
                )
                .is_ok()
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&v.chain[0]).unwrap();
        prop_assert_eq!(cert.public_key().raw, &f.spki[..]);
    }
    Ok(())
}

#[test]
fn the_rotators_answer_check_never_panics_on_arbitrary_answers() {
    runner()
        .run(
            &(garbage(), prop::collection::vec(garbage(), 0..3)),
            |(leaf, intermediates)| check_answer(&leaf, &intermediates),
        )
        .unwrap();
}

#[test]
fn a_mutated_answer_is_refused_or_still_valid() {
    let f = fixture();
    let issuer = f.pki.issuer.to_vec();
    runner()
        .run(&mutated(&f.leaf), |leaf| {
            check_answer(&leaf, std::slice::from_ref(&issuer))
        })
        .unwrap();
}
