//! The trust bundle on the host: a signed change by a trusted anchor is installed with the
//! next cert (or alone, by a poll), anything else is refused with the old set kept and the
//! reason in `status`.

use super::*;
use proxy_lib::certdir::CA_FILE;
use proxy_lib::pem::PrivateKey;
use proxy_lib::test_util::TestPki;
use proxy_lib::trust_bundle::{self, SIG_FILE, api};
use rustls_pki_types::CertificateDer;

use crate::status::Level;

/// A bundle of `certs` signed at `sequence` with `signer`'s anchor key (unsigned: `None`).
fn offer(certs: &[&CertificateDer<'static>], signed: Option<(&TestPki, u64)>) -> api::Bundle {
    let certs: Vec<CertificateDer<'static>> = certs.iter().map(|c| (*c).clone()).collect();
    let signature = signed.map_or_else(String::new, |(pki, sequence)| {
        let key = PrivateKey::from_pkcs8_der(pki.anchor_key.serialize_der());
        trust_bundle::sign(&key, sequence, &certs)
            .unwrap()
            .to_text()
    });
    api::Bundle {
        anchors: certs.iter().map(|c| c.to_vec()).collect(),
        signature,
    }
}

fn serve(rig: &Rig, bundle: api::Bundle) {
    *rig.issuer.bundle.lock().unwrap() = Some(bundle);
}

fn anchors_on_disk(rig: &Rig) -> Vec<CertificateDer<'static>> {
    proxy_lib::pem::read_certs(&rig.config.dir.join(CA_FILE)).unwrap()
}

fn sig_on_disk(rig: &Rig) -> Option<u64> {
    let version = proxy_lib::certdir::resolve_data_dir(&rig.config.dir);
    std::fs::read(version.join(SIG_FILE))
        .ok()
        .map(|t| trust_bundle::Signature::parse(&t).unwrap().sequence)
}

fn status(rig: &Rig) -> crate::status::Report {
    crate::status::report(&rig.config, rig.clock.now())
}

#[tokio::test(start_paused = true)]
async fn a_bundle_signed_by_a_trusted_anchor_is_installed_with_the_next_cert() {
    let rig = rig(DAY, "");
    let old = &rig.issuer.pki;
    let new = TestPki::new(rig.clock.now());
    // Unsigned, the same anchors as the host has: nothing to do.
    serve(&rig, offer(&[&old.anchor], None));
    let mut r = rig.rotator();
    r.cycle(true).await.unwrap();
    assert_eq!(anchors_on_disk(&rig), vec![old.anchor.clone()]);
    assert_eq!(sig_on_disk(&rig), None, "bootstrap anchors");
    assert_eq!(status(&rig).status, Level::Ok);

    serve(&rig, offer(&[&old.anchor, &new.anchor], Some((old, 5))));
    r.cycle(true).await.unwrap();
    assert_eq!(
        anchors_on_disk(&rig),
        vec![old.anchor.clone(), new.anchor.clone()]
    );
    assert_eq!(sig_on_disk(&rig), Some(5));
    let report = status(&rig);
    assert_eq!(report.status, Level::Ok, "{report:?}");
    assert!(report.trust_bundle.unwrap().contains("sequence 5"));
    let metrics = r.metrics().encode();
    let fp = trust_bundle::fingerprint(&[old.anchor.clone(), new.anchor.clone()]);
    let want = format!(
        "rotator_trust_bundle_info{{fingerprint=\"{}\",sequence=\"5\"}} 1",
        trust_bundle::short(&fp)
    );
    assert!(metrics.contains(&want), "{want} missing from\n{metrics}");

    // From now on the installed bundle is the trust: the configured anchors no longer matter,
    // and the next renewal keeps the bundle and its signature.
    std::fs::write(
        rig.path_of("anchors.pem"),
        proxy_lib::pem::certs_to_pem([&new.anchor]),
    )
    .unwrap();
    assert!(matches!(r.decide().1, Decision::At(_)));
    r.cycle(true).await.unwrap();
    assert_eq!(sig_on_disk(&rig), Some(5));
    assert_eq!(anchors_on_disk(&rig).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn unsigned_foreign_rolled_back_or_chain_breaking_bundles_are_refused_and_the_old_set_kept() {
    let rig = rig(DAY, "");
    let old = &rig.issuer.pki;
    let new = TestPki::new(rig.clock.now());
    let thief = TestPki::new(rig.clock.now());
    let mut r = rig.rotator();
    serve(&rig, offer(&[&old.anchor, &new.anchor], Some((old, 5))));
    r.cycle(true).await.unwrap();
    let installed = anchors_on_disk(&rig);
    assert_eq!(installed.len(), 2);

    let cases: Vec<(&str, api::Bundle, &str)> = vec![
        (
            "unsigned change",
            offer(&[&old.anchor, &thief.anchor], None),
            "carries no signature",
        ),
        (
            "signed by a root the host does not trust",
            offer(&[&old.anchor, &thief.anchor], Some((&thief, 9))),
            "not the key of a trusted anchor",
        ),
        (
            "a replay of an older sequence",
            offer(&[&old.anchor], Some((old, 4))),
            "rollback",
        ),
        (
            "signed by a trusted anchor, but not the issuer's root",
            offer(&[&new.anchor], Some((&new, 9))),
            "does not validate",
        ),
        (
            "tampered after signing",
            {
                let mut b = offer(&[&old.anchor, &new.anchor], Some((old, 9)));
                b.anchors.push(thief.anchor.to_vec());
                b
            },
            "does not verify",
        ),
        (
            "a malformed signature",
            api::Bundle {
                anchors: vec![old.anchor.to_vec()],
                signature: "not a signature".into(),
            },
            "malformed",
        ),
    ];
    for (what, bundle, reason) in cases {
        serve(&rig, bundle);
        r.cycle(true)
            .await
            .unwrap_or_else(|e| panic!("{what}: the renewal itself succeeds: {e}"));
        assert_eq!(
            anchors_on_disk(&rig),
            installed,
            "{what}: the old set is kept"
        );
        assert_eq!(sig_on_disk(&rig), Some(5), "{what}");
        let report = status(&rig);
        assert_eq!(report.status, Level::Warning, "{what}: {report:?}");
        assert!(
            report.summary.contains(reason),
            "{what}: {} should say {reason}",
            report.summary
        );
    }
    assert_eq!(r.metrics().bundle_refusals.get(), 6);

    // The issuer fixes its bundle: the warning clears.
    serve(&rig, offer(&[&old.anchor, &new.anchor], Some((old, 5))));
    r.cycle(true).await.unwrap();
    assert_eq!(status(&rig).status, Level::Ok);
}

#[tokio::test(start_paused = true)]
async fn a_poll_installs_a_bundle_change_alone_with_the_same_cert_and_key_and_runs_the_hooks() {
    let rig = rig(DAY, "");
    let old = &rig.issuer.pki;
    let new = TestPki::new(rig.clock.now());
    let mut r = rig.rotator();
    r.cycle(true).await.unwrap();
    let (before, _) = CertBundle::load_dir(&rig.config.dir).unwrap();
    let reloads = rig.reloads.0.load(Ordering::SeqCst);
    let calls = rig.calls();

    // Nothing offered, or the same set: no swap.
    r.poll_bundle().await.unwrap();
    serve(&rig, offer(&[&old.anchor], None));
    r.poll_bundle().await.unwrap();
    assert_eq!(rig.reloads.0.load(Ordering::SeqCst), reloads);

    serve(&rig, offer(&[&old.anchor, &new.anchor], Some((old, 7))));
    r.poll_bundle().await.unwrap();
    let (after, _) = CertBundle::load_dir(&rig.config.dir).unwrap();
    assert_eq!(after.chain, before.chain, "same cert");
    assert_eq!(after.key.pkcs8_der(), before.key.pkcs8_der(), "same key");
    assert_eq!(
        after.anchors.certs(),
        &[old.anchor.clone(), new.anchor.clone()]
    );
    assert_eq!(sig_on_disk(&rig), Some(7));
    assert_eq!(
        rig.reloads.0.load(Ordering::SeqCst),
        reloads + 1,
        "hooks ran once"
    );
    assert_eq!(rig.calls(), calls, "no new cert asked for");

    // A refused change: nothing swapped, the reason in status.
    serve(&rig, offer(&[&new.anchor], Some((&new, 8))));
    r.poll_bundle().await.unwrap();
    assert_eq!(sig_on_disk(&rig), Some(7));
    assert_eq!(rig.reloads.0.load(Ordering::SeqCst), reloads + 1);
    assert_eq!(status(&rig).status, Level::Warning);

    // The issuer unreachable: an error for the daemon to log, nothing changed.
    rig.issuer.down.store(true, Ordering::SeqCst);
    assert!(r.poll_bundle().await.is_err());
    assert_eq!(sig_on_disk(&rig), Some(7));
}
