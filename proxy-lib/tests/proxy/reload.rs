//! Acceptance 4: a bad snapshot at reload is refused, the old certificate keeps being served
//! and `proxy_reloads_total{result="error"}` goes up. Also: a good reload switches new
//! handshakes at once while an open connection keeps working, and subscribers see it.

use proxy_lib::test_util::{TestPki, write_data_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const ERRORS: &str = r#"proxy_reloads_total{result="error"}"#;
const OKS: &str = r#"proxy_reloads_total{result="ok"}"#;

#[tokio::test]
async fn bad_snapshots_are_refused_and_the_old_cert_is_kept() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    let good = leaf(&pki, &me);
    write_data_dir(dir.path(), &good);
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let client = leaf(&pki, &id("web", "apps"));
    let cc = client_config(&pki.anchors(), Some(&client));

    let n = now();
    let other = leaf(&pki, &me);
    let (good_cert, _, ca) = pem_of(&good);
    let (other_cert, other_key, _) = pem_of(&other);
    let (expired_cert, expired_key, _) = pem_of(&pki.leaf(&me, n - 3 * HOUR, n - HOUR));
    let (foreign_cert, foreign_key, _) = pem_of(&leaf(&TestPki::new(n), &me));
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"not a certificate\n".to_vec(),
            b"not a key\n".to_vec(),
            "cannot load",
        ),
        (
            "mismatched key",
            good_cert.clone().into_bytes(),
            other_key.clone().into_bytes(),
            "does not match",
        ),
        (
            "expired",
            expired_cert.into_bytes(),
            expired_key.into_bytes(),
            "not valid now",
        ),
        (
            "foreign anchor",
            foreign_cert.into_bytes(),
            foreign_key.into_bytes(),
            "does not chain",
        ),
    ];
    let _ = other_cert;
    for (i, (what, cert, key, reason)) in cases.into_iter().enumerate() {
        write_raw_version(dir.path(), &cert, &key, ca.as_bytes());
        let (status, body) = http(proxy.admin, "POST", "/reload").await;
        assert_eq!(status, 422, "{what}: {body}");
        assert!(
            body.contains(reason),
            "{what}: reason {reason:?} not in {body}"
        );
        assert!(
            body.contains(&good.leaf.sha256),
            "{what}: the answer must name the cert still served: {body}"
        );
        let tls = tls_connect(proxy.inbound[0], cc.clone(), &me)
            .await
            .unwrap();
        assert_eq!(served_fingerprint(&tls), good.leaf.sha256, "{what}");
        let text = metrics_text(proxy.admin).await;
        assert_eq!(metric(&text, ERRORS), (i + 1) as f64, "{what}: {text}");
        assert_eq!(metric(&text, OKS), 1.0, "{what}: {text}");
        assert!(proxy.reloader.is_ready());
    }
    proxy.stop().await;
}

#[tokio::test]
async fn good_reload_switches_new_handshakes_and_leaves_open_connections_alone() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    let first = leaf(&pki, &me);
    let first_version = write_data_dir(dir.path(), &first);
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let mut updates = proxy.reloader.subscribe();
    updates.borrow_and_update();
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));

    let mut open = tls_connect(proxy.inbound[0], cc.clone(), &me)
        .await
        .unwrap();
    assert_eq!(served_fingerprint(&open), first.leaf.sha256);
    open.write_all(b"before ").await.unwrap();

    let second = leaf(&pki, &me);
    write_data_dir(dir.path(), &second);
    // The rotator prunes the old version: the proxy must not need it any more.
    std::fs::remove_dir_all(first_version).unwrap();
    let (status, body) = http(proxy.admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&second.leaf.sha256), "{body}");
    assert!(updates.has_changed().unwrap());
    assert_eq!(
        updates.borrow_and_update().as_ref().unwrap().leaf.sha256,
        second.leaf.sha256
    );
    assert_eq!(
        proxy.reloader.current().unwrap().leaf.sha256,
        second.leaf.sha256
    );

    let fresh = tls_connect(proxy.inbound[0], cc, &me).await.unwrap();
    assert_eq!(served_fingerprint(&fresh), second.leaf.sha256);

    // The connection opened before the reload still carries data both ways.
    open.write_all(b"after").await.unwrap();
    open.shutdown().await.unwrap();
    let mut back = Vec::new();
    open.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"before after");
    drop((open, fresh));
    proxy.stop().await;
}

#[tokio::test]
async fn separate_trust_anchors_file_is_used_and_reread() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    // The cert dir's own ca.crt names a foreign anchor; the configured file has the right one.
    let foreign = TestPki::new(now());
    let mut b = leaf(&pki, &me);
    b.anchors = foreign.anchors();
    write_data_dir(dir.path(), &b);
    let anchors_file = dir.path().join("anchors.pem");
    std::fs::write(
        &anchors_file,
        proxy_lib::pem::certs_to_pem(pki.anchors().certs()),
    )
    .unwrap();
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.trust_anchors = Some(anchors_file.clone());
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    assert!(proxy.reloader.is_ready());
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    echo_through_tls(proxy.inbound[0], cc, &me, b"hello")
        .await
        .unwrap();

    // Re-read at reload: replaced by the foreign anchor, our chain no longer validates.
    std::fs::write(
        &anchors_file,
        proxy_lib::pem::certs_to_pem(foreign.anchors().certs()),
    )
    .unwrap();
    let (status, body) = http(proxy.admin, "POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("does not chain"), "{body}");
    proxy.stop().await;
}

/// `..data` swapped to a version dir that is pruned before it can be read (here: pointing at
/// one that no longer exists, so every retry of the once-resolved read finds it gone): the
/// reload is refused with a clear error and the old certificate stays served, with the
/// snapshot's own `ca.crt` and with a separate anchors file alike.
#[tokio::test]
async fn a_data_link_to_a_vanished_version_is_refused_and_the_old_cert_kept() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    for separate_anchors in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let good = leaf(&pki, &me);
        write_data_dir(dir.path(), &good);
        let app = echo_app().await;
        let mut cfg = config(dir.path());
        cfg.inbound.push(inbound_to(app));
        if separate_anchors {
            let file = dir.path().join("anchors.pem");
            std::fs::write(&file, proxy_lib::pem::certs_to_pem(pki.anchors().certs())).unwrap();
            cfg.trust_anchors = Some(file);
        }
        let (_, clock) = fake_clock();
        let proxy = start(&cfg, clock).await;
        assert!(proxy.reloader.is_ready(), "anchors file {separate_anchors}");

        let link = dir.path().join(proxy_lib::certdir::DATA_LINK);
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink("..pruned_version", &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        let (status, body) = http(proxy.admin, "POST", "/reload").await;
        assert_eq!(status, 422, "anchors file {separate_anchors}: {body}");
        assert!(body.contains("kept changing"), "{body}");
        assert!(body.contains(&good.leaf.sha256), "{body}");
        let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
        let tls = tls_connect_within(proxy.inbound[0], cc, &me).await;
        assert_eq!(served_fingerprint(&tls), good.leaf.sha256);
        drop(tls);
        proxy.stop().await;
    }
}
