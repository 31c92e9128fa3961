//! The rotator's check of an issuer's answer (leaf + intermediates) on arbitrary bytes:
//! refused, or a leaf that carries our key and identity and chains to our anchors.
#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use proxy_lib::identity::Identity;
use proxy_lib::test_util::TestPki;
use rcgen::KeyPair;

const ID: &str = "db.ext.serviceaccount.identity.linkerd.cluster.local";

struct Fixture {
    spki: Vec<u8>,
    pki: TestPki,
    id: Identity,
    now: SystemTime,
}

static F: LazyLock<Fixture> = LazyLock::new(|| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let key = KeyPair::generate().expect("key");
    Fixture {
        spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        pki: TestPki::new(now),
        id: Identity::parse(ID).expect("identity"),
        now,
    }
});

#[derive(arbitrary::Arbitrary, Debug)]
struct Answer {
    leaf: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
}

fuzz_target!(|a: Answer| {
    let f = &*F;
    if let Ok(v) = rotator::validate::validate(
        &a.leaf,
        &a.intermediates,
        &f.id,
        &f.spki,
        &f.pki.anchors(),
        f.now,
        Duration::from_secs(60),
    ) {
        // Passing promises a chain to the anchors: anything else is a finding.
        assert!(
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
    }
});
