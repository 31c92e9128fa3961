//! Validation of issuer answers: the good one passes, each kind of bad one is refused.

use super::*;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use proxy_lib::clock::FakeClock;
use proxy_lib::test_util::TestPki;

use crate::testing::{FakeIssuer, identity};

const SKEW: Duration = Duration::from_secs(20);

struct Case {
    issuer: Arc<FakeIssuer>,
    fresh: crate::keygen::KeyAndCsr,
    now: SystemTime,
}

fn case() -> Case {
    let now = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let clock = Arc::new(FakeClock::new(now));
    let issuer = FakeIssuer::new(clock, Duration::from_secs(86_400));
    Case {
        issuer,
        fresh: crate::keygen::generate(&identity(), false).unwrap(),
        now,
    }
}

fn check(c: &Case, leaf: &[u8], inter: &[Vec<u8>]) -> Result<Validated, ValidateError> {
    validate(
        leaf,
        inter,
        &identity(),
        &c.fresh.spki_der,
        &c.issuer.pki.anchors(),
        c.now,
        SKEW,
    )
}

#[test]
fn a_proper_answer_is_accepted_in_der_and_pem() {
    proxy_lib::install_crypto_provider();
    let c = case();
    let r = c.issuer.sign(&c.fresh.csr_der, |_| {});
    let v = check(&c, &r.leaf, &r.intermediates).unwrap();
    assert_eq!(v.chain.len(), 2);
    let pem = proxy_lib::pem::der_to_pem("CERTIFICATE", &r.leaf);
    check(&c, pem.as_bytes(), &r.intermediates).unwrap();
}

#[test]
fn each_bad_answer_is_refused() {
    let c = case();
    let other_id =
        Identity::parse("web.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
    let sign = |t: &dyn Fn(&mut rcgen::CertificateParams)| c.issuer.sign(&c.fresh.csr_der, t);

    // Leaf for another identity.
    let r = sign(&|p| {
        p.subject_alt_names = vec![
            rcgen::SanType::DnsName(other_id.to_string().try_into().unwrap()),
            rcgen::SanType::URI(other_id.spiffe_id().try_into().unwrap()),
        ]
    });
    assert!(matches!(
        check(&c, &r.leaf, &r.intermediates),
        Err(ValidateError::Names { .. })
    ));
    // Extra SAN.
    let r = sign(&|p| {
        p.subject_alt_names
            .push(rcgen::SanType::DnsName("extra.example".try_into().unwrap()))
    });
    assert!(matches!(
        check(&c, &r.leaf, &r.intermediates),
        Err(ValidateError::Names { .. })
    ));
    // Missing SPIFFE URI.
    let r = sign(&|p| p.subject_alt_names.truncate(1));
    assert!(matches!(
        check(&c, &r.leaf, &r.intermediates),
        Err(ValidateError::Names { .. })
    ));
    // Another public key.
    let r = c.issuer.sign_with_other_key();
    assert!(matches!(
        check(&c, &r.leaf, &r.intermediates),
        Err(ValidateError::WrongKey { .. })
    ));
    // Not chaining to ca.crt: signed by another PKI.
    let foreign = FakeIssuer::new(c.issuer.clock.clone(), Duration::from_secs(86_400));
    let r = foreign.sign(&c.fresh.csr_der, |_| {});
    assert!(matches!(
        check(&c, &r.leaf, &r.intermediates),
        Err(ValidateError::Untrusted { .. })
    ));
    // Intermediate missing.
    let r = sign(&|_| {});
    assert!(matches!(
        check(&c, &r.leaf, &[]),
        Err(ValidateError::Untrusted { .. })
    ));
    // Expired.
    let r = sign(&|p| {
        p.not_before = (c.now - Duration::from_secs(7200)).into();
        p.not_after = (c.now - Duration::from_secs(60)).into();
    });
    assert!(matches!(
        check(&c, &r.leaf, &r.intermediates),
        Err(ValidateError::Validity { .. })
    ));
    // Valid only in the future (beyond the skew).
    let r = sign(&|p| {
        p.not_before = (c.now + Duration::from_secs(3600)).into();
        p.not_after = (c.now + Duration::from_secs(7200)).into();
    });
    assert!(matches!(
        check(&c, &r.leaf, &r.intermediates),
        Err(ValidateError::Validity { .. })
    ));
    // A notBefore within the skew is fine.
    let r = sign(&|p| p.not_before = (c.now + Duration::from_secs(10)).into());
    check(&c, &r.leaf, &r.intermediates).unwrap();
    // A CA certificate.
    let r = sign(&|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
    assert!(check(&c, &r.leaf, &r.intermediates).is_err());
    // Garbage and empty.
    assert!(matches!(
        check(&c, b"\x30\x82garbage", &[]),
        Err(ValidateError::Malformed(_))
    ));
    assert!(matches!(
        check(&c, b"not a certificate", &[]),
        Err(ValidateError::Malformed(_))
    ));
    assert!(matches!(check(&c, b"", &[]), Err(ValidateError::Empty)));
    let r = sign(&|_| {});
    assert!(matches!(
        check(&c, &r.leaf, &[b"junk".to_vec()]),
        Err(ValidateError::Malformed(_))
    ));
    let _ = TestPki::new(c.now);
}
